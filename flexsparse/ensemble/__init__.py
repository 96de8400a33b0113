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

The package splits the jobs: ``packing`` (prompt pieces -> ids and a ``SegmentLayout``),
``batch_mask`` (segment isolation for a left-padded batch), ``decoding`` (the
``SelfEnsemble`` loops), ``stopping`` (EOS / stop strings / newline) and ``metrics``
(SQuAD-style answer scores).
"""

from .batch_mask import segments_batch_mask
from .decoding import (
    METHODS,
    POSITION_MODES,
    EnsembleResult,
    SelfEnsemble,
    _cache_kwarg,
)
from .metrics import contains_answer, exact_match, normalize_answer, token_f1
from .packing import PackedPrompt, PromptPacker
from .stopping import Stopper, _Stopper

__all__ = [
    "METHODS",
    "POSITION_MODES",
    "EnsembleResult",
    "PackedPrompt",
    "PromptPacker",
    "SelfEnsemble",
    "Stopper",
    "contains_answer",
    "exact_match",
    "normalize_answer",
    "segments_batch_mask",
    "token_f1",
    "_Stopper",
    "_cache_kwarg",
]
