"""``pool.shard=true``: task-vector stacks split across ranks as DTensors (adamerge/sharding.py).

Two processes on CPU (gloo) train the tiny merge with sharded stacks and end where one process
with the same global batch ends: the same loss at every step, the same coefficients and the same
folded weights, within fp32 reduction-order tolerance, while each rank holds half of every stack
and backward holds one gathered weight at a time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sharded_worker import CASES, train
from tiny import build_module, quiet_trainer, tiny_parts, write_zoo

from adamerge.checks import check_before_loading
from adamerge.errors import AdamergeError
from adamerge.objectives import OBJECTIVES
from adamerge.plan import compose_config, make_plan
from adamerge.sharding import check_shard

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, ranks: int = 2) -> list[subprocess.Popen]:
    """One worker process per rank, joined as ``torchrun`` would join them (Lightning then launches nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_", "LOCAL_RANK", "RANK"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(ranks), NODE_RANK="0")
    procs = []
    for rank in range(ranks):
        with open(out / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(TESTS / "sharded_worker.py"), str(out)], cwd=out,
                                          env={**env, "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_two_sharded_ranks_match_one_process(tmp_path):
    procs = start_ranks(tmp_path)
    references = {case: train(case, ranks=1) for case in CASES}  # meanwhile, one process with the whole stacks
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == sorted(
        ["uneven.json", *(f"{case}.{ext}" for case in CASES for ext in ("json", "safetensors"))])  # rank 0 wrote
    uneven = json.loads((tmp_path / "uneven.json").read_text())
    assert uneven["rows_as_dtensor"] and uneven["merge_error"] < 1e-6 and uneven["grad_error"] < 1e-5, uneven
    for case, (single, single_tensors) in references.items():
        sharded = json.loads((tmp_path / f"{case}.json").read_text())
        tensors = load_file(str(tmp_path / f"{case}.safetensors"))
        assert sharded["whole_bytes"] == single["whole_bytes"]
        assert sharded["bytes_per_rank"] == [single["whole_bytes"] / 2] * 2, case  # each rank: half of every stack
        assert sharded["whole_stacks_while_training"] == 0
        assert (sharded["lora_tensors"] > 0) == CASES[case][3]  # LoRA factors: whole on every rank
        # backward gathers each saved weight again instead of keeping the whole merged model: one at a time
        assert 0 < sharded["gathered_backward_peak"] <= sharded["merged_bytes"] / 4, case
        torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-6,
                                   atol=2e-6, msg=case)
        assert tensors.keys() == single_tensors.keys()
        for name, value in single_tensors.items():
            tol = 5e-6 if name.startswith("coef.") else 1e-6  # coefficients: 4 Adam steps of reordered sums
            torch.testing.assert_close(tensors[name], value, rtol=0, atol=tol, msg=f"{case}: {name}")
        moved = max((v - v.flatten()[0]).abs().max() for k, v in single_tensors.items() if k.startswith("coef."))
        assert single["losses"][-1] < single["losses"][0] and moved > 1e-3, case  # trained: equality means something


def test_one_process_has_nothing_to_shard():
    """``pool.shard=true`` with a single process trains as without it."""
    parts = tiny_parts()
    merged, data, module = build_module(parts, {"name": "layer"}, {"name": "entropy"}, shard=True)
    quiet_trainer(2).fit(module, datamodule=data)
    assert not merged.sharded and merged.host is None
    assert all(b.numel() for b in merged.task_vectors.buffers())


def test_shard_refusals():
    parts = tiny_parts()
    with pytest.raises(AdamergeError, match="rewrites the task vectors"):
        build_module(parts, {"name": "layer"}, {"name": "projected"}, shard=True)
    objective = OBJECTIVES["entropy"](positions="generated")
    with pytest.raises(AdamergeError, match="recompute=true"):
        check_shard(objective, recompute=True, offload=False)
    with pytest.raises(AdamergeError, match="choose one"):
        check_shard(objective, recompute=False, offload=True)
    with pytest.raises(AdamergeError, match="trainer.strategy=ddp"):
        check_shard(objective, recompute=False, offload=False, strategy="fsdp")
    check_shard(objective, recompute=False, offload=False, strategy="auto")
    parts.task_vectors = parts.task_vectors.offload()
    with pytest.raises(AdamergeError, match="pool.offload=cpu"):
        build_module(parts, {"name": "layer"}, {"name": "entropy"}, shard=True)


@pytest.mark.parametrize(("overrides", "says"), [
    (["pool.offload=cpu"], "choose one"),
    (["method=doge"], "rewrites the task vectors"),
    (["trainer.strategy=fsdp"], "trainer.strategy=ddp"),
])
def test_a_run_refuses_before_loading(tmp_path, overrides, says):
    config = compose_config(["pool.base=base", "pool.experts.a=a", "pool.experts.b=b", "pool.shard=true", *overrides])
    with pytest.raises(AdamergeError, match=says):
        check_before_loading(config, tmp_path)


def test_plan_puts_half_of_every_stack_on_each_rank(tmp_path):
    """``adamerge plan``: the device holds 1/N of the stacks (what the 2-process test measures per rank), while
    each of the node's N processes builds them whole in host memory first."""
    args = [*write_zoo(tmp_path / "zoo").cli_args(), "trainer.accelerator=cpu"]
    whole = make_plan(compose_config(args)).parts["stacks"]
    plan = make_plan(compose_config([*args, "pool.shard=true", "trainer.devices=2"]))
    line = next(x for x in plan.lines if x.component == "task vectors")
    assert line.device == whole // 2 and line.host == 2 * whole


@pytest.mark.slow
def test_cli_sharded_run_writes_what_a_ddp_run_writes(tmp_path):
    """``python -m adamerge ... pool.shard=true trainer.devices=2`` end to end (rank 0 writes): the same
    coefficients and folded checkpoint as without ``pool.shard``."""
    from test_training import cli, coefficients
    from tiny import ROWS, write_zoo

    zoo = write_zoo(tmp_path / "zoo", rows=2 * ROWS)
    common = [*zoo.cli_args(), "method=adamerging_layer", "trainer.max_steps=4", "trainer.accelerator=cpu",
              "optim.lr=0.05", "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false",
              "data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp"]
    runs = {"ddp": cli(tmp_path / "ddp", common), "shard": cli(tmp_path / "shard", [*common, "pool.shard=true"])}
    for name, proc in runs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert "pool.shard: rank 0 of 2 holds" in (tmp_path / "shard.log").read_text()
    for read in (coefficients, lambda out: load_file(str(out / "model.safetensors"))):
        a, b = read(tmp_path / "ddp" / "merged"), read(tmp_path / "shard" / "merged")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
