"""ckpt.verify_resume: exact loops pass, known causes of inexact resumes are found and named."""

from __future__ import annotations

import pytest
import resume_loops

import ckpt

LOOPS = "resume_loops"


def _verify(build: str, step: str, **kwargs: object) -> ckpt.ResumeReport:
    options = {"steps": 6, "save_at": 2, "fresh_process": False, **kwargs}
    return ckpt.verify_resume(f"{LOOPS}:{build}", f"{LOOPS}:{step}", **options)  # type: ignore[arg-type]


def test_readme_loop_resumes_exactly_in_process():
    report = _verify("readme_build", "readme_step")
    assert report.exact and report.deterministic
    assert report.differences == [] and report.reference_differences == []
    assert "exact, bit for bit" in str(report)
    report.raise_if_inexact()  # no error


def test_readme_loop_resumes_exactly_in_a_fresh_process_given_functions():
    report = ckpt.verify_resume(
        resume_loops.readme_build, resume_loops.readme_step, steps=5, save_at=1
    )
    assert report.exact and report.fresh_process, str(report)


def test_async_save_resumes_exactly():
    report = _verify("readme_build", "readme_step", manager_options={"async_save": True})
    assert report.exact, str(report)


def test_script_owned_generator_is_named_as_state_outside_the_items():
    report = _verify("generator_build", "generator_step")
    assert not report.exact and report.deterministic
    assert report.differences[0].step == 3  # the first step after the save
    assert any(d.item == "loss" and d.max_abs_diff for d in report.differences)
    assert any("resume_loops.NOISE" in d and "torch.Generator" in d for d in report.diagnosis)
    with pytest.raises(ckpt.InexactResumeError, match="NOISE") as info:
        report.raise_if_inexact()
    assert isinstance(info.value, ckpt.CheckpointError) and info.value.report is report


def test_dataloader_workers_without_resumable_loader_are_diagnosed():
    report = _verify("workers_build", "workers_step")
    assert not report.exact and report.deterministic
    assert any("without resumable_loader" in d and "2 workers" in d for d in report.diagnosis)


def test_nondeterministic_loop_is_blamed_on_the_loop():
    report = _verify("readme_build", "nondeterministic_step")
    assert not report.exact and not report.deterministic
    first = report.reference_differences[0]
    assert first.step == 0 and {d.item for d in report.reference_differences} >= {"loss"}
    assert report.diagnosis[0].startswith("non-deterministic loop")
    assert "not deterministic" in str(report) and "two uninterrupted runs" in report.diagnosis[0]
    with pytest.raises(ckpt.InexactResumeError):
        report.raise_if_inexact()


def test_state_dict_omitting_a_field_is_diagnosed():
    report = _verify("omitting_build", "omitting_step")
    assert not report.exact and report.deterministic
    assert any("`average.count`" in d for d in report.diagnosis)


def test_report_json_is_plain_and_the_rng_is_left_as_found():
    import json
    import random

    import torch

    random.seed(5)
    torch.manual_seed(5)
    report = _verify("generator_build", "generator_step")
    after = (random.random(), torch.rand(3))
    random.seed(5)
    torch.manual_seed(5)
    assert after[0] == random.random() and torch.equal(after[1], torch.rand(3))
    data = json.loads(json.dumps(report.to_json()))
    assert data["exact"] is False and data["differences"][0]["step"] == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="save_at"):
        _verify("readme_build", "readme_step", save_at=5)
    with pytest.raises(ValueError, match="steps"):
        _verify("readme_build", "readme_step", steps=1, save_at=0)
    with pytest.raises(ValueError, match="fresh_process"):
        ckpt.verify_resume(lambda: {}, resume_loops.readme_step, steps=3, save_at=0)
    with pytest.raises(ValueError, match="module:function"):
        ckpt.verify_resume("nocolon", "x:y", steps=3, save_at=0, fresh_process=False)


@pytest.mark.slow
def test_fresh_process_finds_the_generator_too():
    report = ckpt.verify_resume(
        f"{LOOPS}:generator_build", f"{LOOPS}:generator_step", steps=5, save_at=1
    )
    assert not report.exact
    assert any("resume_loops.NOISE" in d for d in report.diagnosis)


def test_cli_exit_status_and_json(capsys):
    import json

    from ckpt.cli import main

    base = ["verify-resume", "--steps", "4", "--save-at", "1", "--in-process"]
    assert main([*base, f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 0
    assert "exact, bit for bit" in capsys.readouterr().out
    assert main([*base, "--json", f"{LOOPS}:generator_build", f"{LOOPS}:generator_step"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact"] is False and doc["differences"][0]["step"] == 2
    assert (
        main([*base[:-1], "--save-at", "3", f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 2
    )
    assert main(["verify-resume", f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 2
    assert main([*base, "no_such_module:build", f"{LOOPS}:readme_step"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["gpt", "resnet"])
def test_real_model_shapes_resume_exactly_in_a_fresh_process(loop):
    report = ckpt.verify_resume(f"{LOOPS}:{loop}_build", f"{LOOPS}:{loop}_step", steps=8, save_at=3)
    assert report.exact, str(report)


@pytest.mark.cuda
def test_cuda_loop_resumes_exactly_with_its_cuda_streams_compared():
    report = ckpt.verify_resume(f"{LOOPS}:cuda_build", f"{LOOPS}:cuda_step", steps=6, save_at=2)
    assert report.exact, str(report)


def test_a_departure_a_second_resume_does_not_repeat_is_blamed_on_the_loop():
    resume_loops.BUILDS["count"] = 0
    report = _verify("counting_build", "noisy_after_resume_step")
    assert resume_loops.BUILDS["count"] == 4  # two uninterrupted runs and two resumes
    assert not report.exact and not report.deterministic
    assert report.reference_differences[0].item == "loss"
    assert "two resumes from the same checkpoint" in report.diagnosis[0]


def test_random_draws_in_resumable_loader_workers_are_diagnosed():
    report = _verify("resumable_workers_build", "workers_step", steps=6, save_at=2)
    assert report.deterministic and not report.exact
    assert any("random draws inside DataLoader workers" in d for d in report.diagnosis), report


def test_resumable_loader_workers_resume_exactly_without_random_draws():
    report = _verify("plain_workers_build", "workers_step", steps=10, save_at=3)
    assert report.exact, str(report)


def test_what_names_nothing_or_is_not_callable_fails_before_running():
    with pytest.raises(ValueError, match="'resume_loops:nope' names nothing"):
        _verify("readme_build", "nope")
    with pytest.raises(TypeError, match="not callable"):
        _verify("readme_build", "NOT_CALLABLE")
    with pytest.raises(ImportError, match="cannot import 'no_such_module:build'"):
        ckpt.verify_resume("no_such_module:build", "x:y", steps=3, save_at=0)


def test_build_must_return_a_dict_of_named_items():
    with pytest.raises(TypeError, match=r"dict of fresh items by name.*got list"):
        _verify("list_build", "readme_step")
    with pytest.raises(TypeError, match="got the key 0"):
        _verify("int_keys_build", "readme_step")
    with pytest.raises(TypeError, match=r"item 'loader', a ResumableDataLoader.*loader\.sampler"):
        _verify("loader_item_build", "readme_step")
    with pytest.raises(TypeError, match="must return a tensor") as info:
        _verify("readme_build", "dict_loss_step")
    assert "step(items, 0) in the first uninterrupted run" in info.value.__notes__[0]


def _no_verify_dirs(tmp_path):
    return not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-verify-resume-")]


def test_a_step_that_raises_names_the_run_and_step_and_cleans_up(tmp_path, monkeypatch):
    import random
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    state = random.getstate()
    with pytest.raises(ValueError, match="NaN at step 2") as info:
        _verify("readme_build", "raising_step")
    assert "step(items, 2) in the first uninterrupted run" in info.value.__notes__[0]
    assert random.getstate() == state and _no_verify_dirs(tmp_path)


def test_a_step_that_raises_in_the_fresh_process_is_reported_with_its_traceback(
    tmp_path, monkeypatch
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="resumed run in a fresh process failed") as info:
        ckpt.verify_resume(
            f"{LOOPS}:readme_build", f"{LOOPS}:raising_when_resumed_step", steps=5, save_at=1
        )
    message = str(info.value)
    assert "out of memory in the resumed run" in message
    assert "step(items, 3) in the resumed run" in message and "raising_when_resumed_step" in message
    assert _no_verify_dirs(tmp_path)


def test_cli_usage_errors_and_a_raising_loop_exit_2_with_a_message(capsys):
    from ckpt.cli import main

    base = ["verify-resume", "--steps", "4", "--save-at", "1", "--in-process"]
    cases = {
        (f"{LOOPS}:list_build", f"{LOOPS}:readme_step"): "got list",
        (f"{LOOPS}:readme_build", f"{LOOPS}:nope"): "names nothing",
        (f"{LOOPS}:readme_build", f"{LOOPS}:NOT_CALLABLE"): "not callable",
        (f"{LOOPS}:readme_build", f"{LOOPS}:raising_step"): "step(items, 2)",
    }
    for (build, step), words in cases.items():
        assert main([*base, build, step]) == 2, (build, step)
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_fresh_process_past_its_timeout_is_killed_with_its_children(tmp_path, monkeypatch):
    import os
    import tempfile
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("CKPT_TEST_GRANDCHILD", str(pid_file))
    with pytest.raises(TimeoutError, match="ran past timeout=30 s and was killed"):
        ckpt.verify_resume(
            f"{LOOPS}:readme_build",
            f"{LOOPS}:hanging_when_resumed_step",
            steps=5,
            save_at=1,
            timeout=30,
        )
    grandchild = int(pid_file.read_text())
    for _ in range(600):  # killed with its session: gone once the kernel has reaped it
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break  # a zombie left to init: killed
        time.sleep(0.05)
    else:
        pytest.fail(f"the resumed run's child {grandchild} outlived the timeout")
    assert _no_verify_dirs(tmp_path)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_a_bad_timeout_is_refused_before_running(timeout):
    with pytest.raises((TypeError, ValueError), match="timeout"):
        ckpt.verify_resume(
            "resume_loops:readme_build",
            "resume_loops:readme_step",
            steps=3,
            save_at=0,
            timeout=timeout,
        )


def test_cli_timeout_is_passed_on_and_a_bad_one_exits_2(capsys):
    from ckpt.cli import main

    base = ["verify-resume", "--steps", "3", "--save-at", "0", f"{LOOPS}:readme_build"]
    assert main([*base, f"{LOOPS}:readme_step", "--timeout", "0"]) == 2
    assert "timeout must be a positive" in capsys.readouterr().err
    assert main([*base, f"{LOOPS}:readme_step", "--timeout", "120", "--in-process"]) == 0
