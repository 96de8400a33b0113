"""``SelfEnsemble``: greedy decoding of packed prompts (``"flex"``) and of the paraphrase
prompts one by one (``"avg"``, ``"max"``, ``"per_prompt"``, ``"origin"``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..layout import SegmentLayout
from .batch_mask import segments_batch_mask
from .packing import PackedPrompt, PromptPacker
from .stopping import Stopper

METHODS = ("flex", "avg", "max", "per_prompt", "origin")
POSITION_MODES = ("aligned", "continuous")


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
        stopper = Stopper(self.tokenizer, self.eos_ids, stop, stop_on_newline)
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
        from ..models import llama

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
        from ..models import llama

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
