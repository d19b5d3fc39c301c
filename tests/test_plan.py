"""``adamerge plan``: its figures against what a run really holds.

Exact where the plan counts tensors (the base, the task-vector stacks and LoRA factors, the coefficients, a
cached teacher whose rows are all cut to ``max_length``, DOGE's state); within a stated factor where it
estimates (what backward keeps for a step; the peak RSS growth of a whole run in a fresh fork). A hub id is
planned offline from a cache that holds nothing but its ``config.json``. The SLURM launcher composes.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from adamerge.errors import AdamergeError
from adamerge.plan import build_granularity, compose_config, make_plan, parse_size

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "data" / "zoo"
TASKS = ("rev", "sort")


def zoo_overrides(kind: str = "experts", *extra: str) -> list[str]:
    """A run on the shipped zoo: two experts (full or LoRA), their calibration data, nothing written."""
    args = [f"pool.base={ZOO / 'base'}", "output_dir=null", "logger=none", "trainer.accelerator=cpu"]
    args += [f"pool.experts.{t}={ZOO / kind / t}" for t in TASKS]
    args += [f"data.paths.{t}={ZOO / 'data' / t / 'calib.jsonl'}" for t in TASKS]
    return [*args, *extra]


def stored_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one batch tensor count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size(None) is None and parse_size(1000) == 1000
    with pytest.raises(AdamergeError, match="not a size"):
        parse_size("80 parsecs")


def test_a_missing_base_is_one_line_before_anything_loads(tmp_path):
    with pytest.raises(AdamergeError, match="base: path .* does not exist"):
        make_plan({"pool": {"base": str(tmp_path / "nowhere"), "experts": {"a": str(tmp_path / "a")}}})


@pytest.mark.parametrize("kind, extra", [
    ("experts", ["granularity=layer"]),
    ("experts", ["granularity=chunk", "granularity.chunks={model*:4,lm*:4}", "pool.tv_dtype=bfloat16"]),
    ("lora", ["granularity=column"]),  # column coefficients scale one factor: the factors stay
    ("lora", ["granularity=block", "granularity.partitions=3"]),  # random partitions: densified
    ("lora", ["method=concrete_adamerging", "granularity.mask.kind=per_task"]),  # elementwise mask: densified
])
def test_tensor_figures_equal_the_loaded_ones(kind, extra):
    from adamerge.loading import build_pool, raw_task_vectors
    from adamerge.merged import MergedModel

    config = compose_config(zoo_overrides(kind, "trainer.max_steps=0", *extra))
    plan = make_plan(config)
    pool = build_pool(config["pool"])
    merged = MergedModel(pool.base, raw_task_vectors(pool, config["pool"]),
                         build_granularity(config["granularity"])[0])
    assert plan.parts["base"] == sum(p.numel() * p.element_size() for p in pool.base.parameters())
    assert plan.parts["stacks"] == stored_bytes(merged.task_vectors.buffers())
    assert plan.parts["factors"] == stored_bytes(merged.lora.buffers())
    assert (plan.parts["factors"] > 0) == (extra == ["granularity=column"])
    assert plan.parts["coefficients"] == sum(p.numel() for p in merged.granularity.raw.values())
    mask = merged.granularity.mask
    assert plan.parts["mask_logits"] == (sum(p.numel() for p in mask.logits.values()) if mask else 0)


def test_cached_teacher_equals_the_cache_held(tmp_path):
    from adamerge.building import build_datamodule
    from adamerge.loading import build_pool, build_tokenizer, raw_task_vectors
    from adamerge.merged import MergedModel
    from adamerge.objectives import Align

    # rows are 9-12 tokens: max_length=6 cuts every one to 6, so the plan's token-id bound is exact
    config = compose_config(zoo_overrides("lora", "objective=align", "objective.positions=last", "objective.top_k=8",
                                          "objective.hidden_weight=1.0", "data.limit=24", "data.max_length=6",
                                          "data.batch_size=8"))
    rows = {t: [json.loads(line) for line in (ZOO / "data" / t / "calib.jsonl").read_text().splitlines()][:24]
            for t in TASKS}
    pool = build_pool(config["pool"])
    merged = MergedModel(pool.base, raw_task_vectors(pool, config["pool"]),
                         build_granularity(config["granularity"])[0])
    tokenizer = build_tokenizer(pool)
    objective = Align(**{k: v for k, v in config["objective"].items() if k != "name"})
    data = build_datamodule(config["data"], rows, tokenizer, objective, True, 0, 64, tokenizer.bos_token_id)
    objective.setup(merged, data, tokenizer)
    held = [t for task in objective.cache.values() for r in task for t in (r.ids, r.top_values, r.top_indices,
                                                                             r.hidden)]
    assert make_plan(config, {t: len(r) for t, r in rows.items()}).parts["teacher_cache"] == stored_bytes(held)


def test_activation_estimate_is_within_a_factor_of_two_of_what_backward_keeps():
    """Saved-tensor hooks see every tensor autograd keeps for backward (the merged weights counted apart):
    a deterministic measure, unlike RSS. The per-layer constants are an estimate: a factor of 2 either way."""
    from adamerge.building import build_datamodule
    from adamerge.loading import build_pool, build_tokenizer, raw_task_vectors
    from adamerge.merged import MergedModel
    from adamerge.objectives import Entropy

    config = compose_config(zoo_overrides("experts", "objective=entropy", "objective.positions=last",
                                          "data.max_length=6", "data.batch_size=16", "trainer.max_steps=1"))
    rows = {t: [json.loads(line) for line in (ZOO / "data" / t / "calib.jsonl").read_text().splitlines()][:16]
            for t in TASKS}
    pool = build_pool(config["pool"])
    merged = MergedModel(pool.base, raw_task_vectors(pool, config["pool"]),
                         build_granularity(config["granularity"])[0])
    tokenizer = build_tokenizer(pool)
    objective = Entropy(positions="last")
    objective.setup(merged, None, tokenizer)
    data = build_datamodule(config["data"], rows, tokenizer, objective, True, 0, 64, tokenizer.bos_token_id)
    frozen = {t.untyped_storage().data_ptr() for t in [*merged.parameters(), *merged.buffers()]}
    saved: dict[int, int] = {}
    merged_weights: set[int] = set()

    def keep(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen and ptr not in merged_weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    merged.train(False)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), merged.merge_once():
        merged_weights.update(w.untyped_storage().data_ptr() for w in merged._shared.values())
        total = sum(objective.task_loss(merged, t, next(iter(data.loader(t, shuffle=False)))) for t in TASKS)
    total.backward()
    estimate, measured = make_plan(config).parts["activations"], sum(saved.values())
    assert 0.5 * measured <= estimate <= 2 * measured, (estimate, measured)


# ---- a whole run: peak RSS growth in a fresh fork -------------------------------------------------------------

def write_llama(root: Path, experts: int) -> dict[str, Path]:
    """A ~21M-parameter Llama (82 MiB fp32) and ``experts`` perturbed copies, with the zoo's char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamerge.zoo.tokenizer import char_tokenizer

    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    paths = {}
    for k in range(experts):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(1e-3)
        base.save_pretrained(root / f"e{k}")
        paths[f"e{k}"] = root / f"e{k}"
        (root / f"e{k}.jsonl").write_text("".join(json.dumps({"prompt": f"rev {'ab' * (i % 5 + 3)}="}) + "\n"
                                                  for i in range(8)))
    return paths


def rss_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def measure_run(config: dict, run_dir: Path, out) -> None:
    """In the fork: fixed malloc mmap threshold (freed blocks go back at once), peak reset, the run, the growth."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    from adamerge.run import run

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_kib("VmRSS")
    run(config, run_dir)
    out.send((rss_kib("VmHWM") - before) * 1024)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_of_a_real_run_is_within_the_plan(tmp_path):
    """Tolerance: -15% .. +15% of the plan's peak, plus 100 MiB for what the plan leaves out (tokenizer,
    Lightning's trainer, Python objects, allocator slack: 30-100 MiB in runs of this and a half-size model).
    RSS is what a shared machine measures robustly once the allocator returns freed blocks (fixed mmap
    threshold) and the peak is reset right before the run."""
    from adamerge.run import run  # noqa: F401  (imported before the fork: the child measures the run, not imports)

    experts = write_llama(tmp_path, 2)
    config = compose_config([f"pool.base={tmp_path / 'base'}", "output_dir=null", "logger=none",
                             "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                             "trainer.enable_checkpointing=false", "method=adamerging_layer",
                             "objective.positions=last", "granularity=layer", "data.batch_size=2", "data.max_length=16",
                             *[f"pool.experts.{e}={p}" for e, p in experts.items()],
                             *[f"data.paths.{e}={tmp_path / (e + '.jsonl')}" for e in experts]])
    plan = make_plan(config)
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=measure_run, args=(config, tmp_path / "run", send))
    child.start()
    child.join(300)
    assert child.exitcode == 0
    grown = receive.recv()
    mib = {"measured": grown / 2**20, "plan": plan.peak / 2**20}
    assert 0.85 * plan.peak <= grown <= 1.15 * plan.peak + 100 * 2**20, mib


# ---- a hub id planned offline from a cache holding only its config.json --------------------------------------

def fake_hub_cache(root: Path, repo: str, config: dict) -> Path:
    """The HF cache layout: ``models--org--name/snapshots/<sha>/config.json`` and ``refs/main``; no weights."""
    sha = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / sha).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(sha)
    (folder / "snapshots" / sha / "config.json").write_text(json.dumps(config))
    return folder


def test_a_hub_id_is_planned_offline_from_its_config_alone(tmp_path, monkeypatch, capsys):
    """``python -m adamerge plan`` (its dispatch, in-process) with ``HF_HUB_OFFLINE=1`` and a hub cache that holds
    the three repos' ``config.json`` and nothing else: any request for weights would fail offline."""
    import huggingface_hub.constants

    from adamerge.__main__ import main

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "dtype": "bfloat16", "tie_word_embeddings": False}
    for repo in ("org/base-7b", "org/math-7b", "org/code-7b"):
        fake_hub_cache(tmp_path / "hub", repo, config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sys, "argv", ["adamerge", "plan", "pool.base=org/base-7b", "pool.experts.math=org/math-7b",
                                      "pool.experts.code=org/code-7b", "pool.tv_dtype=bfloat16",
                                      "trainer.accelerator=gpu", "plan.device_memory=80GB"])
    with pytest.raises(SystemExit) as exit_code:
        main()
    out, err = capsys.readouterr()
    assert exit_code.value.code == 0, err[-2000:]
    assert "7,241,732,096 parameters in bfloat16" in out  # Mistral-7B's count, from the config alone
    summary = out.strip().splitlines()[-1]
    # 13.5 GiB base + 27 GiB stacks + 2 x 13.5 GiB merged weights and their gradients + activations > 80 GB
    assert summary.startswith("plan: K=2, bfloat16") and summary.endswith("does NOT fit 74.5 GiB device")
    assert not any(p.suffix in (".safetensors", ".bin") for p in (tmp_path / "hub").rglob("*"))


# ---- SLURM sweeps: the launcher config composes with the run's own trainer settings --------------------------

def test_slurm_launcher_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")
    from hydra import compose, initialize_config_module

    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer.devices=4", "+trainer.num_nodes=2",
                                           "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu"


def test_doge_state_equals_what_the_objective_holds():
    from adamerge.loading import build_pool, raw_task_vectors
    from adamerge.merged import MergedModel
    from adamerge.objectives import Projected

    config = compose_config(zoo_overrides("experts", "method=doge", "trainer.max_steps=1"))
    pool = build_pool(config["pool"])
    merged = MergedModel(pool.base, raw_task_vectors(pool, config["pool"]), build_granularity(config["granularity"])[0])
    objective = Projected(**{k: v for k, v in config["objective"].items() if k != "name"})
    objective.setup(merged, None)
    deltas = 4 * (2 + 2) * sum(d.numel() for d in objective.deltas.values())  # value, grad, Adam's 2 moments
    held = deltas + stored_bytes([*objective.masks.values(), *objective.bases.values()])
    line = next(x for x in make_plan(config).lines if x.component.startswith("DOGE"))
    assert line.device == held
