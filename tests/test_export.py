"""save_folded: layout, model card, coefficients, sharding, atomic replacement, and a fresh-process reload."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import output_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adamerge import AdamergeError, Chunk, Column, ExpertPool, MergedModel
from adamerge.export import COEFFICIENTS_FILE, CONFIG_FILE, MARKER_KEY, check_output_dir, save_folded


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


@pytest.fixture
def merged_llama(llama_family, tmp_path, tokenizer_factory):
    """A merged Llama whose base was read from a directory that also holds a tokenizer."""
    base_dir = tmp_path / "base"
    llama_family.base().save_pretrained(base_dir)
    tokenizer_factory(base_dir)
    pool = ExpertPool(base_dir, llama_family.expert_builders())
    merged = MergedModel(pool.base, pool.task_vectors(), Column(init=0.3))
    with torch.no_grad():
        for p in merged.granularity.raw.values():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return base_dir, merged


def write(merged, out: Path, base_dir: Path | None = None, **kwargs) -> Path:
    return save_folded(
        merged.fold(),
        out,
        base_source=base_dir,
        experts={"math": "dirs/math", "code": "dirs/code", "chat": "dirs/chat"},
        coefficients=merged.granularity.table(),
        coefficient_metadata={"experts": merged.experts, "granularity": "column"},
        config={"seed": 0, "granularity": {"name": "column", "init": 0.3}},
        details={"granularity": "column", "objective": "entropy"},
        **kwargs,
    )


def test_layout(merged_llama, tmp_path):
    base_dir, merged = merged_llama
    out = write(merged, tmp_path / "out", base_dir, metrics={"merged": {"math": 0.5, "code": 0.25}})
    assert out == tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", COEFFICIENTS_FILE, CONFIG_FILE} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files

    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta  # a local path is no hub id (tests/test_card.py)
    assert meta["base_model_relation"] == "merge"
    assert {"adamerge", "merge"} <= set(meta["tags"])
    readme = (out / "README.md").read_text()
    assert "| math | `dirs/math` |" in readme and "0.5000" in readme

    table = load_file(out / COEFFICIENTS_FILE)
    assert table.keys() == merged.granularity.table().keys()
    for name, values in merged.granularity.table().items():
        torch.testing.assert_close(table[name], values, rtol=0, atol=0)
    with safe_open(out / COEFFICIENTS_FILE, "pt") as f:
        assert json.loads(f.metadata()["experts"]) == ["math", "code", "chat"]
    config = yaml.safe_load((out / CONFIG_FILE).read_text())
    marker = config.pop(MARKER_KEY)  # what makes overwrite=true willing to replace this directory later
    assert config == {"seed": 0, "granularity": {"name": "column", "init": 0.3}}
    assert marker["format"] == 1 and marker["details"]["granularity"] == "column"

    weights = load_file(out / "model.safetensors")
    assert weights.keys() == dict(merged.base.named_parameters()).keys()  # no adamerge state inside
    for name, value in merged.merged_weights().items():
        torch.testing.assert_close(weights[name], value.detach(), rtol=0, atol=0)

    from transformers import AutoTokenizer

    text = "w1 w7 w42 unknown"
    copied, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base_dir)
    assert copied(text)["input_ids"] == original(text)["input_ids"] == [1, 7, 42, 0]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_shards(merged_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, merged = merged_llama
    out = write(merged, tmp_path / "out", base_dir, max_shard_size="20KB")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    shards = sorted(f for f in files if f.startswith("model-") and f.endswith(".safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = {"input_ids": torch.arange(16).view(2, 8)}
    assert (output_of(reloaded, ids) - output_of(merged, ids)).abs().max() <= 1e-5


def test_base_without_tokenizer(llama_family, tmp_path):
    base_dir = tmp_path / "base"
    llama_family.base().save_pretrained(base_dir)
    pool = ExpertPool(base_dir, llama_family.expert_builders())
    merged = MergedModel(pool.base, pool.task_vectors(), Chunk(init=0.5))
    out = write(merged, tmp_path / "out", base_dir)
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" not in files and "tokenizer_config.json" not in files


def test_in_memory_base_card(llama_family, tmp_path):
    pool, tv = llama_family.pooled
    out = write(MergedModel(pool.base, tv, Column(init=0.3)), tmp_path / "out")
    meta = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta and meta["base_model_relation"] == "merge"


# ---- refusing, replacing, failing ------------------------------------------------------------------------


def test_non_empty_output_dir_needs_overwrite_and_an_adamerge_output(merged_llama, tmp_path):
    """overwrite=true replaces an earlier adamerge output, never a directory of the user's."""
    base_dir, merged = merged_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(AdamergeError, match=r"exists and is not empty; set overwrite=true"):
        write(merged, out, base_dir)
    with pytest.raises(AdamergeError, match=r"not written by adamerge .*replaces only an earlier adamerge output"):
        write(merged, out, base_dir, overwrite=True)
    assert snapshot(out) == {"precious.txt": b"keep me"}
    (out / "precious.txt").unlink()
    write(merged, out, base_dir)  # an empty directory is fine
    (out / "notes.txt").write_text("added by the user after the run")
    write(merged, out, base_dir, overwrite=True)  # an adamerge output is replaced whole
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_overwrite_without_atomic_exchange(merged_llama, tmp_path, monkeypatch):
    import adamerge.export

    base_dir, merged = merged_llama
    out = tmp_path / "out"
    write(merged, out, base_dir)
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(adamerge.export, "_exchange", lambda a, b: False)  # no renameat2: two renames
    write(merged, out, base_dir, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert not (out / ".adamerge-temporary").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_empty_output_dir_is_fine(merged_llama, tmp_path):
    base_dir, merged = merged_llama
    (tmp_path / "out").mkdir()
    assert (write(merged, tmp_path / "out", base_dir) / "config.json").exists()


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdamergeError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


@pytest.fixture
def previous_output(merged_llama, tmp_path):
    base_dir, merged = merged_llama
    out = write(merged, tmp_path / "out", base_dir)
    (out / "marker.txt").write_text("previous run")
    return out, snapshot(out)


def assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["base", "out"]  # no temporary directory left


def test_failing_extra_files_leaves_previous_dir(merged_llama, previous_output):
    base_dir, merged = merged_llama
    out, before = previous_output
    seen = []

    def extra(tmp: Path) -> None:
        seen.append(sorted(p.name for p in tmp.iterdir()))
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification failed"):
        write(merged, out, base_dir, overwrite=True, extra_files=extra)
    assert "model.safetensors" in seen[0]  # it ran on the complete temporary directory
    assert_untouched(out, before)


def test_full_disk_leaves_previous_dir(merged_llama, previous_output, monkeypatch):
    import adamerge.safetensors_io

    base_dir, merged = merged_llama
    out, before = previous_output
    folded = merged.fold()

    def no_space(f, tensor):
        f.write(b"half")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adamerge.safetensors_io, "write_tensor", no_space)
    with pytest.raises(AdamergeError, match=r"could not write output_dir=.*out'.*No space left on device"):
        save_folded(folded, out, base_source=base_dir, overwrite=True)
    assert_untouched(out, before)


def test_failure_late_in_writing(merged_llama, previous_output, monkeypatch):
    import adamerge.export

    base_dir, merged = merged_llama
    out, before = previous_output

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(adamerge.export, "save_coefficients", broken)
    with pytest.raises(AdamergeError, match="Input/output error"):
        write(merged, out, base_dir, overwrite=True)
    assert_untouched(out, before)


def test_failure_without_previous_dir_leaves_nothing(merged_llama, tmp_path):
    base_dir, merged = merged_llama

    def extra(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(merged, tmp_path / "out", base_dir, extra_files=extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# ---- the fold loads with plain transformers, in a process that never imports adamerge ------------------


RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    for directory in sys.argv[1:]:
        expected = load_file(directory + ".expected.safetensors")
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        diff = (logits - expected["logits"]).abs().max().item()
        print(directory, type(model).__name__, diff)
        assert diff <= 1e-5, (directory, diff)
    assert not [m for m in sys.modules if m.split(".")[0] == "adamerge"], "adamerge was imported"
    print("OK")
    """
)


def test_fresh_process_loads_the_fold(llama_family, gpt2_family, tmp_path):
    directories = []
    for family, granularity in ((llama_family, Column(init=0.3)), (gpt2_family, Chunk(chunks={"*": 3}, init=0.4))):
        pool, tv = family.pooled
        merged = MergedModel(pool.base, tv, granularity)
        with torch.no_grad():
            for p in merged.granularity.raw.values():
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        out = save_folded(merged.fold(), tmp_path / family.name, experts={"a": "a"})
        ids = family.inputs["input_ids"]
        save_file({"input_ids": ids, "logits": output_of(merged, {"input_ids": ids}).contiguous()},
                  f"{out}.expected.safetensors")
        directories.append(str(out))
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    result = subprocess.run(
        [sys.executable, str(script), *directories], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    assert "GPT2LMHeadModel" in result.stdout and "LlamaForCausalLM" in result.stdout
