"""Self-ensemble: answer a question by reading several paraphrases of it at once.

The paraphrases are packed into one sequence as isolated segments::

    [prefix + sep] [para 1 + sep] [para 2 + sep] ... [para k + sep] [suffix] -> answer

Each segment sees the shared prefix and itself; the suffix and the generated answer see
everything (segment isolation, causal). With ``position_mode="aligned"`` every segment
starts at the same RoPE position, as if it were alone after the prefix; the suffix and the
answer continue after the longest segment. One prefill and one cached decode step per
token give an ensemble over ``k`` paraphrases.

Methods, all built from the same token pieces:

- ``"flex"``: the packed prompt, segment isolation, one forward per step (KV cache).
- ``"avg"`` / ``"max"``: each paraphrase prompt ``prefix + para_i + sep + suffix`` has its
  own cache; every step runs one forward per paraphrase, averages (max-pools) the
  last-position logits over paraphrases and appends the one chosen token to all of them.
- ``"per_prompt"``: each paraphrase prompt is answered alone; the prediction is the most
  frequent answer (ties: the earliest paraphrase), all answers are in ``candidates``.
- ``"origin"``: only the first paraphrase.

Decoding is greedy and stops on EOS, on any ``stop`` string, or on a newline after some
text when ``stop_on_newline=True``.

Token bookkeeping: each piece is tokenized on its own (no special tokens) and the ids are
concatenated, so segment boundaries are exact; a separator is tokenized separately and
belongs to the piece it ends. With a chat template the whole packed text is the user turn:
the template's text before the message joins the prefix piece, the text after it
(assistant header) the suffix piece. Without one a BOS token starts the prompt when the
tokenizer adds one to encoded text.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import masks
from ._checks import check_choice, check_int
from .layout import SegmentLayout
from .mask import Mask

METHODS = ("flex", "avg", "max", "per_prompt", "origin")
POSITION_MODES = ("aligned", "continuous")
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


@dataclass
class EnsembleResult:
    """What ``generate`` returns.

    Attributes:
        text: the answer (stop string and EOS removed, stripped).
        token_ids: generated ids (EOS excluded).
        layout: the ``SegmentLayout`` of the packed prompt (all methods).
        prompt_ids: the packed prompt ids.
        method: the method used.
        timing: ``prefill_s``, ``decode_s``, ``total_s``, ``step_s`` (seconds per decode step,
            a list), ``batch_size`` (questions decoded together; times are per batch).
        candidates: per-paraphrase answers (``"per_prompt"``), else empty.
    """

    text: str
    token_ids: list[int]
    layout: SegmentLayout
    prompt_ids: list[int]
    method: str
    timing: dict
    candidates: list[str] = field(default_factory=list)


def segments_batch_mask(layouts: Sequence[SegmentLayout], heads: int | None = None) -> Mask:
    """Segment isolation (causal) for a batch of packed prompts, on each row's unpadded
    positions: token ``q`` sees key ``kv <= q`` when the key is in the prefix, in the
    query's segment, or the query is in the suffix / generated part (which sees all).

    Row ``b`` indexes a ``[B, max_len + 1]`` segment-id lookup; positions past a row's
    layout are its suffix (generated tokens), so the mask has no fixed length.
    One row is ``masks.segments(layout)``; a batch stacks the rows' exact tile rules.
    ``heads`` (optional) makes the mask's dense form ``[B, heads, Q, KV]``."""
    if not layouts:
        raise ValueError("layouts must hold at least one SegmentLayout, got []")
    for i, lay in enumerate(layouts):
        if not isinstance(lay, SegmentLayout):
            raise TypeError(f"layouts[{i}] must be a SegmentLayout, got {type(lay).__name__}")
    rows = [masks.segments(lay) for lay in layouts]
    if len(rows) == 1:
        return rows[0]  # the pattern library's mask, with its exact tile rule
    width = max(lay.length for lay in layouts) + 1
    ids = torch.stack([
        torch.cat([lay.segment_ids(), torch.full((width - lay.length,), lay.suffix_id)])
        for lay in layouts
    ])
    suffix = torch.tensor([lay.suffix_id for lay in layouts])
    batch = len(layouts)
    last = width - 1

    def on_device(device):
        ids_d, suffix_d = ids.to(device), suffix.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = torch.clamp(q_idx, 0, last), torch.clamp(kv_idx, 0, last)
            sq, sk, suf = ids_d[b, qi], ids_d[b, ki], suffix_d[b]
            return (kv_idx <= q_idx) & ((sk == 0) | (sq == sk) | (sq == suf))

        rules = [row.tile_rule_for(device) for row in rows]

        def rule(grid):
            # each row's exact segment tile rule, stacked over the batch: [B, 1, Qb, KVb]
            return torch.stack([r(grid) for r in rules])[:, None]

        return mask_mod, rule

    return Mask(
        on_device=on_device, has_tile_rule=True, name=f"segments(batch={len(layouts)})",
        batch=batch, heads=heads,
    )


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



class SelfEnsemble:
    """Self-ensemble generation with a transformers LLaMA-family model.

    Args:
        model: a causal LM supported by ``flexsparse.models.llama`` (patched for the calls
            and restored afterwards; a model patched by the caller keeps its patch).
        tokenizer: its tokenizer (a ``PreTrainedTokenizerFast`` or similar).
        separator: text that ends the prefix and every paraphrase segment.
        position_mode: ``"aligned"`` (every segment starts at the same position) or
            ``"continuous"``.
        backend: ``flexsparse.attention`` backend for the packed prefill.
        chat_template: use the tokenizer's chat template (None: when it has one).
    """

    def __init__(
        self,
        model,
        tokenizer,
        separator: str = "\n\n",
        position_mode: str = "aligned",
        *,
        backend: str = "auto",
        chat_template: bool | None = None,
    ):
        self.packer = PromptPacker(tokenizer, separator, chat_template)
        self.model = model
        self.tokenizer = tokenizer
        self.separator = separator
        self.chat_template = self.packer.chat_template
        self.position_mode = check_choice("position_mode", position_mode, POSITION_MODES)
        self.backend = backend
        self.heads = model.config.num_attention_heads
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(model, tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of one piece (no special tokens added)."""
        return self.packer.encode(text)

    def pack(self, paraphrases: Sequence[str], prefix: str = "", suffix: str = "") -> PackedPrompt:
        """Pack one question (see ``PromptPacker``)."""
        return self.packer.pack(paraphrases, prefix, suffix)

    # -- generation ---------------------------------------------------------------------
    def generate(
        self,
        paraphrases: Sequence[str],
        prefix: str = "",
        suffix: str = "",
        max_new_tokens: int = 32,
        method: str = "flex",
        stop: Sequence[str] | None = None,
        *,
        stop_on_newline: bool = False,
    ) -> EnsembleResult:
        """Answer one question from its ``paraphrases`` (see the module docstring)."""
        return self.generate_batch(
            [paraphrases], prefix=prefix, suffix=suffix, max_new_tokens=max_new_tokens,
            method=method, stop=stop, stop_on_newline=stop_on_newline,
        )[0]

    def generate_batch(
        self,
        questions: Sequence[Sequence[str]],
        prefix: str | Sequence[str] = "",
        suffix: str | Sequence[str] = "",
        max_new_tokens: int = 32,
        method: str = "flex",
        stop: Sequence[str] | None = None,
        *,
        stop_on_newline: bool = False,
    ) -> list[EnsembleResult]:
        """Answer a batch of questions (each a list of paraphrases) together: prompts are
        left padded and stacked, each row's segment mask and positions are its own.
        ``prefix`` / ``suffix``: one string for all, or one per question."""
        check_choice("method", method, METHODS)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
        if isinstance(questions, (str, bytes)) or not questions:
            raise ValueError("questions must be a non-empty list of paraphrase lists")
        n = len(questions)
        prefixes = _per_question("prefix", prefix, n)
        suffixes = _per_question("suffix", suffix, n)
        packed = [self.pack(q, p, s) for q, p, s in zip(questions, prefixes, suffixes)]
        stopper = _Stopper(self.tokenizer, self.eos_ids, stop, stop_on_newline)
        if method in ("avg", "max"):
            results: list = [None] * n
            by_k: dict[int, list[int]] = {}
            for i, pk in enumerate(packed):
                by_k.setdefault(len(pk.segment_ids), []).append(i)
            for idx in by_k.values():  # pooled decoding needs the same k in a batch
                group = [packed[i] for i in idx]
                out = self._pooled(group, method, max_new_tokens, stopper)
                for i, r in zip(idx, out):
                    results[i] = r
            return results
        if method == "flex":
            rows = [pk.ids for pk in packed]
            pos = [pk.positions(self.position_mode) for pk in packed]
            mask = segments_batch_mask([pk.layout for pk in packed], heads=self.heads)
            gen, timing = self._rows(rows, pos, mask, max_new_tokens, stopper)
            return [self._result(pk, g, method, timing, stopper) for pk, g in zip(packed, gen)]
        if method == "origin":
            rows = [pk.single(0) for pk in packed]
            gen, timing = self._rows(rows, None, None, max_new_tokens, stopper)
            return [self._result(pk, g, method, timing, stopper) for pk, g in zip(packed, gen)]
        # per_prompt: every paraphrase of every question is a row of one batch
        owners = [(qi, j) for qi, pk in enumerate(packed) for j in range(len(pk.segment_ids))]
        rows = [packed[qi].single(j) for qi, j in owners]
        gen, timing = self._rows(rows, None, None, max_new_tokens, stopper)
        results = []
        for qi, pk in enumerate(packed):
            answers = [gen[r] for r, (owner, _) in enumerate(owners) if owner == qi]
            texts = [stopper.text(a) for a in answers]
            best = _vote(texts)
            res = self._result(pk, answers[best], method, timing, stopper)
            res.candidates = texts
            results.append(res)
        return results

    @staticmethod
    def _result(pk: PackedPrompt, ids: list[int], method: str, timing: dict, stopper):
        return EnsembleResult(
            text=stopper.text(ids), token_ids=list(ids), layout=pk.layout, prompt_ids=pk.ids,
            method=method, timing=dict(timing),
        )

    # -- decoding loops -----------------------------------------------------------------
    def _device(self):
        return next(self.model.parameters()).device

    def _forward(self, ids: Tensor, attn: Tensor, pos: Tensor, cache) -> Tensor:
        out = self.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
            **{_cache_kwarg(self.model): cache},
        )
        return out.logits[:, -1].float()

    def _rows(self, rows, positions, mask, max_new_tokens, stopper):
        """Greedy decoding of independent rows (left padded batch, one cache)."""
        from .models import llama

        device = self._device()
        ids, attn, pos = _left_pad(rows, positions, self.pad_id, device)
        cache = _new_cache(self.model)
        done = [False] * len(rows)
        out: list[list[int]] = [[] for _ in rows]
        steps = []
        backend = {"backend": self.backend} if not llama.is_patched(self.model) else {}
        with torch.no_grad(), llama.masked(self.model, mask, **backend):
            t0 = _now(device)
            logits = self._forward(ids, attn, pos, cache)
            t1 = _now(device)
            prefill = t1 - t0
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                if _append(nxt, out, done, stopper) or step == max_new_tokens - 1:
                    break
                ts = _now(device)
                attn = torch.cat([attn, attn.new_ones(len(rows), 1)], 1)
                pos = pos[:, -1:] + 1
                logits = self._forward(nxt[:, None], attn, pos, cache)
                steps.append(_now(device) - ts)
        return out, _timing(prefill, steps, len(rows))

    def _pooled(self, group: list[PackedPrompt], method: str, max_new_tokens, stopper):
        """``avg`` / ``max``: one cache and one forward per paraphrase slot per step."""
        from .models import llama

        device = self._device()
        k = len(group[0].segment_ids)
        slots = []
        for j in range(k):
            ids, attn, pos = _left_pad([pk.single(j) for pk in group], None, self.pad_id, device)
            slots.append([ids, attn, pos, _new_cache(self.model)])
        done = [False] * len(group)
        out: list[list[int]] = [[] for _ in group]
        steps = []
        with torch.no_grad(), llama.masked(self.model, None):
            t0 = _now(device)
            logits = torch.stack([self._forward(*s) for s in slots])  # [k, B, V]
            prefill = _now(device) - t0
            for step in range(max_new_tokens):
                pooled = logits.mean(0) if method == "avg" else logits.max(0).values
                nxt = pooled.argmax(-1)
                if _append(nxt, out, done, stopper) or step == max_new_tokens - 1:
                    break
                ts = _now(device)
                new = []
                for s in slots:
                    s[1] = torch.cat([s[1], s[1].new_ones(len(group), 1)], 1)
                    s[2] = s[2][:, -1:] + 1
                    new.append(self._forward(nxt[:, None], s[1], s[2], s[3]))
                logits = torch.stack(new)
                steps.append(_now(device) - ts)
        timing = _timing(prefill, steps, len(group))
        return [self._result(pk, o, method, timing, stopper) for pk, o in zip(group, out)]


# -- helpers -----------------------------------------------------------------------------
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


def _per_question(name: str, value, n: int) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must be a str or one str per question ({n}), got {len(value)}")
    return value


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pad_id(model, tokenizer) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id,
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _left_pad(rows, positions, pad_id: int, device):
    """``(ids, attention_mask, position_ids)`` ``[B, max_len]``, left padded; padding
    positions are 1 (as transformers' ``generate`` writes them)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.ones((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, width - n:] = torch.tensor(r)
        attn[b, width - n:] = 1
        p = positions[b] if positions is not None else range(n)
        pos[b, width - n:] = torch.as_tensor(list(p))
    return ids.to(device), attn.to(device), pos.to(device)


def _cache_kwarg(model) -> str:
    """transformers >= 5.24 calls the cache argument ``cache``, before ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _append(tokens: Tensor, out: list[list[int]], done: list[bool], stopper) -> bool:
    """Append one greedy token per row that is still generating; True when all are done."""
    for r, tok in enumerate(tokens.tolist()):
        if not done[r]:
            done[r] = stopper.push(out[r], tok)
    return all(done)


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timing(prefill: float, steps: list[float], batch: int) -> dict:
    decode = sum(steps)
    return {
        "prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
        "step_s": steps, "batch_size": batch,
    }


def _vote(texts: list[str]) -> int:
    """Index of the most frequent answer (normalised), earliest on ties."""
    norm = [" ".join(t.lower().split()) for t in texts]
    counts = Counter(norm)
    best = max(counts.values())
    return next(i for i, t in enumerate(norm) if counts[t] == best)


class _Stopper:
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


# -- answer metrics (SQuAD-style normalisation) --------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-overlap F1 of the prediction against the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            score = float(pred == gold)
        elif common == 0:
            score = 0.0
        else:
            precision, recall = common / len(pred), common / len(gold)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in pred for a in answers if normalize_answer(a)))
