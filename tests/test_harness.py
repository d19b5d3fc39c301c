"""lm-evaluation-harness scores of a run (``eval.harness``), offline, on the tiny char-tokenizer zoo.

Local tasks over JSONL files (multiple choice, generation, and a rolling log-likelihood whose perplexities
are continuous, so equality means more than equal counts of hits): the run scores the base, the experts and
the merge in memory; the numbers must be in ``metrics.json``, the CSV log, the card and the sweep summary,
and equal what lm-eval gives on the checkpoints read back from disk.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from tiny import task_rows, write_zoo

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[eval]'")

from adamerge.errors import AdamergeError  # noqa: E402
from adamerge.harness import task_scores  # noqa: E402
from adamerge.run import run  # noqa: E402
from adamerge.sweep import write_summary  # noqa: E402

LIMIT = 6
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]


def write_tasks(root: Path) -> Path:
    """Three lm-eval task YAMLs over local JSONL files (the datasets cache kept under ``root``)."""
    root.mkdir(parents=True)
    add = task_rows("add", LIMIT)
    mc = [{"q": r["prompt"], "choices": [r["answer"], r["answer"][::-1] + "1", str(int(r["answer"]) + 7)],
           "label": 0} for r in add]
    files = {"mc": mc, "gen": task_rows("rev", LIMIT), "ppl": add}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test"}

    def data(name: str) -> dict:
        return {"dataset_kwargs": {"data_files": {"test": str(root / f"{name}.jsonl")}, "cache_dir": str(root / "hf")}}

    tasks = {
        "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "label", "target_delimiter": "", **data("mc"),
                    "metric_list": [mean("acc"), mean("acc_norm")]},
        "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                     "target_delimiter": "", **data("gen"),
                     "generation_kwargs": {"until": ["="], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [mean("exact_match")]},
        "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "{{prompt}}{{answer}}",
                     "doc_to_target": "{{prompt}}{{answer}}", **data("ppl"),
                     "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                     (("word_perplexity", "weighted_perplexity"),
                                      ("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte"))]},
    }
    for name, task in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **task}))
    return root


def mean(metric: str) -> dict:
    return {"metric": metric, "aggregation": "mean", "higher_is_better": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return write_zoo(root / "zoo"), write_tasks(root / "tasks")


def config(zoo, task_dir: Path, out: Path, **harness) -> dict:
    return {"pool": {"base": str(zoo.base), "experts": {k: str(v) for k, v in zoo.experts.items()}},
            "granularity": {"name": "layer", "init": 0.3}, "objective": {"name": "entropy"},
            "optim": {"name": "adam", "lr": 0.1}, "data": {"paths": {k: str(v) for k, v in zoo.data.items()}},
            "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False,
                        "enable_checkpointing": False, "log_every_n_steps": 1},
            "logger": {"name": "csv"}, "output_dir": str(out),
            "eval": {"harness": {"tasks": TASKS, "limit": LIMIT, "include_path": str(task_dir), **harness}}}


def from_disk(directory: Path, tasks: Path, tokenizer: Path | None = None) -> dict:
    """A separate harness run on a checkpoint directory, as a user runs lm-eval (the zoo's experts have no
    tokenizer of their own: the base's)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(directory), tokenizer=str(tokenizer or directory), device="cpu", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, log_samples=False,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    return task_scores(results)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[t].keys() == b[t].keys() for t in a), (a, b)
    return max(abs(a[t][m] - b[t][m]) for t in a for m in a[t])


def test_harness_scores_the_models_in_memory_as_lm_eval_scores_their_checkpoints(setup, tmp_path):
    zoo, tasks = setup
    out = tmp_path / "merged"
    start = time.perf_counter()
    result = run(config(zoo, tasks, out, experts=True), tmp_path / "run")
    print(f"run with harness: {time.perf_counter() - start:.1f} s")

    harness = json.loads((out / "metrics.json").read_text())["harness"]
    assert list(harness) == ["base", "expert:add", "expert:rev", "before", "after"]
    assert harness == result.metrics["harness"]
    assert set(harness["after"]) == set(TASKS)
    assert {"acc", "acc_norm", "acc_stderr"} <= set(harness["after"]["tiny_mc"])
    assert "exact_match" in harness["after"]["tiny_gen"]
    assert harness["after"]["tiny_ppl"]["word_perplexity"] > 1
    # the learned merge is another model than the one before training (perplexity is continuous)
    assert harness["after"]["tiny_ppl"]["bits_per_byte"] != harness["before"]["tiny_ppl"]["bits_per_byte"]

    diffs = {"after": max_abs_diff(harness["after"], from_disk(out, tasks)),
             "base": max_abs_diff(harness["base"], from_disk(zoo.base, tasks)),
             "expert:rev": max_abs_diff(harness["expert:rev"], from_disk(zoo.experts["rev"], tasks, zoo.base))}
    print("max |in memory - from disk|:", diffs)
    assert max(diffs.values()) <= 1e-5, diffs

    logged = list(csv.DictReader(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv")).open()))
    row = next(r for r in logged if r.get("harness/after/tiny_ppl/bits_per_byte"))
    assert float(row["harness/after/tiny_ppl/bits_per_byte"]) == pytest.approx(
        harness["after"]["tiny_ppl"]["bits_per_byte"], rel=1e-6)
    assert float(row["harness/base/tiny_mc/acc"]) == harness["base"]["tiny_mc"]["acc"]

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    [entry] = front["model-index"]
    assert entry["name"] == "merged"
    values = {(r["dataset"]["type"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert values[("tiny_ppl", "word_perplexity")] == round(harness["after"]["tiny_ppl"]["word_perplexity"], 4)
    assert ("tiny_mc", "acc_stderr") not in values
    assert "## lm-evaluation-harness" in card and f"the first {LIMIT} documents" in card
    after_row = next(line for line in card.splitlines() if line.startswith("| merged (this model) |"))
    assert f"{harness['after']['tiny_ppl']['bits_per_byte']:.4f}" in after_row

    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "result.json").write_text(json.dumps({"status": "ok", "metrics": result.metrics, "seconds": 1.0}))
    [summary] = write_summary(tmp_path / "sweep")
    assert summary["harness/tiny_mc/acc"] == round(harness["after"]["tiny_mc"]["acc"], 4)
    assert "harness/tiny_mc/acc_stderr" not in summary


def test_bad_harness_settings_are_one_line_before_any_model_is_loaded(setup, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    zoo, tasks = setup
    bad = {"tasks": ["tiny_nope"]}, {"limit": 0}, {"include_path": str(tmp_path / "missing")}, {"task": ["x"]}
    messages = ["'tiny_nope' is no task of eval.harness.include_path", "eval.harness.limit=0",
                "does not exist", "unexpected keyword argument 'task'"]
    monkeypatch.setattr("adamerge.run.build_pool", lambda cfg: pytest.fail("a model was loaded"))
    # a name the local tasks lack is looked up in lm-eval's built-in index too (tens of seconds to read):
    # here that index is left empty
    local_only = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, include_path=None, include_defaults=True:
                        local_only(self, include_path=include_path, include_defaults=False))
    for options, message in zip(bad, messages, strict=True):
        with pytest.raises(AdamergeError, match=message):
            run(config(zoo, tasks, tmp_path / "out", **options), tmp_path / "run")
    monkeypatch.setattr("adamerge.harness.find_spec", lambda name: None)
    with pytest.raises(AdamergeError, match=r"pip install 'adamerge\[eval\]'"):
        run(config(zoo, tasks, tmp_path / "out"), tmp_path / "run")
