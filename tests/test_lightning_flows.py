"""Lightning flows with ckpt's CheckpointIO: load_from_checkpoint, async top-k, hparams."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import ckpt  # noqa: E402
from ckpt.integrations import lightning as integration  # noqa: E402
from ckpt.integrations.lightning import CheckpointIO  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\).* is deprecated"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed from"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before"),
]


class Small(L.LightningModule):
    def __init__(self, lr: float = 0.1, extra: Any = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen))
        return DataLoader(data, batch_size=4)


def _trainer(root: Path, plugin: Any, max_steps: int, callbacks: Any = None) -> Any:
    return L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        plugins=[plugin],
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )


def test_load_from_checkpoint_reads_what_the_plugin_wrote(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, CheckpointIO(), 2)
    model = Small(lr=0.3, extra=(1, "a"))
    trainer.fit(model)
    path = tmp_path / "with space" / "model.ckpt"
    trainer.save_checkpoint(path)
    assert path.is_dir()
    loaded = Small.load_from_checkpoint(path)
    assert loaded.hparams.lr == 0.3 and loaded.hparams.extra == (1, "a")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), name
    assert Small.load_from_checkpoint(str(path), map_location="cpu").hparams.lr == 0.3
    # a file torch.save wrote still goes to Lightning's own loader
    TorchCheckpointIO().save_checkpoint(
        trainer._checkpoint_connector.dump_checkpoint(), tmp_path / "t"
    )
    assert Small.load_from_checkpoint(tmp_path / "t", weights_only=False).hparams.lr == 0.3


def test_load_from_checkpoint_of_a_directory_not_lightnings_is_a_clear_error(
    tmp_path: Path,
) -> None:
    with ckpt.CheckpointManager(tmp_path / "plain") as manager:
        manager.save(1, model=nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointNotFoundError, match="not a Lightning checkpoint"):
        Small.load_from_checkpoint(tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        Small.load_from_checkpoint(tmp_path / "empty")


def test_save_weights_only_checkpoints_load_into_the_module(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    trainer = _trainer(tmp_path, CheckpointIO(), 2, [saver])
    model = Small()
    trainer.fit(model)
    state = CheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert "optimizer_states" not in state and "state_dict" in state
    loaded = Small.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded.net.weight, model.net.weight)


def test_a_removal_waits_for_the_save_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncCheckpointIO saves in a thread while ModelCheckpoint removes in the main one."""
    entered, go = threading.Event(), threading.Event()
    save = integration.CheckpointManager.save

    def slow_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        go.wait()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(integration.CheckpointManager, "save", slow_save)
    io, path, errors = CheckpointIO(), tmp_path / "epoch=0-step=1.ckpt", []

    def saving() -> None:
        try:
            io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
        except Exception as e:  # pragma: no cover - the failure this test guards against
            errors.append(e)

    saver = threading.Thread(target=saving)
    saver.start()
    assert entered.wait(60)
    remover = threading.Thread(target=io.remove_checkpoint, args=(path,))
    remover.start()
    remover.join(0.2)  # it waits for the save (without the wait it removes the save's files)
    go.set()
    saver.join(60)
    remover.join(60)
    assert not errors and not saver.is_alive() and not remover.is_alive()
    assert not path.exists()  # removed after the save, not under it


def _every_step(root: Path) -> Any:
    return ModelCheckpoint(
        dirpath=root, save_top_k=2, monitor="train_loss", save_last=True, every_n_train_steps=1
    )


def test_async_top_k_with_a_save_every_step(tmp_path: Path) -> None:
    first = _trainer(tmp_path, AsyncCheckpointIO(CheckpointIO()), 10, [_every_step(tmp_path)])
    first.fit(Small())
    state = CheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert state["global_step"] == 10
    for name in os.listdir(tmp_path):  # top 2 and last (and a loser whose queued save came late)
        assert CheckpointIO().load_checkpoint(tmp_path / name)["global_step"] >= 1
    resumed = _trainer(
        tmp_path / "r", AsyncCheckpointIO(CheckpointIO()), 12, [_every_step(tmp_path / "r")]
    )
    resumed.fit(Small(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 12


@pytest.mark.parametrize(
    "value",
    [argparse.Namespace(a=1), Path("/data"), {1, 2}, object()],
    ids=lambda v: type(v).__name__,
)
def test_hyper_parameters_pickle_would_need_fail_the_save_with_their_key(
    tmp_path: Path, value: Any
) -> None:
    trainer = _trainer(tmp_path, CheckpointIO(), 1)
    trainer.fit(Small())
    trainer.lightning_module.hparams["extra"] = value
    with pytest.raises(TypeError, match=r"\['hyper_parameters'\]\['extra'\].*ignore="):
        trainer.save_checkpoint(tmp_path / "h.ckpt")
    assert (
        not os.path.exists(tmp_path / "h.ckpt")
        or not ckpt.CheckpointReader(tmp_path / "h.ckpt").all_steps()
    )


def test_a_file_torch_save_wrote_is_refused_with_what_to_do(tmp_path: Path) -> None:
    TorchCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "old.ckpt")
    trainer = _trainer(tmp_path, CheckpointIO(), 2)
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"without this plugin.*convert it once"):
        trainer.fit(Small(), ckpt_path=tmp_path / "old.ckpt")


def on_ranks_rank_0_saves_alone(rank: int, world_size: int, root: str) -> int:
    """What Lightning's DDP strategy does: rank 0 saves and removes alone, every rank loads."""
    import torch.distributed as dist

    io, path = CheckpointIO(), os.path.join(root, "last.ckpt")
    if rank == 0:
        io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    dist.barrier()
    step = int(io.load_checkpoint(path)["global_step"])
    dist.barrier()
    if rank == 0:
        io.remove_checkpoint(path)
    return step


def test_in_a_process_group_rank_0_saves_alone(rank_pool: Any, tmp_path: Path) -> None:
    """Under strategy="ddp" a collective manager would wait for the other ranks at every save."""
    assert rank_pool.run(on_ranks_rank_0_saves_alone, str(tmp_path), timeout=90) == [3, 3]
    assert not (tmp_path / "last.ckpt").exists()


DDP_SCRIPT = """
import os, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from ckpt.integrations.lightning import CheckpointIO

class Small(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 2, generator=gen))
        return DataLoader(data, batch_size=4)

root, steps = sys.argv[1], int(sys.argv[2])
saver = ModelCheckpoint(dirpath=root, save_top_k=2, monitor="train_loss", save_last=True,
                        every_n_train_steps=2)
trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=2, strategy="ddp",
                    plugins=[CheckpointIO()], callbacks=[saver], logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Small(), ckpt_path=sys.argv[3] if len(sys.argv) > 3 else None)
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_saves_and_resumes(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    root = tmp_path / "checkpoints"
    for steps, resume in [(4, []), (6, [str(root / "last.ckpt")])]:
        subprocess.run(
            [sys.executable, str(script), str(root), str(steps), *resume],
            check=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert CheckpointIO().load_checkpoint(root / "last.ckpt")["global_step"] == steps


def test_switching_a_run_to_the_plugin(tmp_path: Path) -> None:
    """A run Lightning's default plugin checkpointed: convert its last.ckpt once, resume."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    _trainer(tmp_path, TorchCheckpointIO(), 4, [saver]).fit(Small())
    old, new = tmp_path / "last.ckpt", tmp_path / "converted.ckpt"
    state = TorchCheckpointIO().load_checkpoint(old, weights_only=False)
    CheckpointIO().save_checkpoint(state, new)
    # saving over the old file is refused, and the file is kept
    again = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    with pytest.raises(ckpt.CheckpointWriteError, match="a file is in the way"):
        _trainer(tmp_path, CheckpointIO(), 6, [again]).fit(Small(), ckpt_path=new)
    assert old.is_file()
    saver = ModelCheckpoint(dirpath=tmp_path / "run2", save_last=True, every_n_train_steps=2)
    resumed = _trainer(tmp_path, CheckpointIO(), 6, [saver])
    resumed.fit(Small(), ckpt_path=new)
    assert resumed.global_step == 6
    assert CheckpointIO().load_checkpoint(tmp_path / "run2" / "last.ckpt")["global_step"] == 6
