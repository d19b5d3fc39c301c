"""Shared tiny-model fixtures: random Llama / GPT-2 / BERT bases built inline, experts as seeded perturbations.

Nothing is downloaded: every model comes from a transformers config with a handful of dimensions.
A ``Family`` bundles a base, K=3 experts (zero-argument builders, so a pool can drop each one after
use), matching inputs and the Auto class that loads the family from a directory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting turn a shared 2-core machine into a queue (500 tiny greedy
# evaluations: 70 s spinning vs 0.7 s passive, same results); set before torch is imported, and
# inherited by the CLI processes the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread hand-off
# makes each kernel ~1000x slower (12 us -> 12 ms for a 64x32 @ 32x96 addmm).
torch.set_num_threads(1)

VOCAB = 64
SEQ = 32  # batch 2 x SEQ 32 = every token id once, every position: gradients reach every row
EXPERTS = ("math", "code", "chat")


def llama(seed: int = 0, **overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def gpt2(seed: int = 0, **overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


def bert(seed: int = 0, **overrides) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=3, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**cfg, **overrides})).eval()


@torch.no_grad()
def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """A copy of ``model`` with every parameter moved by seeded Gaussian noise (tied weights move once)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in out.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out.eval()


def full_inputs(name: str) -> dict[str, torch.Tensor]:
    """Batch 2 x SEQ: a permutation of the whole vocabulary, so every embedding row is used."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randperm(VOCAB, generator=gen).view(2, SEQ)
    inputs = {"input_ids": ids}
    if name == "bert":
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(2, SEQ).contiguous()
    return inputs


def output_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@dataclass
class Family:
    """A base model, K experts derived from it, inputs that exercise every parameter."""

    name: str
    auto_class: str
    template: nn.Module
    inputs: dict[str, torch.Tensor] = field(repr=False)
    expert_names: tuple[str, ...] = EXPERTS

    def base(self) -> nn.Module:
        return copy.deepcopy(self.template).eval()

    def expert(self, k: int | str) -> nn.Module:
        k = self.expert_names.index(k) if isinstance(k, str) else k
        return perturb(self.template, seed=k)

    def expert_builders(self) -> dict[str, Callable[[], nn.Module]]:
        return {name: (lambda k=k: self.expert(k)) for k, name in enumerate(self.expert_names)}

    def pool(self, **kwargs):
        from adamerge import ExpertPool

        return ExpertPool(self.base(), self.expert_builders(), auto_class=self.auto_class, **kwargs)

    @cached_property
    def pooled(self):
        """(pool, task vectors) built once per session; MergedModel only reads them."""
        pool = self.pool()
        return pool, pool.task_vectors()

    def infos(self) -> dict:
        return {i.name: i for i in self.pooled[0].tensor_infos()}

    def save(self, root: Path) -> tuple[Path, dict[str, Path]]:
        """Write base and experts with ``save_pretrained``; returns (base dir, {name: expert dir})."""
        base_dir = root / "base"
        self.base().save_pretrained(base_dir)
        dirs = {}
        for k, name in enumerate(self.expert_names):
            dirs[name] = root / name
            self.expert(k).save_pretrained(dirs[name])
        return base_dir, dirs


BUILDERS = {"llama": (llama, "AutoModelForCausalLM"), "gpt2": (gpt2, "AutoModelForCausalLM"),
            "bert": (bert, "AutoModelForSequenceClassification")}


def make_family(name: str) -> Family:
    build, auto_class = BUILDERS[name]
    return Family(name, auto_class, build(), full_inputs(name))


@pytest.fixture(scope="session")
def llama_family() -> Family:
    return make_family("llama")


@pytest.fixture(scope="session")
def gpt2_family() -> Family:
    return make_family("gpt2")


@pytest.fixture(scope="session")
def bert_family() -> Family:
    return make_family("bert")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def family(request) -> Family:
    """Llama (nn.Linear, RMSNorm, untied head) and GPT-2 (Conv1D, LayerNorm, head tied to wte)."""
    return make_family(request.param)


@pytest.fixture(scope="session")
def tokenizer_factory():
    """Save a tiny word-level fast tokenizer (built with ``tokenizers``) into a directory."""

    def save(directory: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(directory)

    return save


def save_lora_adapter(base: nn.Module, directory: Path, seed: int = 3) -> nn.Module:
    """Save a PEFT LoRA adapter (q_proj, v_proj; r=4, alpha=8) with random nonzero lora_B for ``base``.

    Returns the model peft itself merges with ``merge_and_unload`` (on a copy): the reference.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(directory)
    return copy.deepcopy(peft_model).merge_and_unload().eval()


@pytest.fixture
def lora_expert(llama_family: Family, tmp_path: Path):
    """A LoRA adapter on the Llama base: (adapter dir, peft's own merge_and_unload of it)."""
    adapter_dir = tmp_path / "lora"
    reference = save_lora_adapter(llama_family.base(), adapter_dir)
    return adapter_dir, reference
