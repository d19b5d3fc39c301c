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
    tensors = LazyTensors(layout, dtypes=dict.fromkeys(layout, torch.bfloat16))
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


@pytest.mark.parametrize(("shard_size", "loaded"), [("5GB", False), (SMALL_SHARDS, False), (SMALL_SHARDS, True)])
def test_written_checkpoint_is_what_save_pretrained_writes(family, tmp_path, shard_size, loaded):
    """Same files (config, generation config, shards, index) with the same tensors, tied heads dropped alike;
    a model from ``from_pretrained`` too (transformers writes its tensors in another order)."""
    from transformers import AutoModelForCausalLM

    model = family.expert(2)
    if loaded:
        model.save_pretrained(tmp_path / "source")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
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


# ---- the pool reads experts from their files; a run folds once and writes that fold -----------------------


def test_sharded_expert_gives_the_task_vectors_of_from_pretrained(llama_family, tmp_path, monkeypatch):
    """No module per expert (only the base goes through from_pretrained), one expert tensor in memory at a time,
    each read once, and the stacks equal ``from_pretrained(expert) - base``."""
    from transformers import AutoModelForCausalLM

    from adamerge import ExpertPool

    base_dir, dirs = llama_family.save(tmp_path)
    llama_family.expert(1).save_pretrained(dirs["code"], max_shard_size=SMALL_SHARDS)  # sharded + index
    (dirs["code"] / "model.safetensors").unlink()
    loaded, live, most, reads = [], set(), [0], []
    from_pretrained, getitem = ExpertPool._from_pretrained, LazyTensors.__getitem__

    def counted(self, source, role):
        loaded.append(role)
        return from_pretrained(self, source, role)

    def tracked(self, name):
        tensor = getitem(self, name)
        reads.append((id(self), name))
        live.add(id(tensor))
        most[0] = max(most[0], len(live))
        weakref.finalize(tensor, live.discard, id(tensor))
        return tensor

    monkeypatch.setattr(ExpertPool, "_from_pretrained", counted)
    monkeypatch.setattr(LazyTensors, "__getitem__", tracked)
    pool = ExpertPool(str(base_dir), {n: str(d) for n, d in dirs.items()})
    tv = pool.task_vectors()
    assert loaded == ["base"] and most[0] == 1
    assert len(reads) == len(set(reads)) == len(dirs) * len(tv.stacks)  # ``name in expert`` reads nothing
    w0 = dict(pool.base.named_parameters())
    for k, name in enumerate(pool.expert_names):
        expert = dict(AutoModelForCausalLM.from_pretrained(dirs[name]).named_parameters())
        for n, stack in tv.stacks.items():
            assert torch.equal(stack[k], expert[n] - w0[n]), (name, n)


@pytest.mark.parametrize("what", ["dtype", "missing tensor"])
def test_header_mismatch_is_refused_before_any_data_is_read(llama_family, tmp_path, monkeypatch, what):
    from adamerge import ExpertPool

    base_dir, dirs = llama_family.save(tmp_path)
    expert = llama_family.expert(2)
    if what == "dtype":
        expert.to(torch.bfloat16).save_pretrained(dirs["chat"])
        expected = r"^expert 'chat': tensor '[\w.]+' is torch.bfloat16, the base torch.float32$"
    else:
        from safetensors.torch import save_file

        state = {n: t for n, t in expert.state_dict().items() if n != "model.norm.weight"}
        save_file(state, str(dirs["chat"] / "model.safetensors"), metadata={"format": "pt"})
        expected = r"^expert 'chat': its files have no tensor 'model.norm.weight' that the base's have$"

    def no_reading(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(ExpertPool, "_load_model", no_reading)
    monkeypatch.setattr(LazyTensors, "__getitem__", no_reading)
    with pytest.raises(AdamergeError, match=expected):
        ExpertPool(str(base_dir), {n: str(d) for n, d in dirs.items()})


@pytest.mark.parametrize("data", [True, False])
def test_run_folds_once_and_writes_the_checked_fold(tmp_path, monkeypatch, data):
    """A static merge: every merged tensor is folded exactly once, and the written shards + index load with plain
    transformers and hold the merge W0 + 0.3 sum_k tau_k. With calibration data the fold check runs on the folded
    model that is then written; without, no folded model is built (the fold is written tensor by tensor)."""
    from hydra import compose, initialize_config_module
    from tiny import write_zoo
    from transformers import AutoModelForCausalLM

    import adamerge.export
    import adamerge.merged
    from adamerge.resolvers import register_resolvers
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo")
    folds, models = [], []
    fold_tensor_, fold = adamerge.merged.fold_tensor_, adamerge.merged.MergedModel.fold
    monkeypatch.setattr(adamerge.merged.MergedModel, "fold", lambda self, *a: (models.append(a), fold(self, *a))[1])
    monkeypatch.setattr(adamerge.merged, "fold_tensor_", lambda p, *a, **k: (folds.append(p.shape),
                                                                             fold_tensor_(p, *a, **k))[1])
    monkeypatch.setattr(adamerge.export, "write_pretrained",  # small shards: the index is written too
                        lambda directory, model, value=None, max_shard_size=None: write_pretrained(
                            directory, model, value, SMALL_SHARDS))
    register_resolvers()
    overrides = ["method=task_arithmetic", f"pool.base={zoo.base}", f"output_dir={tmp_path / 'out'}",
                 "logger=none", "trainer.enable_progress_bar=false"]
    overrides += [f"+pool.experts.{t}={d}" for t, d in zoo.experts.items()]
    overrides += [f"+data.paths.{t}={p}" for t, p in zoo.data.items() if data]
    with initialize_config_module("adamerge.conf", version_base=None):
        result = run(compose("config", overrides=overrides), tmp_path / "run")
    out = tmp_path / "out"
    assert (result.fold_max_diff is not None and result.fold_max_diff < 1e-4) if data else result.fold_max_diff is None
    assert len(models) == data
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    experts = [dict(AutoModelForCausalLM.from_pretrained(d).named_parameters()) for d in zoo.experts.values()]
    assert len(folds) == len(dict(base.named_parameters()))  # each merged tensor folded once, for check and output
    assert (out / INDEX_NAME).is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    for n, w0 in base.named_parameters():
        expected = w0 + 0.3 * sum(e[n] - w0 for e in experts)
        assert torch.allclose(dict(merged.named_parameters())[n], expected, atol=1e-6), n


def test_hub_id_in_the_local_cache_is_read_from_its_snapshot(llama_family, tmp_path, monkeypatch):
    """A hub id whose snapshot is in the cache is read from its files like a directory (nothing downloaded)."""
    import huggingface_hub.constants

    from adamerge import ExpertPool

    base_dir, dirs = llama_family.save(tmp_path)
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--expert" / "snapshots" / ("0" * 40)
    llama_family.expert(0).save_pretrained(snapshot)
    (cache / "models--org--expert" / "refs").mkdir()
    (cache / "models--org--expert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded, from_pretrained = [], ExpertPool._from_pretrained
    monkeypatch.setattr(ExpertPool, "_from_pretrained",
                        lambda self, source, role: (loaded.append(role), from_pretrained(self, source, role))[1])
    tv = ExpertPool(str(base_dir), {"hub": "org/expert", "code": str(dirs["code"])}).task_vectors()
    assert loaded == ["base"]
    w0, expert = dict(llama_family.base().named_parameters()), dict(llama_family.expert(0).named_parameters())
    assert all(torch.equal(stack[0], expert[n] - w0[n]) for n, stack in tv.stacks.items())
