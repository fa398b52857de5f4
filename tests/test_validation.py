"""Every item kind validates before anything changes: malformed states resealed past the checksums.

Each case takes a valid checkpoint holding every kind of item (module, optimizer,
scheduler, gradient scaler, sampler, plain dicts, random streams), edits one
non-tensor part of one item's saved state, reseals the manifest with a valid
checksum, and restores into trained live objects. The restore must raise a
``CheckpointError`` naming the file and the item, leave every live object bit
for bit as it was (tensors, ``state_dict()``s and the random streams), and
``verify()`` must report the same checkpoint as corrupt.
"""

from __future__ import annotations

import copy
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_same_state
from helpers import read_manifest_doc, small_model, train_steps, write_manifest

import ckpt
from ckpt.format import MANIFEST_NAME, step_dir_name

STEP = 4


def live_objects(seed: int) -> dict[str, object]:
    """Every kind of item, trained a little so that a restore would change each."""
    model = small_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    train_steps(model, optimizer, 2, seed=seed)
    for _ in range(seed + 1):
        scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed)
    sampler = ckpt.ResumableSampler(10, seed=seed)
    it = iter(sampler)
    for _ in range(seed + 1):
        next(it)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "sampler": sampler,
        "extra": {"epoch_losses": [0.5 * seed, 0.25], "best": torch.tensor([float(seed)])},
        "packed": {f"t{i}": torch.full((2,), float(i + seed)) for i in range(70)},
    }


def everything(items: dict[str, object]) -> dict[str, object]:
    """Deep copies of every live state, including the process's random streams."""
    out: dict[str, object] = {}
    for name, obj in items.items():
        out[name] = copy.deepcopy(obj if isinstance(obj, dict) else obj.state_dict())
    out["params"] = [p.detach().clone() for p in items["model"].parameters()]
    numpy_key = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
    out["rng"] = (torch.get_rng_state(), random.getstate(), numpy_key)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    np.random.seed(0)
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(STEP, **live_objects(1))
    return root


def _item(doc, name):
    return doc["items"][name]


def _state(doc, name):
    return doc["items"][name]["state"]


def _param_state(doc, index=0):
    """The saved per-parameter optimizer state of ``index`` (int keys are a $dict)."""
    for key, value in _state(doc, "optimizer")["state"]["$dict"]:
        if key == index:
            return value
    raise KeyError(index)


def _group(doc):
    return _state(doc, "optimizer")["param_groups"][0]


def _set(getter, key, value):
    def edit(doc):
        getter(doc)[key] = value

    return edit


def _delete(getter, key):
    def edit(doc):
        del getter(doc)[key]

    return edit


def _replace(name, value):
    def edit(doc):
        _item(doc, name)["state"] = value

    return edit


def _packed_dtype(dtype, numel=2):
    def edit(doc):
        record = doc["tensors"]["packed/t3"]
        assert "pack" in record  # a member of a pack: only the manifest knows its dtype
        record["dtype"] = dtype
        record["shape"] = [numel]  # the same 8 bytes

    return edit


def _state_keyed_by(key):
    def edit(doc):
        opt = _state(doc, "optimizer")
        pairs = opt["state"]["$dict"]
        pairs[0][0] = key

    return edit


def _module_int_key(doc):
    state = _state(doc, "model")
    first = next(iter(state))
    value = state.pop(first)
    _item(doc, "model")["state"] = {"$dict": [[0, value], *[[k, v] for k, v in state.items()]]}


def _exp_avg_of_another_param(doc):
    _param_state(doc, 0)["exp_avg"] = _param_state(doc, 1)["exp_avg"]  # the bias's shape


def _duplicate_index(doc):
    params = _group(doc)["params"]
    params[1] = params[0]


def _momentum_in_adamw(doc):
    _param_state(doc, 0)["momentum_buffer"] = _param_state(doc, 0)["exp_avg"]


def _records(edit):
    def apply(doc):
        edit(_item(doc, "optimizer")["params"])

    return apply


def _rng(path, value):
    def edit(doc):
        node = _state(doc, "rng")
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _bad_metadata(value):
    return _set(lambda d: _item(d, "model"), "module_metadata", value)


def _version(value):
    def edit(doc):
        _item(doc, "model")["module_metadata"][""] = {"version": value}

    return edit


def _module(key, value):
    return _set(lambda d: _state(d, "model"), key, value)


def _param(key, value, index=0):
    return _set(lambda d: _param_state(d, index), key, value)


def _sampler(key, value):
    return _set(lambda d: _state(d, "sampler"), key, value)


def _scaler(key, value):
    return _set(lambda d: _state(d, "scaler"), key, value)


def _tensor_ref(name):
    return {"$tensor": name}


# (id, edit of the parsed manifest, the key the error must name)
MALFORMED = [
    # modules: entries, keys, metadata
    ("module-entry-int", _module("0.weight", 5), "model.0.weight"),
    ("module-entry-str", _module("0.bias", "w"), "model.0.bias"),
    ("module-entry-list", _module("3.weight", [_tensor_ref("model/3.weight")]), "model.3.weight"),
    ("module-entry-none", _module("1.running_mean", None), "model.1.running_mean"),
    ("module-state-list", _replace("model", []), "model"),
    ("module-state-int", _replace("model", 7), "model"),
    ("module-int-key", _module_int_key, "model"),
    ("metadata-int", _bad_metadata(3), "model._metadata"),
    ("metadata-entry-int", _bad_metadata({"": 5}), "model._metadata"),
    ("metadata-version-str", _version("2"), "model._metadata"),
    ("metadata-version-bool", _version(True), "model._metadata"),
    ("metadata-version-float", _version(1.5), "model._metadata"),
    ("metadata-int-key", _bad_metadata({"$dict": [[0, {"version": 1}]]}), "model._metadata"),
    # tensor dtypes ckpt never writes
    ("packed-qint32", _packed_dtype("qint32"), "packed/t3"),
    ("packed-qint8", _packed_dtype("qint8", 8), "packed/t3"),
    ("packed-quint8", _packed_dtype("quint8", 8), "packed/t3"),
    ("packed-complex32", _packed_dtype("complex32"), "packed/t3"),
    ("packed-bits16", _packed_dtype("bits16", 4), "packed/t3"),
    # optimizer: per-parameter state
    ("opt-no-step", _delete(_param_state, "step"), "optimizer.state[0]"),
    ("opt-step-str", _param("step", "3"), "optimizer.state[0]['step']"),
    ("opt-step-list", _param("step", [1, 2]), "optimizer.state[0]['step']"),
    ("opt-step-none", _param("step", None), "optimizer.state[0]['step']"),
    ("opt-step-bool", _param("step", True), "optimizer.state[0]['step']"),
    ("opt-exp-avg-int", _param("exp_avg", 3), "optimizer.state[0]['exp_avg']"),
    ("opt-exp-avg-str", _param("exp_avg", "x"), "optimizer.state[0]['exp_avg']"),
    ("opt-exp-avg-shape", _exp_avg_of_another_param, "optimizer.state[0]['exp_avg']"),
    ("opt-value-dict", _param("exp_avg_sq", {"a": 1}), "optimizer.state[0]['exp_avg_sq']"),
    ("opt-foreign-key", _momentum_in_adamw, "optimizer.state[0]"),
    ("opt-step-beyond-float64", _param("step", 10**400), "optimizer.state[0]['step']"),
    ("opt-lr-beyond-float64", _set(_group, "lr", 10**400), "optimizer.param_groups[0]['lr']"),
    (
        "opt-betas-beyond-float64",
        _set(_group, "betas", {"$tuple": [0.9, -(10**400)]}),
        "optimizer.param_groups[0]['betas'][1]",
    ),
    ("opt-index-unknown", _state_keyed_by(99), "optimizer.state[99]"),
    ("opt-index-str", _state_keyed_by("0"), "optimizer.state['0']"),
    (
        "opt-param-state-list",
        _set(lambda d: _state(d, "optimizer")["state"]["$dict"][0], 1, []),
        "optimizer.state[0]",
    ),
    # optimizer: groups and records
    ("opt-groups-dict", _set(lambda d: _state(d, "optimizer"), "param_groups", {}), "optimizer"),
    (
        "opt-group-list",
        _set(lambda d: _state(d, "optimizer")["param_groups"], 0, []),
        "optimizer.param_groups[0]",
    ),
    ("opt-params-str", _set(_group, "params", "0,1"), "optimizer.param_groups[0]"),
    (
        "opt-params-bool",
        _set(_group, "params", [True, 1, 2, 3, 4, 5, 6, 7]),
        "optimizer.param_groups[0]",
    ),
    ("opt-params-duplicate", _duplicate_index, "optimizer"),
    ("opt-lr-dict", _set(_group, "lr", {"a": 1}), "optimizer.param_groups[0]['lr']"),
    ("opt-extra-top-key", _set(lambda d: _state(d, "optimizer"), "junk", 1), "optimizer"),
    ("opt-no-groups", _delete(lambda d: _state(d, "optimizer"), "param_groups"), "optimizer"),
    ("opt-record-shape-str", _records(lambda r: r[0].__setitem__("shape", "2x3")), "optimizer"),
    ("opt-record-name-int", _records(lambda r: r[0].__setitem__("name", 5)), "optimizer"),
    ("opt-records-short", _records(lambda r: r.pop()), "optimizer"),
    ("opt-class-int", _set(lambda d: _item(d, "optimizer"), "class", 5), "optimizer"),
    # random streams
    ("rng-internal-short", _rng(["python", "internal"], [1, 2, 3]), "rng.python.internal"),
    ("rng-version-str", _rng(["python", "version"], "3"), "rng.python"),
    ("rng-torch-int", _rng(["torch"], 5), "rng.torch"),
    ("rng-numpy-pos", _rng(["numpy", "pos"], 10**6), "rng.numpy.pos"),
    ("rng-unknown-key", _rng(["junk"], 1), "rng."),
    ("rng-rank-negative", _rng(["rank"], -1), "rng.rank"),
    ("rng-world-size-zero", _rng(["world_size"], 0), "rng.world_size"),
    ("rng-rank-past-world", _rng(["rank"], 1), "rng.rank"),
    ("rng-python-version-4", _rng(["python", "version"], 4), "rng.python"),
    ("rng-numpy-has-gauss-huge", _rng(["numpy", "has_gauss"], 10**30), "rng.numpy"),
    # gradient scaler
    ("scaler-scale-str", _scaler("scale", "big"), "scaler.scale"),
    ("scaler-interval-float", _scaler("growth_interval", 2.5), "scaler.growth_interval"),
    ("scaler-tracker-bool", _scaler("_growth_tracker", False), "scaler._growth_tracker"),
    ("scaler-missing-key", _delete(lambda d: _state(d, "scaler"), "_growth_tracker"), "scaler"),
    ("scaler-extra-key", _scaler("junk", 1.0), "scaler"),
    ("scaler-scale-1e300", _scaler("scale", 1e300), "scaler.scale"),
    ("scaler-scale-int-10e40", _scaler("scale", 10**40), "scaler.scale"),
    ("scaler-scale-int-10e400", _scaler("scale", 10**400), "scaler.scale"),
    ("scaler-scale-zero", _scaler("scale", 0.0), "scaler.scale"),
    ("scaler-growth-factor-one", _scaler("growth_factor", 1.0), "scaler.growth_factor"),
    ("scaler-backoff-two", _scaler("backoff_factor", 2.0), "scaler.backoff_factor"),
    ("scaler-tracker-int32", _scaler("_growth_tracker", 2**31), "scaler._growth_tracker"),
    ("scaler-tracker-negative", _scaler("_growth_tracker", -1), "scaler._growth_tracker"),
    ("scaler-interval-huge", _scaler("growth_interval", 10**400), "scaler.growth_interval"),
    ("scaler-interval-zero", _scaler("growth_interval", 0), "scaler.growth_interval"),
    # sampler
    ("sampler-position-past-end", _sampler("position", 11), "sampler.position"),
    ("sampler-epoch-negative", _sampler("epoch", -1), "sampler.epoch"),
    ("sampler-shuffle-int", _sampler("shuffle", 1), "sampler.shuffle"),
    ("sampler-generator-int", _sampler("generator", 3), "sampler.generator"),
    ("sampler-seed-missing", _delete(lambda d: _state(d, "sampler"), "seed"), "sampler"),
    # schedulers and other stateful objects
    ("scheduler-state-list", _replace("scheduler", [1, 2]), "scheduler"),
    ("scheduler-int-key", _replace("scheduler", {"$dict": [[0, 1]]}), "scheduler"),
    # dicts: the saved tree itself
    ("dict-unknown-tag", _set(lambda d: _state(d, "extra"), "best", {"$pickle": "x"}), "best"),
    (
        "dict-refers-to-its-pack",
        _set(lambda d: _state(d, "packed"), "t5", _tensor_ref("packed/#pack")),
        "['t5']",
    ),
    ("module-refers-to-a-pack", _module("0.weight", _tensor_ref("packed/#pack")), "['0.weight']"),
    (
        "dict-unknown-tensor",
        _set(lambda d: _state(d, "extra"), "best", _tensor_ref("nope")),
        "best",
    ),
]


def _restore_all(mgr, items, **options):
    return mgr.restore(STEP, **items, **options)


@pytest.mark.parametrize(("edit", "key"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_item_is_refused_before_anything_changes(saved, tmp_path, edit, key):
    root = tmp_path / "root"
    shutil.copytree(saved, root)
    manifest = root / step_dir_name(STEP) / MANIFEST_NAME
    doc = read_manifest_doc(manifest)
    edit(doc)
    write_manifest(manifest, doc)
    live = live_objects(2)
    before = everything(live)
    mgr = ckpt.CheckpointManager(root)
    with pytest.raises(ckpt.CheckpointError) as restored:
        _restore_all(mgr, live)
    assert not isinstance(restored.value, ckpt.PartialRestoreError)
    assert restored.value.path is not None and "manifest.json" in str(restored.value)
    assert key in str(restored.value.key), restored.value
    assert_same_state(everything(live), before)
    with pytest.raises(ckpt.CorruptCheckpointError) as verified:
        mgr.verify(STEP)
    assert key in str(verified.value.key), verified.value


def test_enough_distinct_malformations():
    assert len({c[0] for c in MALFORMED}) == len(MALFORMED) >= 40


def test_the_valid_checkpoint_restores_and_verifies(saved):
    live = live_objects(2)
    mgr = ckpt.CheckpointManager(saved)
    mgr.verify(STEP)
    _restore_all(mgr, live)
    expected = live_objects(1)
    for name in ("model", "optimizer", "scheduler", "scaler"):
        assert_same_state(live[name].state_dict(), expected[name].state_dict())
    assert live["sampler"].position == expected["sampler"].position
    assert_same_state(live["packed"], expected["packed"])


# Well-formed checkpoints that do not fit the live objects: refused, nothing changes,
# and verify() finds nothing wrong with the checkpoint itself.
INCOMPATIBLE = [
    ("module-key-missing", _delete(lambda d: _state(d, "model"), "0.bias"), "model"),
    ("opt-lr-str", _set(_group, "lr", "fast"), "optimizer.param_groups[0]['lr']"),
    (
        "opt-betas-three",
        _set(_group, "betas", {"$tuple": [0.9, 0.99, 0.9]}),
        "optimizer.param_groups[0]['betas']",
    ),
    ("opt-amsgrad-int", _set(_group, "amsgrad", 0), "optimizer.param_groups[0]['amsgrad']"),
    (
        "opt-class-sgd",
        _set(lambda d: _item(d, "optimizer"), "class", "torch.optim.sgd.SGD"),
        "optimizer",
    ),
    (
        "scheduler-last-epoch-str",
        _set(lambda d: _state(d, "scheduler"), "last_epoch", "3"),
        "scheduler['last_epoch']",
    ),
    ("scheduler-extra-key", _set(lambda d: _state(d, "scheduler"), "junk", 1), "scheduler"),
    ("sampler-other-size", _sampler("size", 12), "sampler"),
    ("kind-swapped", _set(lambda d: _item(d, "extra"), "kind", "module"), "extra"),
]


@pytest.mark.parametrize(
    ("edit", "key"), [c[1:] for c in INCOMPATIBLE], ids=[c[0] for c in INCOMPATIBLE]
)
def test_a_state_that_does_not_fit_is_refused_before_anything_changes(saved, tmp_path, edit, key):
    root = tmp_path / "root"
    shutil.copytree(saved, root)
    manifest = root / step_dir_name(STEP) / MANIFEST_NAME
    doc = read_manifest_doc(manifest)
    edit(doc)
    write_manifest(manifest, doc)
    live = live_objects(2)
    before = everything(live)
    with pytest.raises(ckpt.CheckpointError) as restored:
        _restore_all(ckpt.CheckpointManager(root), live)
    assert key in str(restored.value.key), restored.value
    assert_same_state(everything(live), before)


def test_a_reference_to_a_pack_is_corruption_for_read_too(saved, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(saved, root)
    manifest = root / step_dir_name(STEP) / MANIFEST_NAME
    doc = read_manifest_doc(manifest)
    _state(doc, "packed")["t5"] = _tensor_ref("packed/#pack")
    write_manifest(manifest, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="refers to the pack") as info:
        ckpt.CheckpointManager(root).read(STEP)
    assert info.value.key == "packed['t5']"


def test_asgd_eta_beyond_float64_is_refused_before_anything_changes(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.ASGD(model.parameters(), t0=1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    with ckpt.CheckpointManager(tmp_path) as mgr:
        mgr.save(0, model=model, optimizer=optimizer, rng=False)
    manifest = tmp_path / step_dir_name(0) / MANIFEST_NAME
    doc = read_manifest_doc(manifest)
    _param_state(doc)["eta"] = 10**400
    write_manifest(manifest, doc)
    live_model = torch.nn.Linear(2, 2)
    live_opt = torch.optim.ASGD(live_model.parameters(), t0=1)
    before = copy.deepcopy((live_model.state_dict(), live_opt.state_dict()))
    mgr = ckpt.CheckpointManager(tmp_path)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        mgr.restore(model=live_model, optimizer=live_opt, rng=False)
    assert "optimizer.state[0]['eta']" in str(info.value.key)
    assert_same_state((live_model.state_dict(), live_opt.state_dict()), before)
    with pytest.raises(ckpt.CorruptCheckpointError, match="float64"):
        mgr.verify(0)


@pytest.mark.parametrize("dtype", ["qint32", "complex32", "bits16"])
def test_a_dtype_ckpt_never_writes_is_corruption_for_read_too(saved, tmp_path, dtype):
    root = tmp_path / "root"
    shutil.copytree(saved, root)
    manifest = root / step_dir_name(STEP) / MANIFEST_NAME
    doc = read_manifest_doc(manifest)
    _packed_dtype(dtype, 4 if dtype == "bits16" else 2)(doc)
    write_manifest(manifest, doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match="never writes") as info:
        ckpt.CheckpointManager(root).read(STEP)
    assert info.value.key == "packed/t3"
    with pytest.raises(ckpt.CorruptCheckpointError, match="never writes"):
        ckpt.CheckpointReader(root).read(STEP, verify=False)
