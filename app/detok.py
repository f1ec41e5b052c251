"""Token ids -> text, without a request per token.

The gateway's text is the teacher tokenizer's decoding of the generated ids (what vLLM's
`/detokenize` returns). Two decoders give it:

- `LocalDecoder`: the teacher's tokenizer loaded in the gateway with the `tokenizers` library
  (`DUAL_VLLM_TOKENIZER`: a tokenizer.json file or a model folder holding one); no request at
  all. `clean_up_tokenization_spaces` of the folder's tokenizer_config.json is honoured, as
  the upstream's own decode does.
- `RemoteDecoder`: the teacher's `/detokenize`, when no tokenizer is configured.

`IncrementalText` keeps one sequence's text up to date as ids are appended while decoding only
a bounded window of recent ids, never the whole sequence: the text of the ids before the window
is kept, and the window slides forward once it is longer than `window` ids (the text stays
exactly what decoding all the ids gives; see `IncrementalText.text`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class Decoder(Protocol):
    async def decode(self, ids: Sequence[int]) -> str: ...


class LocalDecoder:
    """The teacher's tokenizer in process (`tokenizers`)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # imported only when configured

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        self._tokenizer = Tokenizer.from_file(str(file))
        self._cleanup = False
        config = folder / "tokenizer_config.json"
        if config.is_file():
            self._cleanup = bool(
                json.loads(config.read_text(encoding="utf-8")).get(
                    "clean_up_tokenization_spaces", False
                )
            )
        self.path = file

    def decode_now(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return _clean_up(text) if self._cleanup else text

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def special_ids(self) -> frozenset[int]:
        """The tokenizer's special tokens (what `skip_special_tokens` drops)."""
        added = self._tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)

    async def decode(self, ids: Sequence[int]) -> str:
        return self.decode_now(ids)


class RemoteDecoder:
    """The upstream's `/detokenize` (one request per call)."""

    def __init__(self, detokenize: Callable[[Sequence[int]], Awaitable[str]]) -> None:
        self._detokenize = detokenize

    async def decode(self, ids: Sequence[int]) -> str:
        return await self._detokenize(ids)


def _clean_up(text: str) -> str:
    """Hugging Face's `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class IncrementalText:
    """One sequence's text, decoding at most about `window` recent ids per update.

    State: `prefix` is the text of `ids[:start]`. An update decodes `ids[start:]` (the window)
    and returns `prefix + that`. When the window has grown past `window` ids and ends on a
    complete character, it slides: the last `context` ids are decoded alone, and if their text
    is the end of the window's text, the part before it joins `prefix` and the window restarts
    `context` ids back. Keeping `context` ids of left context means tokenizers that drop a
    leading space at the start of a decode (SentencePiece) give the same text as one decode of
    all the ids; a slide that would not (the tail's text is not a suffix) is simply not made.
    """

    __slots__ = ("_context", "_decoder", "_window", "prefix", "start")

    def __init__(self, decoder: Decoder, *, window: int = 64, context: int = 8) -> None:
        if not 0 < context < window:
            raise ValueError("need 0 < context < window")
        self._decoder = decoder
        self._window = window
        self._context = context
        self.prefix = ""
        self.start = 0

    async def text(self, ids: Sequence[int]) -> str:
        """The text of all of `ids` (which only ever grows between calls)."""
        tail = await self._decoder.decode(ids[self.start :])
        if len(ids) - self.start > self._window and not tail.endswith("\ufffd"):
            cut = len(ids) - self._context
            end = await self._decoder.decode(ids[cut:])
            if end and tail.endswith(end) and not end.startswith("\ufffd"):
                self.prefix += tail[: len(tail) - len(end)]
                self.start = cut
                return self.prefix + end
        return self.prefix + tail
