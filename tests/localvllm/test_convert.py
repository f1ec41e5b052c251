"""The converter's pure parts on synthetic arrays (numpy only; no gguf, no vLLM venv)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from app.localvllm.convert import (
    ConversionError,
    block_index,
    build_config,
    convert_tensors,
    hf_name,
    permute_qk,
    unpermute_qk,
)
from app.localvllm.reference import Hyper, forward, rope_interleaved

Array = npt.NDArray[np.float64]


@pytest.mark.parametrize(
    ("gguf", "hf"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight"),
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.12.ffn_gate.weight", "model.layers.12.mlp.gate_proj.weight"),
        ("blk.12.ffn_up.weight", "model.layers.12.mlp.up_proj.weight"),
        ("blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight"),
    ],
)
def test_tensor_names_map_to_hf_llama(gguf: str, hf: str) -> None:
    assert hf_name(gguf) == hf


def test_rope_factors_are_dropped_and_unknown_names_refused() -> None:
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(ConversionError, match=r"blk\.0\.ssm_conv"):
        hf_name("blk.0.ssm_conv.weight")


def test_block_index() -> None:
    assert block_index("blk.17.ffn_up.weight") == 17
    assert block_index("token_embd.weight") is None


def test_permute_matches_llama_cpp_on_a_known_head() -> None:
    # One head of 4 rows: HF rotates (0, 2) and (1, 3); llama.cpp wants the pairs adjacent.
    rows = np.arange(4.0)
    assert permute_qk(rows, 1).tolist() == [0.0, 2.0, 1.0, 3.0]
    assert unpermute_qk(np.array([0.0, 2.0, 1.0, 3.0]), 1).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(("n_head", "head_dim"), [(9, 64), (3, 64), (2, 8), (1, 2)])
def test_permutation_round_trip(n_head: int, head_dim: int) -> None:
    rng = np.random.default_rng(n_head * 100 + head_dim)
    weight = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
    permuted = permute_qk(weight, n_head)
    assert not np.array_equal(permuted, weight) or head_dim == 2
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), weight)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(weight, n_head), n_head), weight)


def test_odd_head_size_is_refused() -> None:
    with pytest.raises(ConversionError, match="heads"):
        unpermute_qk(np.zeros((9, 4), dtype=np.float32), 3)


def _rope_rotate_half(x: Array, base: float) -> Array:
    """HF llama's RoPE: dimension i rotates with i + d/2 (transformers' rotate_half)."""
    seq, _, dim = x.shape
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    result: Array = x * cos + rotated * sin
    return result


def test_unpermuted_projection_with_hf_rope_equals_gguf_projection_with_interleaved_rope() -> None:
    # The reason for the permutation: both layouts must give the same attention scores.
    rng = np.random.default_rng(7)
    n_head, head_dim, hidden, seq = 3, 8, 12, 5
    gguf_q = rng.standard_normal((n_head * head_dim, hidden))
    h = rng.standard_normal((seq, hidden))
    llama_cpp = rope_interleaved((h @ gguf_q.T).reshape(seq, n_head, head_dim), 10000.0)
    hf = _rope_rotate_half(
        (h @ unpermute_qk(gguf_q, n_head).T).reshape(seq, n_head, head_dim), 10000.0
    )
    llama_scores = np.einsum("qhd,khd->hqk", llama_cpp, llama_cpp)
    hf_scores = np.einsum("qhd,khd->hqk", hf, hf)
    np.testing.assert_allclose(hf_scores, llama_scores, rtol=1e-10, atol=1e-10)


def _synthetic_gguf(
    rng: np.random.Generator,
    n_layers: int,
    hidden: int,
    n_head: int,
    n_kv: int,
    ffn: int,
    vocab: int,
) -> dict[str, Array]:
    head_dim = hidden // n_head
    tensors = {
        "token_embd.weight": rng.standard_normal((vocab, hidden)),
        "output_norm.weight": 1.0 + 0.1 * rng.standard_normal(hidden),
    }
    for i in range(n_layers):
        shapes = {
            "attn_norm.weight": (hidden,),
            "attn_q.weight": (n_head * head_dim, hidden),
            "attn_k.weight": (n_kv * head_dim, hidden),
            "attn_v.weight": (n_kv * head_dim, hidden),
            "attn_output.weight": (hidden, n_head * head_dim),
            "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (ffn, hidden),
            "ffn_up.weight": (ffn, hidden),
            "ffn_down.weight": (hidden, ffn),
        }
        for name, shape in shapes.items():
            scale = 0.3 if len(shape) == 2 else 0.1
            tensors[f"blk.{i}.{name}"] = (1.0 if len(shape) == 1 else 0.0) + scale * (
                rng.standard_normal(shape)
            )
    return tensors


def _hf_forward(
    w: dict[str, Any], ids: list[int], n_head: int, n_kv: int, n_layers: int, base: float
) -> Array:
    """A transformers-style llama forward (rotate-half RoPE) over HF-named tensors."""
    eps = 1e-5

    def norm(x: Array, weight: Array) -> Array:
        result: Array = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight
        return result

    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    seq, hidden = x.shape
    head_dim = hidden // n_head
    mask = np.triu(np.full((seq, seq), -np.inf), k=1)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(seq, n_head, head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(seq, n_kv, head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(seq, n_kv, head_dim)
        q, k = _rope_rotate_half(q, base), _rope_rotate_half(k, base)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + mask
        a = np.exp(s - s.max(axis=-1, keepdims=True))
        a /= a.sum(axis=-1, keepdims=True)
        x = (
            x
            + np.einsum("hqk,khd->qhd", a, v).reshape(seq, -1) @ w[p + "self_attn.o_proj.weight"].T
        )
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ (
            w[p + "mlp.down_proj.weight"].T
        )
    logits = norm(x[-1], w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
    result: Array = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    return result


def test_converted_tensors_compute_what_the_gguf_computes_and_the_cut_keeps_first_layers() -> None:
    rng = np.random.default_rng(2024)
    n_head, n_kv, hidden, total = 4, 2, 32, 3  # head_dim 8: permute != unpermute
    gguf = _synthetic_gguf(rng, total, hidden, n_head, n_kv, ffn=24, vocab=40)
    ids = [3, 17, 5, 29, 11]
    hyper = Hyper(n_head=n_head, n_kv_head=n_kv, eps=1e-5, rope_base=10000.0)
    for layers in (3, 2):
        converted = convert_tensors(
            [(name, array.astype(np.float32)) for name, array in gguf.items()],
            n_layers=layers,
            n_head=n_head,
            n_kv_head=n_kv,
        )
        assert all(v.dtype == np.float32 for v in converted.values())
        assert sum(name.endswith("q_proj.weight") for name in converted) == layers
        assert f"model.layers.{layers}.self_attn.q_proj.weight" not in converted
        expected = forward(
            {k: v.astype(np.float32).astype(np.float64) for k, v in gguf.items()},
            ids,
            hyper,
            layers,
        )
        got = _hf_forward(dict(converted), ids, n_head, n_kv, layers, 10000.0)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    full = forward(gguf, ids, hyper, 3)
    cut = forward(gguf, ids, hyper, 2)
    assert np.abs(full - cut).max() > 1e-3  # the cut is a different model


def test_a_cut_deeper_than_the_file_is_refused() -> None:
    tensors = [("blk.0.attn_q.weight", np.zeros((4, 4), dtype=np.float32))]
    with pytest.raises(ConversionError, match=r"lacks blocks \[1\]"):
        convert_tensors(tensors, n_layers=2, n_head=1, n_kv_head=1)


META: dict[str, Any] = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5).item(),
    "llama.rope.freq_base": 100000.0,
    "tokenizer.ggml.tokens": ["a"] * 49152,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}


def test_config_from_metadata() -> None:
    config = build_config(META, n_layers=28, tied=True)
    assert config["num_hidden_layers"] == 28
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"]) == (576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["rms_norm_eps"] == 1e-5  # not 9.99999974e-06 from the float32 in the file
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("layers", [0, 31])
def test_config_refuses_impossible_cuts(layers: int) -> None:
    with pytest.raises(ConversionError, match="layers"):
        build_config(META, n_layers=layers, tied=True)


def test_config_refuses_other_architectures() -> None:
    with pytest.raises(ConversionError, match="qwen2"):
        build_config({**META, "general.architecture": "qwen2"}, n_layers=2, tied=True)
