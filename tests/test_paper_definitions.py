"""Learned methods as their papers' released code defines them, each pinned against a few lines of
reference written here: aTLAS's random partitions, Expert Merging's flat chunks, DAM's KL over every
token; the training mode each paper's loop uses; objectives' declared capabilities and state; and
calibration prompts with the BOS and chat template the experts saw."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from tiny import assert_refold_writes_the_same, build_module, quiet_trainer, tiny_expert, tiny_parts
from tokenizers import processors

from adamerge import AdamergeError, Block, Chunk, MergedModel
from adamerge.data import Collator
from adamerge.granularity import chunk_limit
from adamerge.objectives import OBJECTIVES, Projected
from adamerge.prompts import PromptEncoder, decide_bos
from adamerge.zoo.tokenizer import char_tokenizer

K = 3


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def set_up(granularity, family):
    granularity.setup(list(family.expert_names), list(family.infos().values()))
    return granularity


def distinct(n: int) -> torch.Tensor:
    return torch.arange(K * n, dtype=torch.float32).view(K, n) / (K * n)


# ---- aTLAS: random per-element partitions ------------------------------------------------------------


def atlas_masks(infos, partitions: int, seed: int) -> dict[tuple, torch.Tensor]:
    """aTLAS's ``mask_mats``: ``torch.randint(P, shape)`` once per tensor shape, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    masks: dict[tuple, torch.Tensor] = {}
    for info in infos:
        if tuple(info.shape) not in masks:
            masks[tuple(info.shape)] = torch.randint(partitions, tuple(info.shape), generator=gen)
    return masks


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_atlas_random_partitions_match_the_reference(family_name, llama_family, gpt2_family):
    family = {"llama": llama_family, "gpt2": gpt2_family}[family_name]
    g = set_up(Block(partitions=4, seed=7), family)
    masks = atlas_masks(family.infos().values(), 4, 7)
    for name, info in family.infos().items():
        assert g.raw[name.replace(".", "/")].shape == (K, 4)  # vectors too: every tensor has P partitions
        c = distinct(4)
        g.load_table({name: c})
        mask = masks[tuple(info.shape)]
        torch.testing.assert_close(g.broadcast(name), torch.stack([c[k][mask] for k in range(K)]))
    big = masks[tuple(family.infos()[next(iter(family.infos()))].shape)]
    assert big.flatten().bincount(minlength=4).min() > 0.15 * big.numel()  # roughly uniform


def test_atlas_partitions_merge_by_hand_and_depend_on_the_seed(llama_family):
    pool, tv = llama_family.pooled
    merged = MergedModel(pool.base, tv, Block(partitions=3, seed=1))
    name = "model.layers.1.mlp.down_proj.weight"
    c = distinct(3)
    merged.granularity.load_table({name: c})
    mask = atlas_masks([tv.infos[n] for n in merged.names], 3, 1)[tuple(tv.infos[name].shape)]
    w0, stack = dict(pool.base.named_parameters())[name], tv.stacks[name]
    hand = w0 + sum(c[k][mask] * stack[k] for k in range(K))
    torch.testing.assert_close(merged.merged_weights()[name], hand)
    other = set_up(Block(partitions=3, seed=2), llama_family)
    key = "x".join(map(str, tv.infos[name].shape))
    assert not torch.equal(getattr(other.masks, key), getattr(merged.granularity.masks, key))


def test_atlas_masks_are_saved_and_restored(llama_family):
    saved = set_up(Block(partitions=5, seed=3), llama_family).state_tensors()
    assert saved and all(k.startswith("granularity.partition.") for k in saved)
    assert all(m.dtype == torch.uint8 for m in saved.values())
    other = set_up(Block(partitions=5, seed=4), llama_family)
    other.load_state_tensors(saved)
    assert all(torch.equal(other.state_tensors()[k], v) for k, v in saved.items())
    with pytest.raises(AdamergeError, match="no partition mask of shape"):
        other.load_state_tensors({})


def test_atlas_rows_option_and_one_partition_keep_row_blocks(llama_family):
    rows = set_up(Block(partitions=3, partition="rows"), llama_family)
    assert not rows.state_tensors() and rows.raw["model/norm/weight"].shape == (K, 3)
    single = set_up(Block(), llama_family)  # P = 1: one coefficient per tensor, no mask
    assert not single.state_tensors() and single.broadcast("model.norm.weight").shape == (K, 1)
    with pytest.raises(AdamergeError, match=r"granularity\.partition='cols'"):
        Block(partition="cols")


def test_atlas_refold_reproduces_the_random_partitions(tmp_path):
    """A trained aTLAS x 3 merge, refolded by ``adamerge fold``, gives the same weights."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from tiny import write_zoo

    from adamerge.overrides import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=4)
    overrides = [*zoo.cli_args(), "trainer.accelerator=cpu", "trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false", "logger=none", f"output_dir={tmp_path / 'out'}", "seed=5"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=open_mapping_overrides(overrides)), resolve=False)
    cfg.update(granularity={"name": "block", "init": 0.3, "partitions": 3, "seed": 5},
               objective={"name": "entropy"}, optim={"name": "adam", "lr": 0.05},
               trainer={**cfg["trainer"], "max_steps": 2, "accumulate_grad_batches": 1})
    cfg["data"]["batch_size"] = 4
    run(OmegaConf.create(cfg), tmp_path / "run")
    coefficients = load_file(tmp_path / "out" / "adamerge_coefficients.safetensors")
    assert any(k.startswith("granularity.partition.") for k in coefficients)
    assert_refold_writes_the_same(tmp_path / "out", tmp_path / "again")


# ---- Expert Merging: chunks of the flattened tensor ---------------------------------------------------


def flat_reference(c: torch.Tensor, shape: tuple, n: int) -> torch.Tensor:
    """Expert Merging's ``scale_tensor_by_coeffs``: coefficient i scales ``torch.chunk(flat, n)[i]``."""
    pieces = torch.chunk(torch.arange(math.prod(shape)), n)
    owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pieces)])
    return c[:, owner].reshape(K, *shape)


@pytest.mark.parametrize(("family_name", "name", "n"), [
    ("llama", "model.layers.0.mlp.gate_proj.weight", 5),  # (64, 32): chunks cut across rows
    ("llama", "model.norm.weight", 3),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", 7),  # Conv1D (in, out), flattened as stored
])
def test_expert_merging_flat_chunks_match_torch_chunk(family_name, name, n, llama_family, gpt2_family):
    family = {"llama": llama_family, "gpt2": gpt2_family}[family_name]
    g = set_up(Chunk(chunks={name: n}), family)
    c = distinct(n)
    g.load_table({name: c})
    shape = tuple(g.infos[name].shape)
    torch.testing.assert_close(g.broadcast(name), flat_reference(c, shape, n))


def test_flat_chunk_count_is_what_torch_chunk_makes(llama_family):
    name = "model.norm.weight"  # 32 elements: torch.chunk(., 31) makes 16 chunks of 2
    g = set_up(Chunk(counts={name: 31}), llama_family)
    assert g.raw[name.replace(".", "/")].shape == (K, len(torch.chunk(torch.arange(32), 31))) == (K, 16)
    again = set_up(Chunk(counts={name: 16}), llama_family)  # a refold reads 16 from the table: same layout
    c = distinct(16)
    g.load_table({name: c})
    again.load_table({name: c})
    torch.testing.assert_close(again.broadcast(name), g.broadcast(name))
    with pytest.raises(AdamergeError, match=r"33 chunks for 'model\.norm\.weight', which has 32 elements"):
        set_up(Chunk(counts={name: 33}), llama_family)
    with pytest.raises(AdamergeError, match=r"granularity\.chunking='cols'"):
        Chunk(chunking="cols")
    info = llama_family.infos()["model.layers.0.mlp.gate_proj.weight"]
    assert (chunk_limit(info, "flat"), chunk_limit(info, "rows")) == (64 * 32, 64)


def test_expert_merging_pp_allocates_flat_chunks_beyond_the_row_count(llama_family):
    """Expert Merging++ with flat chunks may give a tensor more chunks than it has rows."""
    from adamerge.allocation import allocate_chunks

    infos = llama_family.infos()
    names = ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]  # (16, 32) and (32,)
    counts = allocate_chunks({names[0]: 0.9, names[1]: 0.1}, 60, {n: chunk_limit(infos[n], "flat") for n in names})
    assert counts == {names[0]: 53, names[1]: 7}  # 1 each, then 52.2 and 5.8 of 58: largest remainder
    rows = allocate_chunks({names[0]: 0.9, names[1]: 0.1}, 60, {n: chunk_limit(infos[n], "rows") for n in names})
    assert rows == {names[0]: 16, names[1]: 32}  # capped at the rows: 12 of the budget have nowhere to go


# ---- DAM: KL over every non-padded token, teacher-forced ----------------------------------------------


def test_dam_kl_over_every_token_matches_the_reference(parts):
    """T^2 * mean over every token of each row of KL(expert/T || merged/T), full vocabulary, with the
    expert a separate model: what DAM's trainer computes (batch 1 per step)."""
    tok, t = parts.tokenizer, 2.0
    merged, data, module = build_module(parts, {"name": "column", "init": 0.5}, {"name": "dam"})
    assert (module.objective.positions, module.objective.teacher, module.objective.top_k) == ("all", "online", None)
    batch = next(iter(data.loader("add", shuffle=False)))
    expert = tiny_expert(parts.pool.base, 0)  # "add" is expert 0
    total, tokens = 0.0, 0
    with torch.no_grad():
        loss = module.objective.task_loss(merged, "add", batch)
        for row in parts.rows["add"]:
            ids = torch.tensor([tok(row["prompt"])["input_ids"]])
            teacher = torch.log_softmax(expert(input_ids=ids).logits[0] / t, -1)
            student = torch.log_softmax(merged(input_ids=ids).logits[0] / t, -1)
            total += float((teacher.exp() * (teacher - student)).sum())
            tokens += ids.shape[1]
        cached = OBJECTIVES["dam"](teacher="cached")
        cached.setup(merged, data, tok)
        cached_loss = cached.task_loss(merged, "add", batch)
    assert float(loss) == pytest.approx(t**2 * total / tokens, rel=1e-4)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=1e-7)


def test_all_positions_are_every_non_padded_token(parts):
    objective = OBJECTIVES["entropy"](positions="all")
    batch = Collator(parts.tokenizer)(list(enumerate(parts.rows["rev"])))
    rows, n_scored = objective.scored_rows(parts.pool.base, batch)
    assert n_scored == batch["attention_mask"].sum(1).tolist() == [len(r) for r in rows]
    with pytest.raises(AdamergeError, match=r"objective\.teacher='live'"):
        OBJECTIVES["align"](teacher="live")


# ---- training mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "dropout"), [
    ({"name": "entropy"}, False), ({"name": "ce"}, False), ({"name": "align", "positions": "last"}, True),
    ({"name": "dam", "positions": "last"}, True), ({"name": "entropy", "dropout": True}, True),
])
def test_training_runs_in_the_papers_mode(parts, objective, dropout):
    import pytorch_lightning as pl

    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append({m.training for m in module.merged.modules()})

    merged, data, module = build_module(parts, {"name": "task"}, objective)
    assert type(module.objective).dropout == (objective["name"] in ("align", "dam"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(1, callbacks=[Record()]).fit(module, datamodule=data)
    assert seen == [{dropout}]
    assert not any("eval mode" in str(w.message) for w in caught)
    assert not any(m.training for m in merged.modules())  # eval again for the fold check and evaluation


# ---- declared capabilities and state ------------------------------------------------------------------


def test_objectives_declare_what_they_need():
    declared = {name: (cls.needs_data, cls.needs_labels, cls.supports_offload) for name, cls in OBJECTIVES.items()}
    assert declared == {"entropy": (True, False, True), "align": (True, False, True), "dam": (True, False, True),
                        "ce": (True, True, True), "projected": (False, False, False),
                        "wudi": (False, False, False)}


def test_doge_state_round_trip(llama_family):
    pool, tv = llama_family.pooled
    trained = MergedModel(pool.base, tv, Block())
    objective = Projected()
    objective.setup(trained, None)
    with torch.no_grad():
        for delta in objective.deltas.values():
            delta.normal_(0, 0.01)
    objective.finish(trained)
    state = objective.state_tensors()
    assert state and all(k.startswith("objective.delta.") for k in state)
    fresh = MergedModel(pool.base, tv, Block())
    Projected().load_state_tensors(fresh, state)
    for name in objective.names:
        torch.testing.assert_close(fresh.stack(name), trained.stack(name), rtol=0, atol=0)
    with pytest.raises(AdamergeError, match="no DOGE delta"):
        Projected().load_state_tensors(MergedModel(pool.base, tv, Block()), {})


# ---- calibration prompts: BOS and chat template ---------------------------------------------------------


def without_post_processor(tok):
    """The char tokenizer as a tokenizer that does not add its BOS itself (a lost post-processor)."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    return tok


def test_add_bos_auto_follows_the_tokenizer_and_the_model_config(caplog):
    tok = char_tokenizer()
    bos, text = tok.bos_token_id, tok("ab", add_special_tokens=False)["input_ids"]
    assert PromptEncoder(tok)("ab") == [bos, *text]  # adds it itself
    assert PromptEncoder(tok, add_bos=False)("ab") == text
    plain = without_post_processor(char_tokenizer())
    assert PromptEncoder(plain)("ab") == text  # no evidence the experts saw a BOS
    with caplog.at_level(logging.INFO, logger="adamerge.prompts"):
        assert PromptEncoder(plain, model_bos_id=bos)("ab") == [bos, *text]
    assert "start with BOS: the tokenizer does not add its BOS, but the model config names it" in caplog.text
    assert PromptEncoder(plain, add_bos=True)("ab") == [bos, *text]
    gpt2_style = without_post_processor(char_tokenizer())
    gpt2_style.bos_token = gpt2_style.eos_token
    assert decide_bos(gpt2_style, "auto", gpt2_style.eos_token_id) == (
        False, "the tokenizer's BOS is its EOS token, which it does not add (GPT-2 style)")
    with pytest.raises(AdamergeError, match=r"data\.add_bos='yes'; choose from auto, true, false"):
        PromptEncoder(tok, add_bos="yes")


def test_add_bos_without_a_bos_token(tmp_path, tokenizer_factory):
    from transformers import AutoTokenizer

    tokenizer_factory(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert PromptEncoder(tok, model_bos_id=1)("w1 w2") == [1, 2]
    with pytest.raises(AdamergeError, match="data.add_bos=true, but the tokenizer has no BOS token"):
        PromptEncoder(tok, add_bos=True)


def test_chat_template_and_truncation_keep_the_bos():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}user {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}bot {% endif %}")
    templated = tok("user add 1+2= bot ", add_special_tokens=False)["input_ids"]
    assert PromptEncoder(tok, chat_template=True)("add 1+2=") == templated  # the template decides: no BOS
    assert PromptEncoder(tok, add_bos=True, chat_template=True)("add 1+2=") == [tok.bos_token_id, *templated]
    with pytest.raises(AdamergeError, match="data.chat_template=true, but the tokenizer has no chat template"):
        PromptEncoder(char_tokenizer(), chat_template=True)
    assert PromptEncoder(tok, max_length=4)("abcdef") == [tok.bos_token_id, *tok("def", add_special_tokens=False)
                                                          ["input_ids"]]


def test_collator_prompts_get_the_decided_bos():
    tok = without_post_processor(char_tokenizer())
    rows = [(0, {"prompt": "ab"}), (1, {"prompt": "abcd"})]
    batch = Collator(tok, model_bos_id=tok.bos_token_id)(rows)
    starts = [ids[mask.bool()][0] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert starts == [tok.bos_token_id] * 2
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
