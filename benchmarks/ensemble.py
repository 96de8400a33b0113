"""Self-ensemble throughput: questions per second of ``flex`` vs ``avg`` vs ``per_prompt``.

    python benchmarks/ensemble.py [--quick]

LLaMA-3.2-1B shapes (random weights, bf16), 5 paraphrases of 40 tokens, 32 new tokens
(no EOS: every answer has all 32), batch 1 and 16. Token ids are used directly (a
word -> id tokenizer over the 128256-id vocabulary), so no tokenizer files are needed.
Goal (issue 6): ``flex`` >= 3x the throughput of ``avg`` at batch 1.
Without CUDA it runs tiny shapes on the CPU (smoke test). Writes ``$OUT/ensemble.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from flexsparse.ensemble import SelfEnsemble

sys.path.insert(0, os.path.dirname(__file__))
from common import header, save, table  # noqa: E402
from llama import build  # noqa: E402  (same model shapes)


class IdTokenizer:
    """Whitespace words ``"t123"`` -> id 123; no special tokens, no chat template."""

    chat_template = None
    bos_token_id = eos_token_id = pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids)


def questions(n: int, k: int, length: int, vocab: int, seed: int = 0) -> list[list[str]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, k, length), generator=g).tolist()
    return [[" ".join(f"t{t}" for t in para) for para in q] for q in ids]


def run(ens, qs, batch, method, new_tokens):
    """Seconds to answer ``qs`` in batches of ``batch``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(qs), batch):
        ens.generate_batch(qs[i:i + batch], max_new_tokens=new_tokens, method=method)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer questions")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = build(cuda)
    k, length, new_tokens = 5, 40, 32 if cuda else 4
    vocab = model.config.vocab_size
    ens = SelfEnsemble(model, IdTokenizer(), separator="", position_mode="aligned")
    ens.eos_ids = set()
    sep = [model.config.vocab_size - 1]  # one separator token ends every segment
    ens.encode = lambda text: [int(w[1:]) for w in text.split()] if text else sep
    n_q = {1: 4 if args.quick else 8, 16: 16 if args.quick else 32}
    if not cuda:
        n_q = {1: 2, 16: 4}
    rows = []
    variants = [("flex", "flex", "auto"), ("flex", "flex (sdpa prefill)", "sdpa"),
                ("avg", "avg", "auto"), ("per_prompt", "per_prompt", "auto")]
    for batch, n in n_q.items():
        qs = questions(n, k, length, vocab)
        for method, name, backend in variants:
            ens.backend = backend
            run(ens, qs[:batch], batch, method, new_tokens)  # warm-up (compiles)
            seconds = run(ens, qs, batch, method, new_tokens)
            rows.append({"batch": batch, "method": name, "questions": n, "seconds": seconds,
                         "questions_per_s": n / seconds})
            print(f"done: batch {batch} {name}", file=sys.stderr)
    for r in rows:
        avg = next(x for x in rows if x["batch"] == r["batch"] and x["method"] == "avg")
        r["vs_avg"] = r["questions_per_s"] / avg["questions_per_s"]
    for r in rows:
        r["vs avg"] = f"{r.pop('vs_avg'):.2f}x"
    text = header(f"Self-ensemble, LLaMA-3.2-1B shapes, bf16, {k} paraphrases x {length} tokens, "
                  f"{new_tokens} new tokens; goal flex >= 3x avg at batch 1") + "\n" + table(
        rows, ["batch", "method", "questions_per_s", "vs avg"])
    print(text)
    save("ensemble", rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
