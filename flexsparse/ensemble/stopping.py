"""When greedy decoding of one row stops, and what text the answer is."""

from __future__ import annotations


class Stopper:
    """Greedy stopping rules: EOS, stop strings, newline after text."""

    def __init__(self, tokenizer, eos_ids, stop, stop_on_newline: bool):
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.stop, self.newline = stop, stop_on_newline

    def push(self, ids: list[int], token: int) -> bool:
        """Append ``token`` to ``ids`` unless it is EOS; True when the row is finished."""
        if token in self.eos_ids:
            return True
        ids.append(token)
        if not self.stop and not self.newline:
            return False
        return self._cut(self._decode(ids)) is not None

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _cut(self, text: str) -> int | None:
        """Where the answer ends in ``text`` (a stop string or newline), or None."""
        ends = [text.find(s) for s in self.stop if s in text]
        if self.newline:
            start = len(text) - len(text.lstrip())
            nl = text.find("\n", start)
            if nl >= 0:
                ends.append(nl)
        return min(ends) if ends else None

    def text(self, ids) -> str:
        text = self._decode(ids)
        cut = self._cut(text)
        return (text if cut is None else text[:cut]).strip()


#: The name the tests and earlier code use.
_Stopper = Stopper
