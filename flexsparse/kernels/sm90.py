"""Host side of the Hopper kernel (``csrc/quant_attn_sm90.cu``).

The kernel is CUDA C++ for sm_90a (wgmma, TMA, ``setmaxnreg``), which Triton 3.6 cannot
express correctly (docs/kernel_notes.md). It is built with ``nvcc`` on first use into a
per-user cache (``FLEXSPARSE_CACHE``, default ``~/.cache/flexsparse``), keyed by the
source and the compiler, and loaded with ``ctypes``: no build step at install, no torch
headers (a build takes seconds), and a machine without ``nvcc`` simply keeps the Triton
kernel (``build_error`` says why).

It runs the fast path of ``quant_attention``: dense calls and tile maps without partial
tiles (radial block maps), GQA, ``q_len != kv_len``, any lengths, 16-bit P·V in V's own
dtype with V read in place. Partial tiles, the causal rule, ``pvthreshd`` and FP8 P·V stay
on the Triton kernel (``quant.sm90_reasons``), and so do 128 x 64 maps under
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
                     "stream")
    ] + [
        (name, ctypes.c_longlong)
        for name in ("v_sb", "v_sh", "v_sn", "o_sb", "o_sh", "o_sn", "snb", "snh", "sib", "sih",
                     "siq", "batch", "hq", "hkv", "nq", "nk", "nq_pad", "nk_pad", "d", "bn",
                     "bf16", "nqb", "nkb", "n_dense", "pingpong", "nc", "n_tiles")
    ] + [("work", ctypes.c_ulonglong), ("max_ctas", ctypes.c_longlong)]


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
            log.warning("flexsparse: building the sm90 attention kernel (once, ~10 s)")
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


def pair_lists(full_num: Tensor, full_idx: Tensor, nkb: int, n_ctas: int,
               rows: int = 192) -> tuple[Tensor, Tensor]:
    """The key blocks a ``rows``-row work item walks when its rows span two 128-row map
    tiles.

    Item (query tile) ``c`` of a head holds query rows ``[rows * c, rows * c + rows)``,
    the tiles ``t0 = rows * c // 128`` and ``t1`` (the tile of its last row, at most the
    last tile). It walks the union of their lists in increasing key order; each entry is
    the key block plus bit 24 when ``t0`` keeps it and bit 25 when ``t1`` does, so each
    consumer warpgroup computes only its own tile's blocks.

    Args:
        full_num: int32 ``[Bm, Hm, Qb]``; full_idx: int32 ``[Bm, Hm, Qb, W]`` (tile lists).
        nkb: key blocks in the sequence; n_ctas: work items (query tiles) per head.

    Returns:
        ``(num [Bm, Hm, n_ctas], idx [Bm, Hm, n_ctas, nkb])``, int32 and contiguous.
    """
    bm, hm, nqb = full_num.shape
    dev = full_num.device
    listed = torch.arange(full_idx.shape[-1], device=dev) < full_num[..., None]
    member = torch.zeros(bm, hm, nqb, nkb + 1, dtype=torch.int32, device=dev)
    member.scatter_(-1, torch.where(listed, full_idx.long(), nkb), 1)  # nkb: unlisted
    member = member[..., :nkb]
    c = torch.arange(n_ctas, device=dev)
    t0 = rows * c // 128
    t1 = ((rows * c + rows - 1) // 128).clamp(max=nqb - 1)
    tiles = member[:, :, t0] | (member[:, :, t1] << 1)
    cols = torch.arange(nkb, device=dev)
    order = torch.where(tiles > 0, cols, nkb + cols).argsort(-1)  # the union, ascending
    idx = order | (tiles.gather(-1, order) << 24)
    return (tiles > 0).sum(-1).to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()


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
        lists: ``quant.TileLists`` without partial tiles, or None for dense.
        order: whether the persistent CTAs take a map's query tiles (or tile pairs) by
            decreasing work (``quant.row_order``) rather than in index order.
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

        num, idx, tile_order = lists.full_num, lists.full_idx, lists.row_order
        if nc == 3:
            key = ("pairs", a.n_tiles, ks.shape[2])
            if key not in lists.derived:
                pairs = pair_lists(num, idx, ks.shape[2], a.n_tiles)
                lists.derived[key] = (*pairs, row_order(pairs[0], torch.zeros_like(pairs[0])))
            num, idx, tile_order = lists.derived[key]
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
    err_buf = ctypes.create_string_buffer(512)
    with torch.cuda.device(qi.device):
        if lib.fsq_attention_sm90(ctypes.byref(a), err_buf, len(err_buf)):
            raise RuntimeError(err_buf.value.decode())
    return out
