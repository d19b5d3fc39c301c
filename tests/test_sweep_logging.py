"""What a run leaves for people to read: the terminal (quiet, a step bar, where output went), ``--help``,
the loggers (hyperparameters, losses, test metrics, heatmap; one W&B run per compared method), the
sweep summary, the heatmap's axes, and the README's Python API snippet and sweep example."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import adamerge
from tiny import write_zoo

from adamerge.plots import short_names, tensor_ticks
from adamerge.sweep import write_summary

README = Path(__file__).resolve().parents[1] / "README.md"
NOISE = ("GPU available", "TPU available", "Tip:", "eval mode", "Loading weights", "deprecated", "FutureWarning",
         "UserWarning")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_zoo(tmp_path_factory.mktemp("zoo"))


def eval_args(zoo) -> list[str]:
    return [f"eval.tests.{name}={path}" for name, path in zoo.data.items()] + ["eval.max_new_tokens=4"]


def test_help_says_what_adamerge_does(tmp_path):
    text = adamerge(["--help"], cwd=tmp_path).stdout
    assert text.startswith("adamerge: merge fine-tuned expert models") and "powered by Hydra" not in text
    assert re.search(r"^\s+fold\s", text, re.M)
    for group in ("granularity: ", "objective: ", "logger: ", "experiment: "):
        assert group in text
    assert len(re.findall(r"^\s+python -m adamerge (?!fold)", text, re.M)) >= 3
    assert len(text.splitlines()) < 60  # no config dump
    fold = adamerge(["fold", "--help"], cwd=tmp_path).stdout
    assert "OUTPUT_DIR" in fold and "RUN_DIR" not in fold


def test_a_run_prints_no_chatter_and_logs_everything_to_tensorboard(zoo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, out = tmp_path / "run", tmp_path / "merged"
    result = adamerge([*zoo.cli_args(), *eval_args(zoo), "granularity=layer", "trainer.max_steps=3",
                       "trainer.log_every_n_steps=1", "logger=tensorboard", "trainer.enable_progress_bar=true",
                       f"output_dir={out}", f"hydra.run.dir={run}"], cwd=tmp_path)
    printed = result.stdout + result.stderr
    assert not [n for n in NOISE if n in printed], printed
    assert "training" in printed and "3/3" in printed  # the step bar, with the right total
    assert result.stdout.strip().splitlines()[-1] == f"folded checkpoint: {out} (logs in {run})"

    (version,) = run.glob("logs/version_*")
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["granularity"]["name"] == "layer" and hparams["trainer"]["max_steps"] == 3
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "loss/add", "coef/rev/mean", "test/before/avg", "test/after/add", "test/after/avg"} <= scalars
    assert events.Tags()["images"] == ["coefficients/heatmap"]
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert events.Scalars("test/after/avg")[-1].value == pytest.approx(after["avg"])


def test_verbose_keeps_the_libraries_lines(monkeypatch):
    """``verbose=true`` leaves Lightning's info lines and the warnings alone; the default quiets them."""
    import logging
    import warnings

    from adamerge.terminal import quiet

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # restored after the test
    lightning = logging.getLogger("pytorch_lightning")
    monkeypatch.setattr(lightning, "level", logging.INFO)
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "WANDB_SILENT"):  # unset now, as they were after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    before = list(warnings.filters)
    quiet(verbose=True)
    assert lightning.level == logging.INFO and warnings.filters == before
    quiet()
    assert lightning.level == logging.WARNING and len(warnings.filters) > len(before)


def test_csv_logger_gets_the_config_and_the_test_scores(tmp_path):
    from adamerge.loggers import build_logger, finish_logger

    logger = build_logger({"name": "csv"}, tmp_path, {"granularity": {"name": "layer"}, "seed": 3})
    finish_logger(logger, {"before": {"add": 0.25, "avg": 0.25}, "after": {"add": 0.5, "avg": 0.5}}, None, 7)
    (version,) = tmp_path.glob("logs/version_*")
    assert yaml.safe_load((version / "hparams.yaml").read_text()) == {"granularity": {"name": "layer"}, "seed": 3}
    (row,) = csv.DictReader((version / "metrics.csv").open())
    assert row["step"] == "7" and float(row["test/before/add"]) == 0.25 and float(row["test/after/avg"]) == 0.5


def wandb_records(run_dir: Path) -> bytes:
    (offline,) = run_dir.glob("wandb/offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    assert list(offline.glob("files/media/images/**/*.png")), f"no heatmap image in {offline}"
    return log.read_bytes()


def test_comparison_logs_one_wandb_run_per_method(tmp_path):
    """The quickstart (the shipped zoo) with two methods, on 8 test prompts per task."""
    methods = ("[{name: task arithmetic, overrides: ['granularity=task', 'granularity.init=0.3', "
               "'granularity.transform=identity', 'trainer.max_steps=0']},"
               " {name: learned, overrides: ['granularity=layer', 'trainer.max_steps=3']}]")
    wandb_home = tmp_path / "wandb_home"
    env = {f"WANDB_{k}": str(wandb_home / k.lower()) for k in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR")}
    run = tmp_path / "run"
    result = adamerge(["+experiment=quickstart", f"compare.methods={methods}", "eval.limit=8", "logger=wandb",
                       "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"],
                      cwd=tmp_path, **env)
    printed = result.stdout + result.stderr
    assert "wandb:" not in printed and not [n for n in NOISE if n in printed], printed  # the quickstart is quiet
    assert result.stdout.strip().splitlines()[-1] == f"table: {run / 'results.md'}"
    static, learned = wandb_records(run / "task-arithmetic"), wandb_records(run / "learned")
    for records, name in ((static, b"task arithmetic"), (learned, b"learned")):
        for key in (name, b"test/before/avg", b"test/after/rev", b"coefficients/heatmap", b"granularity"):
            assert key in records, key
        assert "/".join(run.parts[-2:]).encode() in records  # the group
    for key in (b"loss/rev", b"coef/rev/mean"):  # a static merge has no training losses
        assert key in learned and key not in static, key


def test_sweep_summary_has_scores_seconds_and_overrides_best_first(tmp_path):
    jobs = {
        "0": {"status": "ok", "overrides": ["optim.lr=0.01"], "seconds": 3.25,
              "metrics": {"after": {"add": 0.5, "rev": 0.25, "avg": 0.375}}},
        "1": {"status": "failed", "overrides": ["optim.lr=-1"], "seconds": 0.5, "error": "AdamergeError: bad lr"},
        "2": {"status": "ok", "overrides": ["optim.lr=0.05"], "seconds": 4.0,
              "metrics": {"after": {"add": 0.75, "rev": 0.5, "avg": 0.625}}},
    }
    for name, result in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    write_summary(tmp_path)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["2", "0", "1"]
    assert list(rows[0])[:4] == ["job", "status", "avg", "add"]
    assert rows[0]["avg"] == "62.5" and rows[0]["rev"] == "50.0" and rows[0]["seconds"] == "4.0"
    assert rows[1]["overrides"] == "optim.lr=0.01" and rows[2]["error"] == "AdamergeError: bad lr"
    assert (tmp_path / "summary.md").read_text().splitlines()[2].startswith("| 2 | ok | 62.5 | 75.0 | 50.0 | 4.0 |")


def readme_block(heading: str, language: str) -> str:
    """The first fenced ``language`` block after ``heading`` in README.md."""
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S)[1]


def test_readme_sweep_example_varies_what_runs():
    """Every job of the README's sweep composes to a different single-method config (a comparison job
    would run its fixed method list whatever the sweep varies)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from adamerge.resolvers import register_resolvers

    command = next(line for line in readme_block("### Sweeps", "bash").splitlines() if "adamerge -m " in line)
    args = shlex.split(command.split("adamerge -m ", 1)[1])
    swept = [a for a in args if "," in a.partition("=")[2] and not a.partition("=")[2].startswith(("[", "{"))]
    assert swept, command
    register_resolvers()
    combos: list[list[str]] = [[]]
    for arg in swept:
        key, _, values = arg.partition("=")
        combos = [[*c, f"{key}={v}"] for c in combos for v in values.split(",")]
    fixed = [a for a in args if a not in swept]
    with initialize_config_module("adamerge.conf", version_base=None):
        configs = [compose("config", overrides=[*fixed, *combo]) for combo in combos]
    assert all(not cfg.get("compare") for cfg in configs)
    rendered = {yaml.safe_dump(OmegaConf.to_container(cfg, resolve=False), sort_keys=True) for cfg in configs}
    assert len(rendered) == len(configs) >= 2


def test_readme_python_api_snippet_runs(monkeypatch, tmp_path):
    """Verbatim, from a directory that looks like the repository's root (its ``data``), writing there."""
    snippet = readme_block("## Python API", "python")
    (tmp_path / "data").symlink_to(README.parent / "data")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # the README's own text
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    ids, merged, folded = namespace["ids"], namespace["merged"], namespace["folded"]
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_heatmap_axis_names_tensors_or_layers():
    names = [f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")]
    assert short_names(["model.embed_tokens.weight", *names]) == [
        "embed_tokens", "layers.0.self_attn.q_proj", "layers.0.mlp.up_proj", "layers.1.self_attn.q_proj",
        "layers.1.mlp.up_proj"]
    positions, labels, title = tensor_ticks(names)
    assert positions == [0, 1, 2, 3] and title == "tensor"
    many = [f"model.layers.{i}.{p}.weight" for i in range(32) for p in ("a", "b", "c", "d")]
    positions, labels, title = tensor_ticks(many)
    assert labels[:3] == ["0", "1", "2"] and positions[:3] == [0, 4, 8] and title.startswith("layer")
    assert tensor_ticks(["task"])[1] == ["all tensors"]
