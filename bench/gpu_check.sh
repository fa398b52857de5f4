#!/usr/bin/env bash
# The GPU half of ckpt's promises, on a one-GPU machine, in under 8 minutes:
#   1. the cuda-marked tests (tests/test_cuda.py, and the CUDA runs of tests/test_resume.py),
#   2. a GPU save/restore benchmark against torch.save/torch.load (bench/gpu_bench.py).
#
# Usage: bench/gpu_check.sh            (from anywhere; GIB=3 sets the benchmark's size)
# Needs a python3 with torch (CUDA), pytest, safetensors, fsspec and xxhash; installs nothing.
# hypothesis, pytest-timeout and NumPy are optional. GPU_CHECK_DRY=1 runs it all on the CPU
# (the tests skip, the benchmark is tiny): a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
PYTHON=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}

"$PYTHON" - "$DRY" <<'EOF' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "pytest", "safetensors", "fsspec", "xxhash")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: python3 lacks {missing}")
import torch
if not torch.cuda.is_available() and sys.argv[1] != "1":
    sys.exit("gpu_check: torch sees no CUDA device")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {name}")
for m in ("hypothesis", "pytest_timeout", "numpy"):
    print(f"gpu_check: optional {m}: {'yes' if importlib.util.find_spec(m) else 'no'}")
EOF

# The repo's pytest config, minus what may be missing here: no cache, no timeout plugin needed.
args=(-m cuda -p no:cacheprovider -o "addopts=--strict-markers -ra" -q)
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    args+=(-o timeout=240)
else  # pyproject's `timeout` option is unknown without the plugin: not an error here
    args+=(-W "ignore::pytest.PytestConfigWarning")
fi

echo "gpu_check: 1/2 cuda tests"
began=$SECONDS
timeout 330 "$PYTHON" -m pytest "${args[@]}" tests/test_cuda.py tests/test_resume.py
tests=$?
echo "gpu_check: tests exit $tests in $((SECONDS - began)) s"

echo "gpu_check: 2/2 benchmark"
began=$SECONDS
if [ "$DRY" = 1 ]; then
    timeout 120 "$PYTHON" bench/gpu_bench.py --device cpu --gib 0.05 --repeat 1
else
    timeout 150 "$PYTHON" bench/gpu_bench.py --gib "${GIB:-3}" --repeat 3
fi
bench=$?
echo "gpu_check: benchmark exit $bench in $((SECONDS - began)) s"

if [ "$tests" -ne 0 ] || [ "$bench" -ne 0 ]; then
    echo "gpu_check: FAILED (tests $tests, benchmark $bench)"
    exit 1
fi
echo "gpu_check: OK"
