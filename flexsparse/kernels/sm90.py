"""Host side of the Hopper kernel (``csrc/quant_attn_sm90.cu``).

The kernel is CUDA C++ for sm_90a (wgmma, TMA, ``setmaxnreg``), which Triton 3.6 cannot
express correctly (docs/kernel_notes.md). It is built with ``nvcc`` on first use into a
per-user cache (``FLEXSPARSE_CACHE``, default ``~/.cache/flexsparse``), keyed by the
source and the compiler, and loaded with ``ctypes``: no build step at install, no torch
headers (a build takes seconds), and a machine without ``nvcc`` simply keeps the Triton
kernel (``build_error`` says why).

It runs the fast path of ``quant_attention``: dense calls and tile maps, their partial
tiles included (the token rule from ``TileLists.bits``: token-granular radial maps, scenes,
segments, causal diagonals), GQA, ``q_len != kv_len``, any lengths, 16-bit P·V in V's own
dtype with V read in place. The in-kernel causal rule (``causal=True``), ``pvthreshd`` and
FP8 P·V stay on the Triton kernel (``quant.sm90_reasons``), and so do 128 x 64 maps under
``kernel="auto"`` (``quant.SM90_TILE_N``: slower here).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._devices import cuda_capability

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("quant_attn_sm90.cu", "wgmma.cuh")
NVCC_FLAGS = (
    "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", "--use_fast_math",
    "-gencode=arch=compute_90a,code=sm_90a",
)
#: ``"auto"``: the sm90 kernel wherever it can run, ``"off"``: never (benchmarks flip it
#: to time the Triton kernel in the same run).
MODE = os.environ.get("FLEXSPARSE_SM90", "auto")
#: Consumer warpgroups (64 query rows each) per CTA, per head_dim: 3 at D=64 (192-row
#: work items; a map's 128-row tiles are walked in pairs, ``pair_lists``), 2 at D=128, whose
#: accumulators do not fit three. H100, dense 2x30x17776 D=64: 556 TOPS with 3, 494 with 2
#: (2026-11-25 before midnight, BENCHMARKS.md; docs/kernel_notes.md). Benchmarks flip it.
CONSUMERS = {64: 3, 128: 2}
#: With two consumer warpgroups: whether they take turns issuing their MMAs, per head_dim.
#: H100, dense 2x24x17776 D=128: 760 TOPS with, 755 without; 2x30x17776 D=64: 485 with,
#: 494 without (one run, 2026-11-25 before midnight, persistent grid; BENCHMARKS.md).
#: Benchmarks flip it.
PINGPONG = {64: False, 128: True}
#: At most this many CTAs in the persistent grid (None: one per multiprocessor). Tests
#: shrink it so that every CTA runs many work items, as the full-size calls do.
MAX_CTAS: int | None = None


def cache_dir() -> Path:
    """Where built kernels live (``FLEXSPARSE_CACHE`` or ``~/.cache/flexsparse``)."""
    root = os.environ.get("FLEXSPARSE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "flexsparse"


def find_nvcc() -> str | None:
    """``nvcc`` from ``CUDA_HOME`` / ``CUDA_PATH``, torch's CUDA home, or the ``PATH``."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        homes.append(CUDA_HOME)
    except Exception:  # pragma: no cover - torch without cpp_extension
        pass
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _source_key(nvcc: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(version.encode())
    digest.update(" ".join(flags).encode())
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


class _Args(ctypes.Structure):
    """``FsqArgs`` of the CUDA source: every field 8 bytes."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in ("q", "k", "v", "qs", "ks", "out", "full_num", "full_idx", "row_order",
                     "stream", "part_at", "bits")
    ] + [
        (name, ctypes.c_longlong)
        for name in ("v_sb", "v_sh", "v_sn", "o_sb", "o_sh", "o_sn", "snb", "snh", "sib", "sih",
                     "siq", "batch", "hq", "hkv", "nq", "nk", "nq_pad", "nk_pad", "d", "bn",
                     "bf16", "nqb", "nkb", "n_dense", "pingpong", "nc", "n_tiles")
    ] + [("work", ctypes.c_ulonglong), ("max_ctas", ctypes.c_longlong),
         ("qn", ctypes.c_ulonglong), ("kn", ctypes.c_ulonglong)]


def build(nvcc: str, root: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Builds the kernel library with ``nvcc`` under ``root`` (default ``cache_dir()``),
    once per source and compiler (a file lock guards concurrent builds); returns its path.
    Raises ``RuntimeError`` with the compiler's message when the build fails."""
    from filelock import FileLock

    root = cache_dir() if root is None else root
    key = _source_key(nvcc, NVCC_FLAGS + extra_flags)
    target = root / "sm90" / key / "libflexsparse_sm90.so"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            log.warning("flexsparse: building the sm90 attention kernel (once, ~30 s)")
            tmp = target.with_suffix(".tmp.so")
            cmd = [nvcc, *NVCC_FLAGS, *extra_flags, "-o", str(tmp), str(CSRC / SOURCES[0])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed to build the sm90 kernel:\n{done.stderr[-2000:]}")
            tmp.replace(target)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc was not found (set CUDA_HOME) to build the sm90 kernel"
    try:
        lib = ctypes.CDLL(str(build(nvcc)))
    except (OSError, RuntimeError) as exc:
        # Once per process: the Triton kernel runs these calls instead, with one arithmetic.
        log.warning("flexsparse: the sm90 kernel is unavailable, using Triton's: %s", exc)
        return None, f"the sm90 kernel could not be built or loaded ({exc})"
    lib.fsq_attention_sm90.argtypes = [ctypes.POINTER(_Args), ctypes.c_char_p, ctypes.c_int]
    lib.fsq_attention_sm90.restype = ctypes.c_int
    return lib, None


def build_error() -> str | None:
    """Why the kernel cannot be built or loaded here (None: it is ready)."""
    return _library()[1]


def _tma_ready(t: Tensor) -> bool:
    """A 16-bit ``[B, H, N, D]`` tensor the copy engine can read in place: 16-byte aligned
    base and strides (in elements: multiples of 8), last dim contiguous, and no stride
    that steps back into a row (broadcast views, e.g. ``expand``, fail this)."""
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s % 8 == 0 and (s >= t.shape[-1] or n == 1)
                for s, n in zip(t.stride()[:-1], t.shape[:-1]))
    )


def device_reasons(q: Tensor, v: Tensor) -> list[str]:
    """Why the kernel cannot run on these inputs' device, dtype and layout (empty: it can)."""
    if MODE not in ("auto", "off"):
        raise ValueError(
            f"FLEXSPARSE_SM90 / flexsparse.kernels.sm90.MODE must be 'auto' or 'off', got "
            f"{MODE!r}"
        )
    if MODE == "off":
        return ["the sm90 kernel is switched off (flexsparse.kernels.sm90.MODE)"]
    if q.device.type != "cuda":
        return [f"needs a CUDA device, got {q.device.type}"]
    out = []
    cap = cuda_capability(q.device)
    if cap != (9, 0):
        out.append(f"needs compute capability 9.0 (Hopper), got {cap[0]}.{cap[1]}")
    if q.shape[-1] not in (64, 128):
        out.append(f"head_dim must be 64 or 128, got {q.shape[-1]}")
    if not _tma_ready(v):
        out.append(f"v's strides {tuple(v.stride())} are not 16-byte multiples")
    if v.shape[2] < 128:  # one copy box spans 128 keys; shorter V untested on the GPU
        out.append(f"fewer than 128 keys ({v.shape[2]})")
    if not out and build_error():
        out.append(build_error())
    return out


def uses_bound(d: int, dtype: torch.dtype) -> bool:
    """Whether the kernel for head_dim ``d`` and P·V in ``dtype`` bounds a block's scores by
    the norms of Q's rows and K's block (``attention``'s ``norms``; the kernel's ``BOUND``):
    where the bound of flat attention fits the rescale slack, at D=64, and at D=128 with
    bf16 P (slack 24 log2 units; fp16's 14 is below that bound there)."""
    return d == 64 or dtype == torch.bfloat16


#: Tiles x key blocks per chunk of ``walk_lists``'s work (bounds its temporaries).
WALK_CHUNK = 1 << 22


def walk_lists(lists, nkb: int, n_items: int, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The key blocks each ``rows``-row work item walks, full and partial tiles in one list.

    Item ``c`` of a head holds query rows ``[rows * c, rows * c + rows)``: the 128-row map
    tiles ``t0 = rows * c // 128`` and ``t1`` (the tile of its last row, at most the last
    tile; ``t1 == t0`` when ``rows`` is 128). It walks the union of their lists in
    increasing key order. Each entry is the key block plus bit 24 when ``t0`` keeps it,
    bit 25 when ``t1`` does, and bit 26 / 27 when that tile keeps it only in part, so each
    consumer warpgroup computes only its own tile's blocks and applies its tile's rule.

    Args:
        lists: ``quant.TileLists`` of a map at 128-row tiles.
        nkb: key blocks in the sequence; n_items: work items (query tiles) per head;
        rows: query rows per work item (128 or 192).

    Returns:
        ``num`` int32 ``[Bm, Hm, n_items]``, ``idx`` int32 ``[Bm, Hm, n_items, nkb]`` and,
        for maps with partial tiles, ``part_at`` int32 ``[Bm, Hm, n_items, nkb, 2]``: the
        index in ``lists.bits`` of ``t0``'s and ``t1``'s rule for each entry (-1: none);
        else None.
    """
    bm, hm, nqb = lists.full_num.shape
    dev = lists.full_num.device
    partial = lists.n_partial > 0
    c = torch.arange(n_items, device=dev)
    t0 = rows * c // 128
    t1 = ((rows * c + rows - 1) // 128).clamp(max=nqb - 1)
    cols = torch.arange(nkb, device=dev)
    heads = max(1, WALK_CHUNK // (bm * nqb * (nkb + 1)))
    nums, idxs, rules = [], [], []
    for h in range(0, hm, heads):
        sl = slice(h, h + heads)
        # per tile and key block: 0 not kept, 1 kept whole, 2 kept in part
        state = torch.zeros(bm, min(heads, hm - h), nqb, nkb + 1, dtype=torch.int32,
                            device=dev)
        num, idx = lists.full_num[:, sl], lists.full_idx[:, sl]
        listed = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        state.scatter_(-1, torch.where(listed, idx.long(), nkb), 1)  # nkb: unlisted
        if partial:
            num, idx = lists.part_num[:, sl], lists.part_idx[:, sl]
            listed = torch.arange(idx.shape[-1], device=dev) < num[..., None]
            where = torch.where(listed, idx.long(), nkb)
            state.scatter_(-1, where, 2)
            rule = torch.full_like(state, -1)
            first = lists.part_off[:, sl, :, None].to(torch.int32)
            rule.scatter_(-1, where, first + torch.arange(idx.shape[-1], dtype=torch.int32,
                                                          device=dev))
        s0, s1 = state[:, :, t0, :nkb], state[:, :, t1, :nkb]
        tags = (s0 > 0).int() | (s1 > 0).int() << 1 | (s0 == 2).int() << 2 | (s1 == 2).int() << 3
        keep = (tags & 3) > 0
        order = torch.where(keep, cols, nkb + cols).argsort(-1)  # the union, ascending
        nums.append(keep.sum(-1).to(torch.int32))
        idxs.append((order | tags.gather(-1, order).long() << 24).to(torch.int32))
        if partial:
            rules.append(torch.stack([rule[:, :, t0, :nkb].gather(-1, order),
                                      rule[:, :, t1, :nkb].gather(-1, order)], -1))
    num, idx = torch.cat(nums, 1).contiguous(), torch.cat(idxs, 1).contiguous()
    return num, idx, torch.cat(rules, 1).contiguous() if partial else None


def thread_bits(bits: Tensor) -> Tensor:
    """``TileLists.bits`` (int32 ``[P, 128, C / 32]``, C = 64 or 128 key columns) arranged
    by the consumer thread that reads them: int32 ``[P, 8, 32, C / 64]``.

    In a warpgroup's score fragment (``wgmma`` m64nC), lane ``l`` of 16-row group ``g``
    holds rows ``r = 16 g + l // 4`` and ``r + 8``, columns ``8 i + 2 (l % 4) + b``. Its words
    ``[g, l]`` hold, from bit ``rh * C / 4 + 2 i + b`` on, whether row ``r + 8 rh`` keeps column
    ``8 i + 2 (l % 4) + b``: one 4- or 8-byte load per thread and partial tile, and two
    registers at most (a tile's rows would take eight).
    """
    from .quant import _pack_bits  # quant imports this module

    p, rows, words = bits.shape
    cols = 32 * words
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    kept = ((bits[..., None] >> shifts) & 1).bool().view(p, rows, cols)  # [P, 128, C]
    # rows 16 g + 8 rh + l // 4; columns 8 i + 2 q + b, with l = 4 (l // 4) + q
    kept = kept.view(p, 8, 2, 8, cols // 8, 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    # per thread (g, l): bit rh * C / 4 + 2 i + b of its C / 2 bits
    return _pack_bits(kept.reshape(p, 256, cols // 2)).view(p, 8, 32, cols // 64)


def attention(
    qi: Tensor,
    qs: Tensor,
    ki: Tensor,
    ks: Tensor,
    v: Tensor,
    out: Tensor,
    *,
    block_n: int,
    lists=None,
    order: bool = False,
    norms: Sequence[Tensor] = (),
) -> Tensor:
    """Runs the kernel into ``out``.

    Args:
        qi: int8 ``[B, Hq, NQ_PAD, D]`` (``_quant_q_sum_k`` at 128 rows); qs: fp32
            ``[B, Hq, NQ_PAD / 128]``.
        ki: int8 ``[B, Hkv, NK_PAD, D]`` quantized per ``block_n`` rows; ks: fp32
            ``[B, Hkv, NK_PAD / block_n]``.
        v: ``[B, Hkv, Nk, D]`` in the P·V dtype (fp16 / bf16), read in place.
        out: ``[B, Hq, Nq, D]`` in v's dtype, last dim contiguous.
        block_n: key rows per step: the tile width of ``lists``, else 128.
        lists: ``quant.TileLists`` (partial tiles included), or None for dense.
        order: whether the persistent CTAs take a map's query tiles (or tile pairs) by
            decreasing work (``quant.row_order``) rather than in index order.
        norms: ``(qn, kn)`` of ``quant._quantize_qk(..., norms=True)``: the kernel then
            skips a block's row maxima where ``qn * kn`` shows they cannot move the running
            ones (same result, fewer instructions); ``()``: always computes them.
    """
    lib, err = _library()
    if lib is None:
        raise RuntimeError(err)
    bsz, hq, nq_pad, d = qi.shape
    hkv, nk_pad = ki.shape[1], ki.shape[2]
    a = _Args()
    a.q, a.k, a.v, a.qs, a.ks, a.out = (t.data_ptr() for t in (qi, ki, v, qs, ks, out))
    a.v_sb, a.v_sh, a.v_sn = v.stride(0), v.stride(1), v.stride(2)
    a.o_sb, a.o_sh, a.o_sn = out.stride(0), out.stride(1), out.stride(2)
    nc = CONSUMERS[d]
    if nc not in ((2, 3) if d == 64 else (2,)):
        raise ValueError(f"sm90.CONSUMERS[{d}] must be {'2 or 3' if d == 64 else '2'}, got {nc}")
    nq = out.shape[2]
    a.nc, a.n_tiles = nc, -(-nq // (64 * nc))
    if lists is not None:
        from .quant import _list_strides, row_order  # quant imports this module

        num, idx, tile_order, part_at = lists.full_num, lists.full_idx, lists.row_order, None
        if nc == 3 or lists.n_partial:
            # One list per work item: the union of its two tiles' (three warpgroups), or a
            # tile's full and partial lists merged in key order.
            key = ("walk", 64 * nc, a.n_tiles, ks.shape[2])
            if key not in lists.derived:
                num, idx, part_at = walk_lists(lists, ks.shape[2], a.n_tiles, 64 * nc)
                parts = ((idx >> 26) & 3 > 0).sum(-1).to(torch.int32)
                lists.derived[key] = (num, idx, row_order(num - parts, parts), part_at)
            num, idx, tile_order, part_at = lists.derived[key]
        if part_at is not None:
            if "thread_bits" not in lists.derived:
                lists.derived["thread_bits"] = thread_bits(lists.bits)
            a.part_at, a.bits = part_at.data_ptr(), lists.derived["thread_bits"].data_ptr()
        a.full_num, a.full_idx = num.data_ptr(), idx.data_ptr()
        a.snb, a.snh = _list_strides(num, 2)
        a.sib, a.sih = _list_strides(idx, 2)
        a.siq = idx.stride(2)
        a.row_order = tile_order.data_ptr() if order else 0
    a.stream = torch.cuda.current_stream(qi.device).cuda_stream
    a.batch, a.hq, a.hkv = bsz, hq, hkv
    a.nq, a.nk = nq, v.shape[2]
    a.nq_pad, a.nk_pad, a.d, a.bn = nq_pad, nk_pad, d, block_n
    a.bf16 = int(v.dtype == torch.bfloat16)
    a.nqb, a.nkb = qs.shape[2], ks.shape[2]
    a.n_dense = -(-a.nk // block_n)
    a.pingpong = nc == 2 and PINGPONG[d]
    # The persistent grid hands out work items from this counter (zero at launch; one per
    # call, so that calls on different streams never share one).
    work = torch.zeros(1, dtype=torch.int32, device=qi.device)
    a.work = work.data_ptr()
    if MAX_CTAS is not None and (isinstance(MAX_CTAS, bool) or not isinstance(MAX_CTAS, int)
                                 or MAX_CTAS < 1):
        raise ValueError(f"sm90.MAX_CTAS must be None or a positive int, got {MAX_CTAS!r}")
    a.max_ctas = MAX_CTAS or 0
    if norms:
        qn, kn = norms
        if qn.shape != qi.shape[:3] or kn.shape != ks.shape:
            raise ValueError(
                f"norms must be [B, Hq, NQ_PAD] {tuple(qi.shape[:3])} and [B, Hkv, NKB] "
                f"{tuple(ks.shape)}, got {tuple(qn.shape)} and {tuple(kn.shape)}"
            )
        a.qn, a.kn = qn.data_ptr(), kn.data_ptr()
    err_buf = ctypes.create_string_buffer(512)
    with torch.cuda.device(qi.device):
        if lib.fsq_attention_sm90(ctypes.byref(a), err_buf, len(err_buf)):
            raise RuntimeError(err_buf.value.decode())
    return out
