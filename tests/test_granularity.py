"""Granularities: coefficient counts, how they broadcast onto tensors, init values and transforms."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge import AdamergeError, Block, Chunk, Column, Layer, Task
from adamerge.granularity import GRANULARITIES, TRANSFORMS

K = 3


def set_up(granularity, family):
    granularity.setup(list(family.expert_names), list(family.infos().values()))
    return granularity


def distinct(n: int) -> torch.Tensor:
    """(K, n) coefficients that differ in every entry."""
    return torch.arange(K * n, dtype=torch.float32).view(K, n) / (K * n)


def expanded(granularity, name: str) -> torch.Tensor:
    info = granularity.infos[name]
    return granularity.broadcast(name).expand(K, *info.shape)


def test_registry_names():
    assert set(GRANULARITIES) == {"task", "layer", "block", "chunk", "column"}


# ---- Column (DAM) ----------------------------------------------------------------------------------


def test_column_linear_is_per_input_feature(llama_family):
    g = set_up(Column(), llama_family)
    name = "model.layers.0.self_attn.k_proj.weight"  # nn.Linear(32 -> 16): weight (out=16, in=32)
    assert g.raw[name.replace(".", "/")].shape == (K, 32)
    c = distinct(32)
    g.load_table({name: c})
    assert g.broadcast(name).shape == (K, 1, 32)
    full = expanded(g, name)
    for k in range(K):
        for i in (0, 7, 15):
            torch.testing.assert_close(full[k, i, :], c[k])  # column j of every row gets c[k, j]


def test_column_linear_merge_by_hand(llama_family):
    from adamerge import MergedModel

    pool, tv = llama_family.pooled
    name = "model.layers.1.mlp.down_proj.weight"  # (32, 64): in = 64
    merged = MergedModel(pool.base, tv, Column(init=0.0))
    c = distinct(64)
    merged.granularity.load_table({name: c})
    w = merged.merged_weights()[name]
    w0, stack = dict(pool.base.named_parameters())[name], tv.stacks[name]
    for j in (0, 13, 63):
        hand = w0[:, j] + sum(c[k, j] * stack[k, :, j] for k in range(K))
        torch.testing.assert_close(w[:, j], hand)


def test_column_conv1d_is_per_row(gpt2_family):
    g = set_up(Column(), gpt2_family)
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D stores (in=32, out=96)
    assert g.raw[name.replace(".", "/")].shape == (K, 32)
    c = distinct(32)
    g.load_table({name: c})
    assert g.broadcast(name).shape == (K, 32, 1)
    full = expanded(g, name)
    for k in range(K):
        for j in (0, 50, 95):
            torch.testing.assert_close(full[k, :, j], c[k])  # row i (input feature i) gets c[k, i]
    mlp_out = "transformer.h.0.mlp.c_proj.weight"  # (in=128, out=32)
    assert g.raw[mlp_out.replace(".", "/")].shape == (K, 128)


@pytest.mark.parametrize(
    ("family_name", "name", "count"),
    [
        ("llama", "model.embed_tokens.weight", 32),  # embedding (vocab, hidden): per hidden dim
        ("gpt2", "transformer.wte.weight", 32),
        ("gpt2", "transformer.wpe.weight", 32),
    ],
)
def test_column_embedding_is_per_hidden_dim(family_name, name, count, llama_family, gpt2_family):
    family = {"llama": llama_family, "gpt2": gpt2_family}[family_name]
    g = set_up(Column(), family)
    c = distinct(count)
    g.load_table({name: c})
    full = expanded(g, name)
    assert g.broadcast(name).shape == (K, 1, count)
    torch.testing.assert_close(full[:, 5, :], c)
    torch.testing.assert_close(full[:, -1, :], c)


@pytest.mark.parametrize(
    ("family_name", "name"),
    [("llama", "model.norm.weight"), ("llama", "model.layers.0.input_layernorm.weight"),
     ("gpt2", "transformer.ln_f.weight"), ("gpt2", "transformer.h.1.ln_2.bias")],
)
def test_column_norm_is_per_hidden_dim(family_name, name, llama_family, gpt2_family):
    family = {"llama": llama_family, "gpt2": gpt2_family}[family_name]
    g = set_up(Column(), family)
    c = distinct(32)
    g.load_table({name: c})
    torch.testing.assert_close(expanded(g, name), c)


@pytest.mark.parametrize(
    ("family_name", "name", "size"),
    [("gpt2", "transformer.h.0.attn.c_attn.bias", 96), ("gpt2", "transformer.h.0.mlp.c_fc.bias", 128),
     ("bert", "bert.encoder.layer.0.intermediate.dense.bias", 64), ("bert", "bert.pooler.dense.bias", 32)],
)
def test_column_bias_is_one_scalar(family_name, name, size, gpt2_family, bert_family):
    family = {"gpt2": gpt2_family, "bert": bert_family}[family_name]
    g = set_up(Column(), family)
    assert g.raw[name.replace(".", "/")].shape == (K, 1)
    c = torch.tensor([[0.1], [0.2], [0.7]])
    g.load_table({name: c})
    torch.testing.assert_close(expanded(g, name), c.expand(K, size))


def test_column_bert_matrices(bert_family):
    g = set_up(Column(), bert_family)
    assert g.raw["bert/encoder/layer/0/output/dense/weight"].shape == (K, 64)  # nn.Linear(64 -> 32)
    assert g.raw["bert/embeddings/token_type_embeddings/weight"].shape == (K, 32)


# ---- row chunks: Layer, Block, Chunk -----------------------------------------------------------------


def row_owner(rows: int, n: int) -> torch.Tensor:
    """Which chunk each row belongs to, as torch.tensor_split partitions them."""
    owner = torch.empty(rows, dtype=torch.long)
    for i, part in enumerate(torch.tensor_split(torch.arange(rows), n)):
        owner[part] = i
    return owner


def check_row_chunks(g, name: str, n: int) -> None:
    info = g.infos[name]
    assert g.raw[name.replace(".", "/")].shape == (K, n)
    c = distinct(n)
    g.load_table({name: c})
    full = expanded(g, name).reshape(K, info.shape[0], -1)
    owner = row_owner(info.shape[0], n)
    for r in range(info.shape[0]):
        torch.testing.assert_close(full[:, r, :], c[:, owner[r], None].expand(K, full.shape[2]))


def test_layer_is_one_per_tensor(llama_family):
    g = set_up(Layer(), llama_family)
    assert len(g.raw) == len(llama_family.infos())
    assert all(p.shape == (K, 1) for p in g.raw.values())
    c = torch.tensor([[0.1], [0.4], [0.9]])
    name = "model.layers.0.mlp.up_proj.weight"
    g.load_table({name: c})
    torch.testing.assert_close(expanded(g, name), c[:, :, None].expand(K, 64, 32))


def test_task_is_one_shared_coefficient(gpt2_family):
    g = set_up(Task(init=0.25), gpt2_family)
    assert list(g.raw) == ["task"] and g.raw["task"].shape == (K, 1)
    assert all(g.keys[n] == "task" for n in gpt2_family.infos())
    g.load_table({"task": torch.tensor([[0.1], [0.2], [0.3]])})
    for name in ("transformer.wte.weight", "transformer.h.1.attn.c_attn.bias"):
        torch.testing.assert_close(g.broadcast(name).flatten(), torch.tensor([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("partitions", [1, 3, 5])
def test_block_partitions_rows(llama_family, partitions):
    g = set_up(Block(partitions=partitions, partition="rows"), llama_family)
    check_row_chunks(g, "model.layers.0.mlp.gate_proj.weight", partitions)  # 64 rows
    check_row_chunks(g, "model.norm.weight", partitions)  # 1-D: 32 rows


def test_block_with_fewer_rows_than_partitions(bert_family):
    g = set_up(Block(partitions=8, partition="rows"), bert_family)
    check_row_chunks(g, "bert.embeddings.token_type_embeddings.weight", 2)  # (2, 32): one partition per row
    check_row_chunks(g, "bert.pooler.dense.weight", 8)
    with pytest.raises(AdamergeError, match=r"granularity\.partitions=0 must be >= 1"):
        Block(partitions=0)


def test_chunk_globs_and_counts(llama_family):
    counts = {"model.layers.1.mlp.up_proj.weight": 2}
    g = set_up(Chunk(chunks={"*gate_proj*": 8, "*.mlp.*": 4, "*embed*": 5}, counts=counts, chunking="rows"),
               llama_family)
    shapes = {name.replace("/", "."): p.shape[1] for name, p in g.raw.items()}
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == 8  # first matching glob wins
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == 8
    assert shapes["model.layers.0.mlp.up_proj.weight"] == 4
    assert shapes["model.layers.0.mlp.down_proj.weight"] == 4
    assert shapes["model.layers.1.mlp.up_proj.weight"] == 2  # exact count overrides the glob
    assert shapes["model.embed_tokens.weight"] == 5
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == 1  # no match: one chunk
    check_row_chunks(g, "model.embed_tokens.weight", 5)  # 64 rows -> 13, 13, 13, 13, 12
    check_row_chunks(g, "model.layers.0.mlp.down_proj.weight", 4)


def test_chunk_conv1d_splits_stored_rows(gpt2_family):
    g = set_up(Chunk(chunks={"*c_fc.weight": 3}, chunking="rows"), gpt2_family)
    check_row_chunks(g, "transformer.h.0.mlp.c_fc.weight", 3)


def test_chunk_more_chunks_than_rows(llama_family):
    g = Chunk(chunks={"*k_proj.weight": 17}, chunking="rows")
    message = r"17 chunks for 'model\.layers\.0\.self_attn\.k_proj\.weight', which has 16 rows"
    with pytest.raises(AdamergeError, match=message):
        set_up(g, llama_family)
    with pytest.raises(AdamergeError, match=r"0 chunks for 'model\.norm\.weight'"):
        set_up(Chunk(counts={"model.norm.weight": 0}), llama_family)


# ---- init values and transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["identity", "clamp", "sigmoid", "tanh"])
@pytest.mark.parametrize("cls", [Task, Layer, Column])
def test_transform_inverse_gives_the_init(llama_family, transform, cls):
    g = set_up(cls(init=0.3, transform=transform), llama_family)
    for values in g.table().values():
        torch.testing.assert_close(values, torch.full_like(values, 0.3))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(g.broadcast(name), torch.full_like(g.broadcast(name), 0.3))


def test_init_per_expert(llama_family):
    init = {"chat": 0.7, "math": 0.1, "code": 0.2}  # order of the mapping does not matter
    for transform in ("identity", "sigmoid", "softmax"):
        g = set_up(Layer(init=init, transform=transform), llama_family)
        for values in g.table().values():
            torch.testing.assert_close(values[:, 0], torch.tensor([0.1, 0.2, 0.7]))


def test_softmax_init_is_normalized_over_experts(llama_family):
    g = set_up(Task(init=0.3, transform="softmax"), llama_family)
    torch.testing.assert_close(g.table()["task"], torch.full((K, 1), 1 / 3))


def test_zero_init_where_the_transform_reaches_zero(llama_family):
    for transform in ("identity", "clamp", "tanh"):
        g = set_up(Task(init=0.0, transform=transform), llama_family)
        torch.testing.assert_close(g.table()["task"], torch.zeros(K, 1))


def test_init_missing_an_expert(llama_family):
    with pytest.raises(AdamergeError, match=r"no value for expert\(s\) \['chat'\]"):
        set_up(Layer(init={"math": 0.1, "code": 0.2}), llama_family)


@pytest.mark.parametrize(
    ("init", "transform", "message"),
    [
        (math.nan, "identity", r"granularity\.init=nan must be a non-negative number"),
        (-0.1, "identity", r"granularity\.init=-0\.1 must be a non-negative number"),
        ({"math": 0.1, "code": -1.0, "chat": 0.2}, "identity", r"init=-1\.0"),
        (0.0, "sigmoid", r"init=0\.0 is outside what transform='sigmoid' can produce"),
        (1.0, "sigmoid", r"init=1\.0 is outside what transform='sigmoid'"),
        (1.5, "clamp", r"init=1\.5 is outside what transform='clamp'"),
        (1.0, "tanh", r"init=1\.0 is outside what transform='tanh'"),
        (0.0, "softmax", r"init=0\.0 is outside what transform='softmax'"),
    ],
)
def test_invalid_init(llama_family, init, transform, message):
    with pytest.raises(AdamergeError, match=message):
        set_up(Layer(init=init, transform=transform), llama_family)


def test_invalid_names():
    with pytest.raises(AdamergeError, match=r"granularity\.transform='relu'"):
        Layer(transform="relu")
    with pytest.raises(AdamergeError, match=r"granularity\.space='deltas'"):
        Layer(space="deltas")


def test_table_round_trip(gpt2_family):
    g = set_up(Chunk(chunks={"*c_fc.weight": 4}, transform="sigmoid"), gpt2_family)
    table = {name: torch.rand(values.shape) * 0.8 + 0.1 for name, values in g.table().items()}
    g.load_table(table)
    for name, values in g.table().items():
        torch.testing.assert_close(values, table[name])
    with pytest.raises(AdamergeError, match="coefficients for unknown group 'nope'"):
        g.load_table({"nope": torch.zeros(K, 1)})


def test_transforms_table():
    assert set(TRANSFORMS) == {"identity", "clamp", "sigmoid", "tanh", "softmax"}
    x = torch.tensor([[0.2], [0.5], [0.3]])  # inside every range, and sums to 1 over experts for softmax
    for fwd, inv in TRANSFORMS.values():
        torch.testing.assert_close(fwd(inv(x)), x)
    torch.testing.assert_close(TRANSFORMS["softmax"][0](torch.zeros(3, 2)).sum(0), torch.ones(2))
