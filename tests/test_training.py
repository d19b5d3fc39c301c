"""Training: every objective x granularity learns on tiny models and folds exactly; checkpoints hold
only coefficients; data order is sharded for DDP and resumable; kill -9 + resume and 2-process DDP
end where an uninterrupted single-process run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from tiny import ROWS, build_module, quiet_trainer, tiny_parts, write_zoo

from adamerge.checkpointing import AtomicCheckpointIO, checkpoint_callbacks
from adamerge.data import Collator
from adamerge.datamodule import TaskDataModule
from adamerge.training import NonFiniteLoss

TESTS = Path(__file__).parent
GRANULARITIES = {
    "task": {"name": "task"},
    "layer": {"name": "layer"},
    "block": {"name": "block", "partitions": 2},
    "chunk": {"name": "chunk", "chunks": {"*": 2}},
    "column": {"name": "column"},
}
# objective config and Adam lr; align and dam take gentler steps (their minimum is nearer the init),
# align's coefficient regularizer is kept small so that 6 steps of it never outweigh the KL's gain
OBJECTIVES = {
    "entropy": ({"name": "entropy", "positions": "last"}, 0.05),
    "entropy-generated": ({"name": "entropy", "positions": "generated", "new_tokens": 4}, 0.05),
    "align": ({"name": "align", "positions": "last", "coef_reg": 0.01}, 0.02),
    "align-generated": ({"name": "align", "positions": "generated", "new_tokens": 4, "coef_reg": 0.01}, 0.02),
    "dam": ({"name": "dam", "positions": "last"}, 0.02),
    "dam-generated": ({"name": "dam", "positions": "generated", "new_tokens": 4}, 0.02),
    "ce": ({"name": "ce"}, 0.05),
}
CASES = [(o, g) for o in ("entropy", "entropy-generated", "align", "dam", "ce") for g in GRANULARITIES]
CASES += [("align-generated", "layer"), ("dam-generated", "column")]
STEPS = 6
INIT = 0.3


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@torch.no_grad()
def objective_value(module, data) -> float:
    """The full objective (every task's whole calibration set + regularizer) at the current coefficients."""
    total = 0.0
    for task in data.datasets:
        batch = next(iter(data.loader(task, shuffle=False)))
        total += float(module.objective.task_loss(module.merged, task, batch))
    reg = module.objective.regularizer(module.merged)
    return total + (float(reg) if reg is not None else 0.0)


@torch.no_grad()
def fold_gap(merged, data) -> float:
    folded = merged.fold()
    batch = next(iter(data.loader(merged.experts[0], shuffle=False)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return (folded(**inputs).logits - merged(**inputs).logits).abs().max().item()


@pytest.mark.parametrize(("objective", "granularity"), CASES)
def test_objective_trains_with_granularity(parts, objective, granularity):
    cfg, lr = OBJECTIVES[objective]
    merged, data, module = build_module(parts, GRANULARITIES[granularity], cfg, optim={"lr": lr})
    before = objective_value(module, data)
    trainer = quiet_trainer(STEPS)
    trainer.fit(module, datamodule=data)

    after = objective_value(module, data)
    assert after < before, f"{objective}/{granularity}: objective {before:.5f} -> {after:.5f}"
    moved = max((c - INIT).abs().max().item() for c in merged.granularity.table().values())
    assert moved > 1e-3, f"coefficients stayed at init (max move {moved:.2e})"
    assert set(module.trainable()) == {f"merged.granularity.raw.{k}" for k in merged.granularity.raw}
    assert fold_gap(merged, data) <= 1e-5

    logged = set(trainer.logged_metrics)
    expected = {"loss", *(f"loss/{t}" for t in merged.experts)}
    expected |= {f"coef/{t}/{s}" for t in merged.experts for s in ("mean", "std")}
    if cfg["name"] in ("align", "dam"):
        expected.add("loss/regularizer")
    assert expected <= logged


def test_task_weights_scale_each_task_loss(parts):
    _, data, module = build_module(parts, {"name": "layer"}, {"name": "entropy", "task_weights": {"add": 3.0}})
    batch = {t: next(iter(data.loader(t, shuffle=False))) for t in data.datasets}
    with torch.no_grad():
        parts_ = {t: float(module.objective.task_loss(module.merged, t, b)) for t, b in batch.items()}
        total = float(module.training_step(batch, 0))
    assert total == pytest.approx(3.0 * parts_["add"] + parts_["rev"], rel=1e-6)


@pytest.mark.parametrize("objective", ["entropy-generated", "align"])
def test_a_step_merges_once_for_all_tasks_with_the_same_gradient(parts, objective, monkeypatch):
    import adamerge.merged

    _, data, module = build_module(parts, {"name": "layer"}, OBJECTIVES[objective][0])
    batch = {t: next(iter(data.loader(t, shuffle=False))) for t in data.datasets}
    coefficients = list(module.merged.granularity.raw.values())
    per_task = torch.zeros(())
    for task, task_batch in batch.items():  # without merge_once: one merge per task
        with module.merged.task(task):
            per_task = per_task + module.objective.task_loss(module.merged, task, task_batch)
    expected = torch.autograd.grad(per_task, coefficients)

    merges = []
    merge_tensor = adamerge.merged.merge_tensor
    monkeypatch.setattr(adamerge.merged, "merge_tensor", lambda *a: merges.append(1) or merge_tensor(*a))
    total = module.training_step(batch, 0)
    assert len(merges) == len(module.merged.names)  # one reduction per tensor, for both tasks
    assert float(total) == pytest.approx(float(per_task), rel=1e-6)
    for got, want in zip(torch.autograd.grad(total, coefficients), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_nonfinite_loss_stops_training(parts):
    merged, data, module = build_module(parts, {"name": "task"}, {"name": "entropy"})
    with torch.no_grad():
        merged.granularity.raw["task"].fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="the loss became nan at step 0"):
        quiet_trainer(2).fit(module, datamodule=data)


# ---- data order: sharded, epoch-seeded, resumable ---------------------------------------------------


def datamodule(shuffle: bool, world: int = 1, rank: int = 0, batch_size: int = 2) -> TaskDataModule:
    rows = {"add": [{"prompt": f"add {i}="} for i in range(8)], "rev": [{"prompt": f"rev {i}="} for i in range(4)]}
    from adamerge.zoo.tokenizer import char_tokenizer

    data = TaskDataModule(rows, Collator(char_tokenizer()), batch_size=batch_size, shuffle=shuffle, seed=0)
    data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return data


def epoch_indices(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_split_the_single_process_batches(shuffle):
    single = epoch_indices(datamodule(shuffle, batch_size=4).train_loader("add"), epoch=1)
    ranks = [epoch_indices(datamodule(shuffle, 2, r, batch_size=2).train_loader("add"), epoch=1) for r in (0, 1)]
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])
    if not shuffle:
        assert ranks[0] == [[0, 2], [4, 6]] and ranks[1] == [[1, 3], [5, 7]]


def test_shuffled_order_depends_on_seed_and_epoch_only():
    a, b = datamodule(True).train_loader("add"), datamodule(True).train_loader("add")
    assert epoch_indices(a, 0) != epoch_indices(a, 1)
    assert epoch_indices(a, 1) == epoch_indices(b, 1)  # no hidden generator state from epoch 0
    assert epoch_indices(a, 0) == epoch_indices(b, 0)


def test_train_loader_resumes_mid_epoch():
    loader = datamodule(True).train_loader("add")
    full = epoch_indices(loader, 3)
    loader.sampler.set_epoch(3)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    fresh = datamodule(True).train_loader("add")
    fresh.load_state_dict(state)
    assert epoch_indices(fresh, 3) == full[2:]
    assert epoch_indices(fresh, 3) == full  # the skip applies to the resumed pass only
    fresh.load_state_dict(state)
    assert epoch_indices(fresh, 4) == epoch_indices(loader, 4)  # a finished epoch is not skipped into


class StopAt(pl.Callback):
    """Stop training after step ``step`` (its checkpoint is written first: ModelCheckpoint runs last)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resume_in_process_matches_uninterrupted(parts, tmp_path):
    """5 steps = 2 steps, checkpoint (mid-epoch, shuffled data, cosine schedule), resume for 3."""
    optim = {"lr": 0.05, "schedule": "cosine"}

    def trained(ckpt: Path | None = None, stop_at: int | None = None):
        merged, data, module = build_module(parts, {"name": "layer"}, {"name": "entropy"}, optim,
                                            batch_size=ROWS // 4, shuffle=True)
        kwargs = {}
        if stop_at is not None:
            kwargs = dict(callbacks=[*checkpoint_callbacks(tmp_path, 1), StopAt(stop_at)],
                          plugins=[AtomicCheckpointIO()], enable_checkpointing=True)
        quiet_trainer(5, **kwargs).fit(module, datamodule=data, ckpt_path=ckpt)
        return merged.granularity.table()

    full = trained()
    trained(stop_at=2)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    resumed = trained(ckpt=ckpt)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_checkpoint_holds_only_coefficients(parts, tmp_path):
    merged, data, module = build_module(parts, {"name": "column"}, {"name": "align", "positions": "last"})
    trainer = quiet_trainer(2, callbacks=checkpoint_callbacks(tmp_path, 1), plugins=[AtomicCheckpointIO()],
                            enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    raw = {f"merged.granularity.raw.{k}": p for k, p in merged.granularity.raw.items()}
    assert set(ckpt["state_dict"]) == set(raw)
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(value, raw[name].detach())
    (optimizer,) = ckpt["optimizer_states"]
    assert len(optimizer["state"]) == len(raw)
    saved = sum(t.numel() for t in ckpt["state_dict"].values())
    assert saved == sum(p.numel() for p in raw.values()) < sum(p.numel() for p in merged.base.parameters())


# ---- subprocesses: kill -9 and resume; DDP on CPU ----------------------------------------------------


@pytest.fixture(scope="module")
def zoo16(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo16"), rows=2 * ROWS)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_", "LOCAL_RANK", "RANK"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def script(run_dir: Path, overrides: list[str], *flags: str) -> subprocess.Popen:
    """``tests/tiny.py``: adamerge.run.run in a fresh process, output in run_dir/merged."""
    cmd = [sys.executable, str(TESTS / "tiny.py"), *flags, str(run_dir), *overrides, f"output_dir={run_dir / 'merged'}"]
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.txt", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=run_dir)


def finished(proc: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout=timeout) == 0, (run_dir / "log.txt").read_text()[-3000:]


def coefficients(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adamerge_coefficients.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(zoo16, tmp_path):
    """SIGKILL after the step-3 checkpoint (mid-epoch: 2 batches per epoch, shuffled), resume, finish at 6."""
    overrides = [*zoo16.cli_args(), "trainer.max_steps=6", "data.batch_size=8", "optim.lr=0.05",
                 "optim.schedule=cosine", "checkpoint.every_n_steps=1", "logger=none",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    full = script(tmp_path / "full", overrides)
    killed = script(tmp_path / "killed", overrides, "--pause-at", "3")
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "paused").exists():
        assert killed.poll() is None, (tmp_path / "killed" / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "merged").exists()

    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 3
    assert state["state_dict"] and all(k.startswith("merged.granularity.raw.") for k in state["state_dict"])

    resumed = script(tmp_path / "resumed", [*overrides, f"resume={ckpt}"])
    finished(full, tmp_path / "full")
    finished(resumed, tmp_path / "resumed")
    a, b = coefficients(tmp_path / "full" / "merged"), coefficients(tmp_path / "resumed" / "merged")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())
    assert all((v - INIT).abs().max() > 1e-3 for v in a.values())


def cli(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adamerge", *overrides, f"hydra.run.dir={run_dir}",
           f"output_dir={run_dir / 'merged'}"]
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=run_dir.parent)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(zoo16, tmp_path):
    """``trainer.strategy=ddp trainer.devices=2`` at data.batch_size=4 ends where one process at 8
    ends: ranks take interleaved shards of the same (seed, epoch) order, gradients are averaged."""
    common = [*zoo16.cli_args(), "method=adamerging_layer", "trainer.accumulate_grad_batches=1", "trainer.max_steps=4",
              "trainer.accelerator=cpu", "optim.lr=0.05", "logger=none", "trainer.enable_progress_bar=false",
              "trainer.enable_checkpointing=false"]
    single = cli(tmp_path / "single", [*common, "data.batch_size=8"])
    ddp = cli(tmp_path / "ddp", [*common, "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp",
                                 "verbose=true"])  # Lightning's info lines say how many processes started
    for name, proc in (("single", single), ("ddp", ddp)):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert "Starting with 2 processes" in (tmp_path / "ddp.log").read_text() or \
        "MEMBER: 2/2" in (tmp_path / "ddp.log").read_text()
    a, b = coefficients(tmp_path / "single" / "merged"), coefficients(tmp_path / "ddp" / "merged")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert all((v - INIT).abs().max() > 1e-3 for v in a.values())
