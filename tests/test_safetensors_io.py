"""Experts read tensor by tensor from their safetensors files; the fold written shard by shard (``safetensors_io``)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adamerge.errors import AdamergeError
from adamerge.safetensors_io import INDEX_NAME, LazyTensors, read_layout, write_pretrained

SMALL_SHARDS = 20_000  # bytes: the tiny Llama in 9 shards


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_sharded_layout_and_lazy_reads_match_the_model(llama_family, tmp_path):
    expert = llama_family.expert(1)
    expert.save_pretrained(tmp_path, max_shard_size=SMALL_SHARDS)
    layout = read_layout(tmp_path, "expert 'code'")
    state = expert.state_dict()
    assert len({e.file for e in layout.values()}) > 1 and set(layout) == set(state)
    assert all(layout[n].shape == tuple(t.shape) and layout[n].dtype == t.dtype for n, t in state.items())
    tensors = LazyTensors(layout, dtype=torch.bfloat16)
    assert all(torch.equal(tensors[n], t.to(torch.bfloat16)) for n, t in state.items())


def test_index_naming_the_wrong_shard_is_refused(llama_family, tmp_path):
    llama_family.expert(0).save_pretrained(tmp_path, max_shard_size=SMALL_SHARDS)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    name, file = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(f for f in index["weight_map"].values() if f != file)
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(AdamergeError, match=rf"expert 'x': {INDEX_NAME} puts '{name}' in .* which does not hold it"):
        read_layout(tmp_path, "expert 'x'")
    (tmp_path / file).unlink()
    with pytest.raises(AdamergeError, match=f"shard '{file}' named by {INDEX_NAME} is missing"):
        read_layout(tmp_path, "expert 'x'")


@pytest.mark.parametrize("shard_size", ["5GB", SMALL_SHARDS])
def test_written_checkpoint_is_what_save_pretrained_writes(family, tmp_path, shard_size):
    """Same files (config, generation config, shards, index) with the same tensors, tied heads dropped alike."""
    model = family.expert(2)
    model.save_pretrained(tmp_path / "theirs", max_shard_size=shard_size)
    (tmp_path / "ours").mkdir()
    write_pretrained(tmp_path / "ours", model, max_shard_size=shard_size)
    theirs, ours = files_of(tmp_path / "theirs"), files_of(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    for name in theirs:
        if name.endswith(".json"):
            assert json.loads(ours[name]) == json.loads(theirs[name]), name
        else:
            a, b = load_file(tmp_path / "theirs" / name), load_file(tmp_path / "ours" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_values_are_produced_and_written_one_at_a_time(llama_family, tmp_path):
    """``value`` gives each tensor as it is written; no two produced tensors are alive together."""
    from transformers import AutoModelForCausalLM

    base = llama_family.base()
    live, most = set(), [0]

    def value(name: str, template: torch.Tensor) -> torch.Tensor:
        out = template * 2 + 1
        live.add(name)
        most[0] = max(most[0], len(live))
        weakref.finalize(out, live.discard, name)
        return out

    write_pretrained(tmp_path, base, value, max_shard_size=SMALL_SHARDS)
    assert most[0] == 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t * 2 + 1) for n, t in base.state_dict().items())
