"""app/detok.py: the windowed text equals one decode of all the ids, for byte-level and
SentencePiece-like decoders; the local tokenizer gives the same text as the teacher's
/detokenize (tests/test_detok_real.py checks that against real vLLM)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from app.detok import IncrementalText, LocalDecoder
from tests.fakes import decode, encode
from tests.fakes.tokenizer import write_fake_tokenizer


class CountingDecoder:
    """The fake's byte-level decoder, counting calls and decoded ids."""

    def __init__(self) -> None:
        self.calls = 0
        self.longest = 0

    async def decode(self, ids: Sequence[int]) -> str:
        self.calls += 1
        self.longest = max(self.longest, len(ids))
        return decode(ids)


class LeadingSpaceDecoder(CountingDecoder):
    """SentencePiece-like: a decode drops one leading space of its first token's text."""

    async def decode(self, ids: Sequence[int]) -> str:
        text = await super().decode(ids)
        return text[1:] if text.startswith(" ") else text


TEXTS = [
    "plain ascii " * 40,
    "Héllo wörld — 123 ✓ 日本語 " * 15,  # multi-byte characters split over byte tokens
    "<|im_start|>user\n" + "spaces  and\ttabs\n" * 20 + "<|im_end|>",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("decoder_type", [CountingDecoder, LeadingSpaceDecoder])
async def test_the_windowed_text_is_the_text_of_all_ids_at_every_step(
    text: str, decoder_type: type[CountingDecoder]
) -> None:
    ids = encode(text)
    decoder = decoder_type()
    incremental = IncrementalText(decoder, window=16, context=4)
    for end in range(1, len(ids) + 1):
        assert await incremental.text(ids[:end]) == await decoder.decode(ids[:end])
    assert incremental.start > 0  # the window slid
    assert decoder.longest <= len(ids)


async def test_the_window_is_bounded_and_costs_about_one_decode_per_token() -> None:
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(3 + 32, 3 + 127, size=2000)]  # printable ASCII bytes
    decoder = CountingDecoder()
    incremental = IncrementalText(decoder, window=64, context=8)
    for end in range(1, len(ids) + 1):
        await incremental.text(ids[:end])
    decoder.longest = 0
    decoder.calls = 0
    for end in range(len(ids) - 200, len(ids) + 1):
        await incremental.text(ids[:end])
    assert decoder.longest <= 66  # never the whole sequence
    assert decoder.calls <= 201 * 1.05  # a slide costs one extra decode per ~56 tokens


def test_window_and_context_must_make_sense() -> None:
    with pytest.raises(ValueError, match="context"):
        IncrementalText(CountingDecoder(), window=8, context=8)


def _byte_tokenizer(folder: Path, *, cleanup: bool) -> Path:
    """A tiny byte-level BPE tokenizer.json (no merges) and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|im_end|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(["<|im_end|>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"clean_up_tokenization_spaces": cleanup}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


async def test_local_decoder_decodes_with_special_tokens_from_a_folder_or_a_file(
    tmp_path: Path,
) -> None:
    folder = _byte_tokenizer(tmp_path / "tok", cleanup=False)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = reference.encode("Hello , wörld ✓<|im_end|>").ids
    for source in (folder, folder / "tokenizer.json"):
        decoder = LocalDecoder(source)
        assert await decoder.decode(ids) == "Hello , wörld ✓<|im_end|>"
        assert decoder.token_to_id("<|im_end|>") == 0


async def test_local_decoder_honours_clean_up_tokenization_spaces(tmp_path: Path) -> None:
    folder = _byte_tokenizer(tmp_path / "tok", cleanup=True)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("Hi , there .").ids
    assert await LocalDecoder(folder).decode(ids) == "Hi, there."


async def test_the_fake_tokenizer_decodes_like_the_fake_vllm(tmp_path: Path) -> None:
    decoder = LocalDecoder(write_fake_tokenizer(tmp_path / "fake"))
    for text in [*TEXTS, "é"[:1], "<|im_start|>x<|im_end|>"]:
        ids = encode(text)
        for end in range(len(ids) + 1):
            assert await decoder.decode(ids[:end]) == decode(ids[:end])


def test_local_decoder_knows_the_special_ids(tmp_path: Path) -> None:
    decoder = LocalDecoder(write_fake_tokenizer(tmp_path / "fake"))
    assert decoder.special_ids() == {
        encode(t)[0] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    }
