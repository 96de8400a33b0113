"""How a predicted (meansim) map is lowered, timed whole through ``fs.attention(auto)``
against cuDNN dense, in alternating rounds on one machine:

- ``prelower, q-side``: the map's BlockMask built before its tile count is read back, with
  the query-side lists that only FlexAttention's backward reads (the code before
  2026-11-25 night);
- ``prelower, no q-side``: the same without them for a call that needs no gradient (now);
- ``count first, no q-side``: the count read first, the BlockMask built after it only
  when the map is kept (``attention.PRELOWER = False``).

    python benchmarks/lowering.py [--rounds 3]

CogVideoX-2b shape (B=2, H=30, 17,776 tokens, D=64), video-like inputs
(``benchmarks/meansim.py``). Both clocks of ``common.time_ms``: ``sync`` (the GPU
synchronised after each call) and ``queued`` (calls back to back).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cuda_ms, device_name, queued_ms, table  # noqa: E402
from meansim import video_like  # noqa: E402

import flexsparse as fs  # noqa: E402
from flexsparse import masks  # noqa: E402
from flexsparse.mask import Mask  # noqa: E402

# The module: ``flexsparse.attention`` in the package's namespace is the function (a
# ``from flexsparse import attention`` here once set PRELOWER on the function: no effect).
fa = importlib.import_module("flexsparse.attention")

MAPS = ((0.6, 0.98), (0.35, 0.98), (0.3, 0.9))
#: variant: (PRELOWER, query-side lists on every BlockMask)
VARIANTS = {"prelower, q-side": (True, True), "prelower, no q-side": (True, False),
            "count first, no q-side": (False, False)}


@contextlib.contextmanager
def variant(prelower: bool, q_side: bool):
    """``attention.PRELOWER`` and whether every BlockMask carries the query side, for the
    duration of the block."""
    plain = Mask.block_mask

    def with_q_side(self, *args, **kwargs):
        return plain(self, *args, **{**kwargs, "backward": True})

    with mock.patch.object(fa, "PRELOWER", prelower), \
            mock.patch.object(Mask, "block_mask", with_q_side if q_side else plain):
        yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    q, k, v = video_like(0, torch.device("cuda"))

    def cudnn():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    times: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for _ in range(args.rounds):
        base, base_q = cuda_ms(cudnn, 3, 10), queued_ms(cudnn, 3, 10)
        times.setdefault(("-", "cuDNN dense"), []).append((base, base_q, 1.0, 1.0))
        for sim, cdf in MAPS:
            mask = masks.meansim(sim, cdfthreshd=cdf)
            for name, flags in VARIANTS.items():

                def call(mask=mask):
                    return fs.attention(q, k, v, mask)

                with variant(*flags):
                    ms, ms_q = cuda_ms(call, 3, 10), queued_ms(call, 3, 10)
                times.setdefault((f"{sim}/{cdf}", name), []).append(
                    (ms, ms_q, base / ms, base_q / ms_q))
    rows = []
    for (case, name), vals in times.items():
        rows.append({
            "map": case, "variant": name,
            "sync ms": " / ".join(f"{t[0]:.2f}" for t in vals),
            "queued ms": " / ".join(f"{t[1]:.2f}" for t in vals),
            "x cuDNN sync": statistics.median(t[2] for t in vals),
            "x cuDNN queued": statistics.median(t[3] for t in vals),
        })
    print(f"\n{device_name()}, {args.rounds} rounds (ms per round; x cuDNN: median)\n")
    print(table(rows, ["map", "variant", "sync ms", "queued ms", "x cuDNN sync",
                       "x cuDNN queued"]))


if __name__ == "__main__":
    main()
