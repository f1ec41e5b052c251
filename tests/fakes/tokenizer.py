"""The fake vLLM's tokenizer (tests/fakes/vllm.py: id = UTF-8 byte + 3 after three special
tokens) as a real `tokenizers` tokenizer.json, so the gateway's in-process decoding
(DUAL_VLLM_TOKENIZER, app/detok.py) can run against the fakes."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.vllm import BYTE_OFFSET, SPECIAL_TOKENS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel decoder inverts)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def write_fake_tokenizer(folder: Path) -> Path:
    """Write tokenizer.json (+ tokenizer_config.json) into `folder`; returns the folder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    vocab = dict(SPECIAL_TOKENS)
    vocab.update({table[b]: b + BYTE_OFFSET for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    return folder
