"""``python -m adamerge`` as a user runs it (a subprocess, cwd in tmp_path): bring-your-own models,
the folded checkpoint, static merges, sweeps, loggers, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import write_zoo

from adamerge import ExpertPool, Layer, MergedModel

QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_", "LOCAL_RANK"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adamerge", *args], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def adamerge(args: list[str], cwd: Path, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = finish(start(args, cwd, **env))
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@torch.no_grad()
def logits(model, text: str = "add 12+7=") -> torch.Tensor:
    from adamerge.zoo.tokenizer import char_tokenizer

    return model(**char_tokenizer()(text, return_tensors="pt")).logits


def test_single_run_writes_a_plain_checkpoint(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    adamerge([*zoo.cli_args(), "method=adamerging_layer", "trainer.accumulate_grad_batches=1", "data.batch_size=8",
              "trainer.max_steps=3", "trainer.log_every_n_steps=1", "optim.lr=0.05",
              "trainer.enable_progress_bar=false", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"],
             cwd=tmp_path)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "adamerge_coefficients.safetensors", "adamerge_config.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    front = (out / "README.md").read_text().split("---")[1]
    card = yaml.safe_load(front)
    assert card["base_model_relation"] == "merge" and "base_model" not in card  # a local path is no hub id
    assert {"adamerge", "merge"} <= set(card["tags"])
    config = yaml.safe_load((out / "adamerge_config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 3 and config["pool"]["experts"] == {k: str(v) for k, v in
                                                                                    zoo.experts.items()}
    json.loads((out / "metrics.json").read_text())

    folded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of adamerge
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"

    # the fold is the merge of the saved coefficients, and they moved from the init
    coefficients = load_file(str(out / "adamerge_coefficients.safetensors"))
    assert any((c - 0.3).abs().max() > 1e-3 for c in coefficients.values())
    pool = ExpertPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()})
    merged = MergedModel(pool.base, pool.task_vectors(), Layer())
    merged.granularity.load_table(coefficients)
    assert (logits(folded) - logits(merged)).abs().max() <= 1e-5

    # the default logger is csv: losses and coefficient stats of every step
    (metrics_csv,) = (tmp_path / "run").glob("logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    assert len(rows) == 3
    assert {"loss", "loss/add", "loss/rev", "coef/add/mean", "coef/rev/std"} <= set(rows[0])
    assert (tmp_path / "run" / "result.json").is_file()


def test_zero_steps_is_task_arithmetic(zoo, tmp_path):
    out = tmp_path / "merged"
    adamerge([*zoo.cli_args(), "method=task_arithmetic", *QUIET,
              f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    w0, merged = tensors(zoo.base), tensors(out)
    experts = [tensors(path) for path in zoo.experts.values()]
    assert merged.keys() == w0.keys()
    for name, w in w0.items():
        expected = w + 0.3 * sum(e[name] - w for e in experts)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_multirun_runs_every_combination_and_summarizes(zoo, tmp_path):
    sweep = tmp_path / "sweep"
    tests = [f"eval.tests.{name}={path}" for name, path in zoo.data.items()] + ["eval.max_new_tokens=2"]
    adamerge(["-m", "granularity=task,layer", "objective=entropy,align", *zoo.cli_args(), *tests,
              "trainer.max_steps=2", "objective.new_tokens=2", "logger=tensorboard",
              "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "ok"
        assert (job / "merged" / "model.safetensors").is_file()
        assert list(job.glob("logs/version_*/events.out.tfevents.*")), f"no tensorboard events in {job}"
        config = yaml.safe_load((job / "merged" / "adamerge_config.yaml").read_text())
        seen.add((config["granularity"]["name"], config["objective"]["name"]))
    assert seen == {(g, o) for g in ("task", "layer") for o in ("entropy", "align")}

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {"avg", "add", "rev", "seconds", "overrides"} <= set(rows[0])
    averages = [float(r["avg"]) for r in rows]
    assert averages == sorted(averages, reverse=True) and all(float(r["seconds"]) > 0 for r in rows)
    for row in rows:  # each row's scores are its job's own
        job = json.loads((sweep / row["job"] / "result.json").read_text())
        assert float(row["avg"]) == round(100 * job["metrics"]["after"]["avg"], 1)
        assert row["overrides"] == " ".join(job["overrides"])
    assert len((sweep / "summary.md").read_text().strip().splitlines()) == 2 + 4


# ---- bad input: non-zero exit, one clear line, nothing written ---------------------------------------


@pytest.fixture(scope="module")
def failures(zoo, tmp_path_factory):
    """Every bad-input case, started at once (each is its own process) and collected by name."""
    root = tmp_path_factory.mktemp("failures")
    full = root / "full_output"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    cases = {
        "misspelled key": ["granularity.int=0.5"],
        "unknown granularity": ["granularity=rows"],
        "unknown objective": ["objective=perplexity"],
        "missing expert": [f"pool.experts.rev={root / 'no_such_expert'}"],
        # the base does not exist either: the output_dir check must come first
        "non-empty output_dir": [f"pool.base={root / 'no_such_base'}", f"output_dir={full}"],
    }
    procs = {}
    for name, args in cases.items():
        cwd = root / name.replace(" ", "_")
        cwd.mkdir()
        defaults = [f"output_dir={cwd / 'merged'}", f"hydra.run.dir={cwd / 'run'}", "trainer.max_steps=1", *QUIET]
        overridden = {a.split("=", 1)[0] for a in args}
        base_args = [a for a in zoo.cli_args() if a.split("=", 1)[0] not in overridden]  # no key twice
        procs[name] = (cwd, start([*base_args, *defaults, *args], cwd))
    return {name: (cwd, finish(proc)) for name, (cwd, proc) in procs.items()}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("adamerge: error:")]


def test_misspelled_key_is_named(failures):
    _, result = failures["misspelled key"]
    assert result.returncode != 0
    assert "granularity.int" in result.stderr


@pytest.mark.parametrize(("case", "group", "value"), [("unknown granularity", "granularity", "rows"),
                                                      ("unknown objective", "objective", "perplexity")])
def test_unknown_component_is_refused(failures, case, group, value):
    cwd, result = failures[case]
    assert result.returncode != 0
    assert f"{group}/{value}" in result.stderr
    assert not (cwd / "merged").exists()


def test_missing_expert_is_one_line_and_writes_nothing(failures):
    cwd, result = failures["missing expert"]
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "no_such_expert" in line and "rev" in line
    assert "Traceback" not in result.stderr
    assert not (cwd / "merged").exists()
    assert not list(cwd.glob(".merged.tmp-*"))
    assert json.loads((cwd / "run" / "result.json").read_text())["status"] == "failed"


def test_non_empty_output_dir_is_refused_before_any_work(failures):
    cwd, result = failures["non-empty output_dir"]
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "full_output" in line and "overwrite=true" in line
    assert "no_such_base" not in result.stderr  # refused before the pool was even looked at
    full = cwd.parent / "full_output"
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert not (cwd / "run" / "logs").exists()
