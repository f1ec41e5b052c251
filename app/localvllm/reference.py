"""An independent reference: next-token logprobs computed straight from the GGUF with numpy.

Used by the converter accuracy test. It reads the GGUF's tensors in llama.cpp's own layout
(q/k rows permuted for interleaved-pair RoPE) and applies RoPE the way llama.cpp does on them
(rotating adjacent pairs), so it shares neither the un-permutation nor the layer naming with
`convert.py`, and no code with vLLM. Run by the vLLM venv's python (it has `gguf`)::

    <venv>/bin/python reference.py --gguf MODEL.gguf --ids 504,3575,282 --top 5 [--layers 30,28]

prints JSON {"top": {"30": [[id, logprob, gguf_token_text], ...]}, "prompt_tokens": [...]}
(float64 math; `--layers 30,28` computes both models from one load).

`forward` is pure numpy so tests can run it on tiny synthetic weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Hyper:
    n_head: int
    n_kv_head: int
    eps: float
    rope_base: float


def _rms_norm(x: Array, weight: Array, eps: float) -> Array:
    result: Array = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight
    return result


def rope_interleaved(x: Array, base: float) -> Array:
    """llama.cpp's normal RoPE on (T, heads, d): rotates pairs (2i, 2i+1) by pos * base^(-2i/d)."""
    seq, _, dim = x.shape
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv[None, :]  # (T, d/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(weights: Mapping[str, Array], ids: Sequence[int], hyper: Hyper, n_layers: int) -> Array:
    """Log-probabilities of the token after `ids` (GGUF tensor names and layouts)."""
    embed = weights["token_embd.weight"]
    x = embed[np.asarray(ids)]
    seq = len(ids)
    head_dim = x.shape[1] // hyper.n_head
    group = hyper.n_head // hyper.n_kv_head
    causal = np.triu(np.full((seq, seq), -np.inf), k=1)
    for layer in range(n_layers):
        w = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"blk.{layer}.")}
        h = _rms_norm(x, w["attn_norm.weight"], hyper.eps)
        q = (h @ w["attn_q.weight"].T).reshape(seq, hyper.n_head, head_dim)
        k = (h @ w["attn_k.weight"].T).reshape(seq, hyper.n_kv_head, head_dim)
        v = (h @ w["attn_v.weight"].T).reshape(seq, hyper.n_kv_head, head_dim)
        q, k = rope_interleaved(q, hyper.rope_base), rope_interleaved(k, hyper.rope_base)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        attn = np.exp(scores)
        attn /= attn.sum(axis=-1, keepdims=True)
        heads = np.einsum("hqk,khd->qhd", attn, v).reshape(seq, -1)
        x = x + heads @ w["attn_output.weight"].T
        h = _rms_norm(x, w["ffn_norm.weight"], hyper.eps)
        gate = h @ w["ffn_gate.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ w["ffn_up.weight"].T)) @ (
            w["ffn_down.weight"].T
        )
    last = _rms_norm(x[-1], weights["output_norm.weight"], hyper.eps)
    logits = last @ weights.get("output.weight", embed).T
    shifted = logits - logits.max()
    result: Array = shifted - np.log(np.exp(shifted).sum())
    return result


def load_gguf(path: Path, n_layers: int) -> tuple[dict[str, Array], Hyper, list[str]]:
    from gguf import GGUFReader  # only in the vLLM venv
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("llama.") or key == "tokenizer.ggml.tokens"
    }
    weights: dict[str, Array] = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= n_layers:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        array = dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(array, dtype=np.float64).reshape(shape)
    n_head = int(meta["llama.attention.head_count"])
    hyper = Hyper(
        n_head=n_head,
        n_kv_head=int(meta.get("llama.attention.head_count_kv", n_head)),
        eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
    )
    return weights, hyper, list(meta["tokenizer.ggml.tokens"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="next-token top-K from the GGUF, in numpy")
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--layers", default="", help="comma-separated layer counts; default: all")
    args = parser.parse_args(argv)
    ids = [int(part) for part in args.ids.split(",")]
    layer_counts = [int(part) for part in args.layers.split(",") if part]
    weights, hyper, tokens = load_gguf(args.gguf, max(layer_counts, default=10**9))
    if not layer_counts:
        layer_counts = [sum(1 for k in weights if k.endswith(".attn_q.weight"))]
    top: dict[int, list[list[Any]]] = {}
    for n_layers in layer_counts:
        logprobs = forward(weights, ids, hyper, n_layers)
        order = np.argsort(-logprobs, kind="stable")[: args.top]
        top[n_layers] = [[int(i), float(logprobs[i]), tokens[i]] for i in order]
    result = {"top": top, "prompt_tokens": [tokens[i] for i in ids]}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
