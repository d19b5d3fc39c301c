"""The memory model: building task vectors holds the base, the stack and ONE expert, never more.

Two views. (a) Exact: every model the pool materializes is tracked with weakrefs to the module and
to each parameter's storage; before an expert is loaded no earlier expert may be alive, while it
is checked exactly one is, and none after ``task_vectors()``. (b) Coarse: the peak RSS of a fresh
process merging a ~21M-parameter Llama from HF directories stays within base + stack + 1.5 experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from conftest import perturb, save_lora_adapter

from adamerge import ExpertPool
from adamerge.pool import ExpertPool as PoolClass


class Tracker:
    """Weakrefs to every model the pool loads (module and parameter storages), and what was alive when."""

    def __init__(self, monkeypatch):
        self.modules: list[weakref.ref] = []
        self.storages: list[list[weakref.ref]] = []
        self.before_load: list[tuple[int, int]] = []
        self.while_checked: list[tuple[int, int]] = []
        load, check = PoolClass._load_model, PoolClass._check_matches_base
        tracker = self

        def tracked_load(self, source, role):
            if role == "base":
                return load(self, source, role)
            tracker.before_load.append(tracker.alive())
            model = load(self, source, role)
            tracker.modules.append(weakref.ref(model))
            tracker.storages.append([weakref.ref(p.untyped_storage()) for p in model.parameters()])
            return model

        def tracked_check(self, expert, params):
            tracker.while_checked.append(tracker.alive())
            return check(self, expert, params)

        monkeypatch.setattr(PoolClass, "_load_model", tracked_load)
        monkeypatch.setattr(PoolClass, "_check_matches_base", tracked_check)

    def alive(self) -> tuple[int, int]:
        """(expert modules alive, experts with any parameter storage alive); no gc.collect: refcounts only."""
        modules = sum(r() is not None for r in self.modules)
        tensors = sum(any(r() is not None for r in group) for group in self.storages)
        return modules, tensors


def check_one_at_a_time(tracker: Tracker, pool: ExpertPool) -> None:
    assert tracker.modules == []  # nothing is loaded up front
    tv = pool.task_vectors()
    k = len(pool.expert_names)
    assert tracker.before_load == [(0, 0)] * k, "an earlier expert was still alive when the next one loaded"
    assert tracker.while_checked == [(1, 1)] * k
    assert tracker.alive() == (0, 0), "an expert outlived task_vectors()"
    assert all(s.shape[0] == k for s in tv.stacks.values())


def test_builders_one_expert_at_a_time(family, monkeypatch):
    tracker = Tracker(monkeypatch)
    check_one_at_a_time(tracker, family.pool())


def test_directories_build_no_expert_module(llama_family, tmp_path, monkeypatch):
    """Experts in safetensors directories are read from their files, one tensor at a time
    (tests/test_safetensors_io.py): no module is built for any of them."""
    base_dir, dirs = llama_family.save(tmp_path)
    tracker = Tracker(monkeypatch)
    tv = ExpertPool(base_dir, dirs).task_vectors()
    assert tracker.modules == [] and all(s.shape[0] == len(dirs) for s in tv.stacks.values())


def test_lora_adapters_one_expert_at_a_time(llama_family, tmp_path, monkeypatch):
    adapters = {f"lora{k}": tmp_path / f"lora{k}" for k in range(3)}
    for k, directory in enumerate(adapters.values()):
        save_lora_adapter(llama_family.base(), directory, seed=k)
    tracker = Tracker(monkeypatch)
    check_one_at_a_time(tracker, ExpertPool(llama_family.base(), adapters))


# ---- (b) peak RSS of a fresh process -------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from adamerge import ExpertPool

    torch.set_num_threads(1)
    root, k = sys.argv[1], int(sys.argv[2])

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    pool = ExpertPool(f"{root}/base", {f"e{i}": f"{root}/e{i}" for i in range(k)})
    # transformers maps safetensors lazily: read every base weight so the baseline really holds the base
    assert all(torch.isfinite(p).all() for p in pool.base.parameters())
    baseline = peak()
    tv = pool.task_vectors()
    expert = sum(p.numel() * p.element_size() for p in pool.base.parameters())
    stack = sum(s.numel() * s.element_size() for s in tv.stacks.values())
    print(json.dumps({"baseline": baseline, "peak": peak(), "expert": expert, "stack": stack}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_peak_rss_of_building_task_vectors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    k = 3
    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
    )  # ~21.5M parameters, 82 MiB in fp32; the largest tensor is 3 MiB, so temporaries stay small
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    for i in range(k):
        perturb(base, seed=i, scale=1e-3).save_pretrained(tmp_path / f"e{i}")
    del base
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    # a fixed mmap threshold: freed large blocks go back to the OS at once, as on a quiet allocator
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(k)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    grown, expert, stack = m["peak"] - m["baseline"], m["expert"], m["stack"]
    mib = {key: round(v / 2**20) for key, v in {"grown": grown, "expert": expert, "stack": stack}.items()}
    assert stack == k * expert
    assert grown <= stack + 1.5 * expert, f"building held more than the stack and ~one expert: {mib} MiB"
    assert grown < stack + (k - 1) * expert, f"as if several experts were alive at once: {mib} MiB"
