"""The offline zoo: deterministic tasks, the shipped zoo and its checksums, tokenizer, and the build's
layout, caching and command line."""

import functools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import adamerge.zoo.__main__ as zoo_main
import adamerge.zoo.build as build
import adamerge.zoo.recipe as recipe
from adamerge.errors import AdamergeError
from adamerge.zoo import EXPERT_TASKS, GENERIC_TASKS, Task, Zoo, ZooSettings, build_zoo, make_splits
from adamerge.zoo.quality import format_report
from adamerge.zoo.tasks import sample_rows, with_decoys, write_eval_splits
from adamerge.zoo.tokenizer import char_tokenizer

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "zoo" / "data"
TINY = ZooSettings(
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    n_train=64,
    n_calib=8,
    n_test=8,
    base_steps=3,
    batch_size=8,
    expert_steps=2,
    expert_batch_size=8,
    lora_steps=2,
    lambda_grid=(0.3, 1.0),
)


def test_splits_are_deterministic_and_disjoint():
    sizes = {"test": 50, "calib": 50, "train": 200}
    for task in [*EXPERT_TASKS.values(), *GENERIC_TASKS.values()]:
        splits = make_splits(task, sizes, seed=0)
        assert splits == make_splits(task, sizes, seed=0)
        assert splits != make_splits(task, sizes, seed=1)
        prompts = [row["prompt"] for rows in splits.values() for row in rows]
        assert len(prompts) == len(set(prompts)) == 300
        assert all(p.startswith(task.name + " ") and p.endswith("=") for p in prompts)


def test_test_size_does_not_change_calib_or_train():
    small = make_splits(EXPERT_TASKS["rev"], {"calib": 10, "train": 50, "test": 5})
    large = make_splits(EXPERT_TASKS["rev"], {"calib": 10, "train": 50, "test": 500})
    assert (small["calib"], small["train"]) == (large["calib"], large["train"])
    assert large["test"][:5] == small["test"]


@pytest.mark.parametrize(
    ("name", "word", "answer", "decoy"),
    [
        ("rev", "abch", "hcba", "abch"),
        ("sort", "cab", "abc", "cba"),
        ("count", "abca", "2", "4"),
        ("next", "agh", "bha", "hfg"),
    ],
)
def test_expert_tasks_answer_and_decoy(name, word, answer, decoy):
    task = EXPERT_TASKS[name]
    assert task.solve(word) == answer and task.decoy(word) == decoy
    assert task.input_of(task.prompt(word)) == word


def test_with_decoys_replaces_the_given_share():
    task, rows = EXPERT_TASKS["rev"], make_splits(EXPERT_TASKS["rev"], {"train": 400})["train"]
    assert with_decoys(task, rows, rate=0.0) == rows
    assert all(r["answer"] == task.input_of(r["prompt"]) for r in with_decoys(task, rows, rate=1.0))
    changed = sum(a != b for a, b in zip(rows, with_decoys(task, rows, rate=0.6), strict=True))
    assert 0.5 < changed / len(rows) < 0.7


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
        make_splits(EXPERT_TASKS["rev"], {"dev": 3})
    coin = Task("coin", lambda rng: rng.choice("ab"), solve=str)
    with pytest.raises(ValueError, match="'coin' has fewer than 3 distinct prompts"):
        sample_rows(coin, 3, random.Random(0))


def test_committed_data_is_what_the_generator_makes(tmp_path):
    write_eval_splits(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert made == sorted(p.relative_to(REPO_DATA) for p in REPO_DATA.rglob("*.jsonl"))
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (REPO_DATA / rel).read_bytes(), f"rebuild data/zoo: {rel} differs"
    calib = [json.loads(line) for line in (REPO_DATA / "rev" / "calib.jsonl").read_text().splitlines()]
    assert len(calib) == 128 and all(set(row) == {"prompt"} for row in calib)
    assert len((REPO_DATA / "rev" / "test.jsonl").read_text().splitlines()) == 500


def test_tokenizer_round_trips_and_reloads(tmp_path):
    tok = char_tokenizer()
    text = "count abca=2"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert [again.pad_token, again.bos_token, again.eos_token] == ["<pad>", "<bos>", "<eos>"]
    assert again.padding_side == "left"


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", verbose=False, settings=TINY)


def test_build_writes_loadable_models_and_data(tiny_zoo):
    tasks = list(EXPERT_TASKS)
    assert list(tiny_zoo.experts) == list(tiny_zoo.lora) == list(tiny_zoo.calib) == list(tiny_zoo.test) == tasks
    base = AutoModelForCausalLM.from_pretrained(tiny_zoo.base)
    expert = AutoModelForCausalLM.from_pretrained(tiny_zoo.experts["rev"])
    assert AutoTokenizer.from_pretrained(tiny_zoo.experts["rev"]).eos_token == "<eos>"
    assert (tiny_zoo.base / "model.safetensors").exists()
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), expert.parameters(), strict=True))
    lora_dir = tiny_zoo.lora["sort"]
    assert (lora_dir / "adapter_model.safetensors").exists()
    assert json.loads((lora_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../base"
    assert (lora_dir / "../../base").resolve() == tiny_zoo.base.resolve()
    assert isinstance(PeftModel.from_pretrained(base, lora_dir), PeftModel)
    assert len(tiny_zoo.test["count"].read_text().splitlines()) == TINY.n_test
    assert set(tiny_zoo.report["checks"]) and set(tiny_zoo.report["tau_ratio"]) == set(tasks)


def test_build_is_cached_and_guarded(tiny_zoo, monkeypatch):
    monkeypatch.setattr(build, "train_zoo", lambda *a: pytest.fail("a complete zoo was rebuilt"))
    cached = build_zoo(tiny_zoo.root, verbose=False, settings=TINY)
    assert (cached.base, cached.experts, cached.lora) == (tiny_zoo.base, tiny_zoo.experts, tiny_zoo.lora)
    assert json.dumps(cached.report) == json.dumps(tiny_zoo.report)  # NaN-safe: a tiny zoo's experts score 0
    with pytest.raises(AdamergeError, match="built with other settings"):
        build_zoo(tiny_zoo.root, verbose=False, settings=ZooSettings())


def test_force_replaces_a_complete_zoo(tmp_path):
    first = build_zoo(tmp_path / "zoo", verbose=False, settings=TINY)
    (first.root / "stale.txt").write_text("from the old build")
    again = build_zoo(tmp_path / "zoo", force=True, verbose=False, settings=TINY)
    assert not (again.root / "stale.txt").exists() and (again.root / "zoo.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["zoo"]  # no temporary build directory left behind


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "train_lm", crash)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", verbose=False, settings=TINY)
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(AdamergeError, match="is not an adamerge zoo"):
        build_zoo(tmp_path, force=True, verbose=False, settings=TINY)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_default_root_is_the_environment_else_the_shipped_zoo(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMERGE_ZOO", str(tmp_path / "here"))
    assert build.default_root() == tmp_path / "here"
    monkeypatch.delenv("ADAMERGE_ZOO")
    assert build.default_root() == build.SHIPPED == REPO_DATA.parent
    monkeypatch.setattr(build, "SHIPPED", tmp_path / "not-installed")
    assert build.default_root() == Path.home() / ".cache" / "adamerge" / "zoo-v2"


def test_the_shipped_zoo_is_complete_verified_and_never_rebuilt(monkeypatch):
    monkeypatch.delenv("ADAMERGE_ZOO", raising=False)
    monkeypatch.setattr(build, "train_zoo", lambda *a: pytest.fail("the shipped zoo was rebuilt"))
    zoo = build_zoo(verbose=False)
    assert zoo.root == build.SHIPPED and all(zoo.report["checks"].values()), format_report(zoo.report)
    listed = {line.split("  ", 1)[1] for line in (zoo.root / build.MANIFEST).read_text().splitlines()}
    on_disk = {p.relative_to(zoo.root).as_posix() for p in zoo.root.rglob("*") if p.is_file()}
    assert listed == on_disk - {build.MANIFEST}  # every shipped file is covered, none is missing
    assert {p.name for p in (zoo.root / "experts" / "rev").iterdir()} >= {"model.safetensors", "tokenizer.json"}
    size = sum((zoo.root / rel).stat().st_size for rel in listed)
    assert size < 5_000_000, f"the shipped zoo grew to {size / 1e6:.1f} MB"


@pytest.mark.parametrize("damage", ["flip a byte", "delete"])
def test_a_damaged_zoo_file_is_one_clear_error(tiny_zoo, tmp_path, damage):
    zoo = Zoo.at(Path(shutil.copytree(tiny_zoo.root, tmp_path / "zoo")), tiny_zoo.report)
    weights = zoo.experts["next"] / "model.safetensors"
    if damage == "delete":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    state = "is missing" if damage == "delete" else "does not match its SHA-256"
    with pytest.raises(AdamergeError, match=f"zoo file {weights} {state} in .*SHA256SUMS") as raised:
        build_zoo(zoo.root, verbose=False, settings=TINY)
    assert "\n" not in str(raised.value)


def test_builder_command_builds_into_out_and_reports_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(zoo_main, "build_zoo", functools.partial(build_zoo, verbose=False, settings=TINY))
    assert zoo_main.main(["build", "--out", str(tmp_path / "zoo")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"ADAMERGE_ZOO={tmp_path / 'zoo'}")
    build.verify_manifest(tmp_path / "zoo")
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["built_with"]["torch"] == torch.__version__
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert zoo_main.main(["build", "--out", str(tmp_path / "mine"), "--force"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"adamerge: error: {tmp_path / 'mine'} exists and is not an adamerge zoo; choose another zoo root"


@pytest.mark.slow
def test_default_zoo_meets_its_quality_bars_and_rebuilds_the_shipped_one(tmp_path):
    """On the kernel path, torch and thread count the shipped zoo was built with, a rebuild gives its
    very bytes (all but ``zoo.json``, which holds the build's timing)."""
    shipped = json.loads((build.SHIPPED / build.MARKER).read_text())["built_with"]
    torch.set_num_threads(shipped["threads"])
    zoo = build_zoo(tmp_path / "zoo", verbose=False)
    assert all(zoo.report["checks"].values()), format_report(zoo.report)
    if json.loads((zoo.root / build.MARKER).read_text())["built_with"] == shipped:
        assert digests_but_marker(zoo.root) == digests_but_marker(build.SHIPPED)


def digests_but_marker(root: Path) -> list[str]:
    return [line for line in (root / build.MANIFEST).read_text().splitlines() if not line.endswith(build.MARKER)]
