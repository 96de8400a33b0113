"""Packing a question's pieces (prefix, paraphrases, suffix, chat template) into token ids
and the ``SegmentLayout`` that says which token belongs to which piece."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..layout import SegmentLayout

_SENTINEL = "\u0000FLEXSPARSE-CONTENT\u0000"


@dataclass
class PackedPrompt:
    """One question packed for ``"flex"``.

    Attributes:
        ids: the prompt token ids (prefix, segments, suffix concatenated).
        layout: the ``SegmentLayout`` of ``ids``.
        pieces: ``(label, text)`` of every piece, in order (for pictures).
        prefix_ids, segment_ids, suffix_ids: the ids of each piece.
    """

    ids: list[int]
    layout: SegmentLayout
    pieces: list[tuple[str, str]]
    prefix_ids: list[int]
    segment_ids: list[list[int]]
    suffix_ids: list[int]

    def single(self, i: int) -> list[int]:
        """The prompt of paraphrase ``i`` alone (same pieces, continuous positions)."""
        return self.prefix_ids + self.segment_ids[i] + self.suffix_ids

    def positions(self, mode: str) -> list[int]:
        return self.layout.position_ids(mode).tolist()


class PromptPacker:
    """Packs a question's pieces into token ids and a ``SegmentLayout`` (tokenizer only).

    Pieces are tokenized separately and their ids concatenated, so segment boundaries are
    exact (no re-tokenization drift); the chat template is applied when the tokenizer has
    one (or ``chat_template=True``); separators belong to the segment they end.
    """

    def __init__(self, tokenizer, separator: str = "\n\n", chat_template: bool | None = None):
        if not isinstance(separator, str):
            raise TypeError(f"separator must be a str, got {type(separator).__name__}")
        self.tokenizer = tokenizer
        self.separator = separator
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        if self.chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self._head, self._tail = self._template_parts()

    # -- prompt building ----------------------------------------------------------------
    def _template_parts(self) -> tuple[str, str]:
        if not self.chat_template:
            return "", ""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False,
            add_generation_prompt=True,
        )
        head, sep, tail = text.partition(_SENTINEL)
        if not sep:
            raise ValueError("the chat template does not contain the user message verbatim")
        return head, tail

    def encode(self, text: str) -> list[int]:
        """Token ids of one piece (no special tokens added)."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _bos(self) -> list[int]:
        if self.chat_template:
            return []  # the template writes its own BOS text
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return []
        probe = self.tokenizer("a")["input_ids"]
        return [bos] if probe and probe[0] == bos else []

    def pack(self, paraphrases: Sequence[str], prefix: str = "", suffix: str = "") -> PackedPrompt:
        """Pack one question (see the module docstring for the pieces)."""
        paraphrases = _check_paraphrases(paraphrases)
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        sep_ids = self.encode(self.separator)
        pieces = []
        prefix_ids = self._bos() + self.encode(self._head)
        if self._head:
            pieces.append(("template", self._head))
        if prefix:
            prefix_ids += self.encode(prefix) + sep_ids
            pieces.append(("prefix", prefix + self.separator))
        segments = []
        for i, p in enumerate(paraphrases):
            ids = self.encode(p) + sep_ids
            if not ids:
                raise ValueError(f"paraphrases[{i}] tokenizes to no tokens: {p!r}")
            segments.append(ids)
            pieces.append((f"seg {i + 1}", p + self.separator))
        suffix_ids = self.encode(suffix) + self.encode(self._tail)
        if suffix:
            pieces.append(("suffix", suffix))
        if self._tail:
            pieces.append(("template", self._tail))
        layout = SegmentLayout(
            prefix=len(prefix_ids), segments=[len(s) for s in segments], suffix=len(suffix_ids)
        )
        ids = prefix_ids + [t for s in segments for t in s] + suffix_ids
        return PackedPrompt(ids, layout, pieces, prefix_ids, segments, suffix_ids)


def _check_paraphrases(paraphrases) -> list[str]:
    if isinstance(paraphrases, str) or not hasattr(paraphrases, "__iter__"):
        raise TypeError(f"paraphrases must be a list of strings, got {paraphrases!r}")
    paraphrases = list(paraphrases)
    if not paraphrases:
        raise ValueError("paraphrases must hold at least one paraphrase, got []")
    for i, p in enumerate(paraphrases):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"paraphrases[{i}] must be a non-empty string, got {p!r}")
    return paraphrases
