"""The SDPA and FlexAttention backends of ``flexsparse.attention``.

Each backend takes a validated ``AttentionCall`` (``flexsparse.call``) and answers
``not_supported_reasons(call)`` (what it cannot run), ``auto_reasons(call)`` (why
``backend="auto"`` prefers another backend although this one could run the call),
``describe(call)`` (why it runs the call when picked) and ``run(call)``. Nothing here
validates again or imports ``flexsparse.attention``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from ._devices import cuda_capability
from .call import AttentionCall

#: Up to this many query rows (and fewer than the keys) the mask rows are materialised for
#: SDPA: a decode step, where building a BlockMask costs more than the rows.
DECODE_ROWS = 64
#: SDPA with a materialised mask runs over chunks of query rows so that one chunk holds at
#: most this many elements of ``B * H * rows * KV`` (the scores SDPA's math path builds; the
#: boolean rows are smaller): 64 Mi elements, 256 MiB of fp32 scores, whatever the length.
SDPA_CHUNK_ELEMENTS = 1 << 26
#: Tile size used to look at a static map when the call names none.
DEFAULT_BLOCK = (128, 128)


def sdpa_mode(call: AttentionCall) -> str:
    """How SDPA runs ``call``: ``"none"`` (no mask: cuDNN / flash), ``"causal"``
    (``is_causal``) or ``"mask"`` (materialised mask rows, in chunks)."""
    mask = call.mask
    if mask is None or mask.sdpa_hint == "full":
        return "none"
    if mask.sdpa_hint == "causal" and call.q_len == call.kv_len:
        return "causal"
    if is_decode(call) or not mask.has_tile_rule:
        # A decode step's rows are cheaper than a census of its tiles; a mask without a
        # tile rule would need all Q x KV pairs evaluated to prove it keeps everything.
        return "mask"
    counts = call.tile_counts(tile_size(call))
    return "none" if counts.full == counts.total else "mask"


def is_decode(call: AttentionCall) -> bool:
    return call.q_len <= DECODE_ROWS and call.q_len < call.kv_len


class SdpaBackend:
    """``scaled_dot_product_attention``: no mask or ``is_causal`` where that is exact,
    else the mask's rows materialised chunk by chunk (memory bounded by
    ``SDPA_CHUNK_ELEMENTS``)."""

    name = "sdpa"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        if sdpa_mode(call) != "mask" or is_decode(call):
            return []
        if call.device.type == "cuda":
            return [
                f"{call.q_len} query rows with a sparse mask on CUDA: materialised rows "
                "compute every pair, a tile-skipping kernel does not"
            ]
        if call.compile:
            return ["compile=True asks for compiled FlexAttention"]
        return []

    def describe(self, call: AttentionCall) -> str:
        mode = sdpa_mode(call)
        if mode == "none":
            return "mask keeps everything: SDPA's dense kernel"
        if mode == "causal":
            return "plainly causal: SDPA's causal kernel"
        if is_decode(call):
            return f"{call.q_len} query rows: materialising them is cheaper than a BlockMask"
        return "materialised mask rows, in chunks of bounded memory"

    def run(self, call: AttentionCall) -> Tensor:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        mode = sdpa_mode(call)
        if mode == "none":
            return sdpa(call.q, call.k, call.v, scale=call.scale, enable_gqa=call.gqa)
        if mode == "causal":
            return sdpa(call.q, call.k, call.v, is_causal=True, scale=call.scale,
                        enable_gqa=call.gqa)
        return sdpa_rows(call)


def _row_tiles(call: AttentionCall) -> tuple[int, int, Tensor]:
    """``(block_q, block_kv, kept)``: ``kept`` bool ``[Qb, KVb]`` on the CPU, the column
    tiles some head or batch entry of each query row tile needs."""
    bq, bk = tile_size(call)
    if not call.mask.has_tile_rule:
        qb, kb = -(-call.q_len // bq), -(-call.kv_len // bk)
        return bq, bk, torch.ones(qb, kb, dtype=torch.bool)
    states = call.mask.tile_states(call.q_len, call.kv_len, (bq, bk), device=call.device)
    kept = states != 0
    while kept.dim() > 2:
        kept = kept.any(0)
    return bq, bk, kept.cpu()


def _chunks(call: AttentionCall) -> list[tuple[int, int, Tensor]]:
    """``(start, stop, column tiles)`` covering the query rows, each chunk holding at most
    ``SDPA_CHUNK_ELEMENTS`` of ``B * Hq * rows * kept keys``: whole row tiles grouped while
    the union of their kept columns fits, a row tile split when it alone does not."""
    bq, bk, kept = _row_tiles(call)
    per_key = call.q.shape[0] * call.q.shape[1]
    col_len = torch.full((kept.shape[1],), bk)
    col_len[-1] = call.kv_len - bk * (kept.shape[1] - 1)
    out, i, qb = [], 0, kept.shape[0]
    while i < qb:
        cols, j = kept[i].clone(), i + 1
        while j < qb:
            union = cols | kept[j]
            rows = min((j + 1) * bq, call.q_len) - i * bq
            if per_key * rows * int(col_len[union].sum()) > SDPA_CHUNK_ELEMENTS:
                break
            cols, j = union, j + 1
        lo, hi = i * bq, min(j * bq, call.q_len)
        keys = max(1, int(col_len[cols].sum()))
        step = max(1, SDPA_CHUNK_ELEMENTS // (per_key * keys))
        out += [(a, min(a + step, hi), cols) for a in range(lo, hi, step)]
        i = j
    return out


def sdpa_rows(call: AttentionCall) -> Tensor:
    """SDPA with the mask's rows materialised a bounded chunk of query rows at a time
    (``_chunks``), over the key tiles those rows keep only.

    Rows with no kept key are zeros (SDPA alone gives NaN there). On the CPU, 16-bit
    inputs are computed in float32: faster there than 16-bit, and more exact."""
    q, mask, device = call.q, call.mask, call.device
    work = torch.float32 if device.type == "cpu" and q.element_size() < 4 else q.dtype
    mod = mask.mask_mod_for(device)
    b_idx, h_idx = mask._batch_head_index(device, extra_dims=2)
    lead = mask._lead_shape()
    bk = tile_size(call)[1]
    all_keys = torch.arange(call.kv_len, device=device)
    k_all, v_all = call.k.to(work), call.v.to(work)
    out = torch.zeros_like(q)
    zero = torch.zeros((), dtype=work, device=device)
    for start, stop, cols in _chunks(call):
        if not cols.any():
            continue  # rows that keep no key stay zeros
        if cols.all():
            keys, k, v = all_keys, k_all, v_all
        else:
            tiles = cols.nonzero().flatten().to(device)
            keys = (tiles[:, None] * bk + torch.arange(bk, device=device)).flatten()
            keys = keys[keys < call.kv_len]
            k, v = k_all.index_select(2, keys), v_all.index_select(2, keys)
        rows = torch.arange(call.offset + start, call.offset + stop, device=device)[:, None]
        dense = mod(b_idx, h_idx, rows, keys[None, :]).to(torch.bool)
        dense = dense.expand(*lead, stop - start, keys.numel())
        while dense.dim() < 4:
            dense = dense.unsqueeze(0)
        part = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop].to(work), k, v, attn_mask=dense, scale=call.scale,
            enable_gqa=call.gqa,
        )
        out[:, :, start:stop] = torch.where(dense.any(-1, keepdim=True), part, zero)
    return out


class FlexBackend:
    """FlexAttention with the mask's ``BlockMask``: compiled on CUDA (one cached callable,
    tuned kernel options on Hopper), eager on the CPU unless ``compile=True``."""

    name = "flex"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        if use_compile(call.device, call.compile):
            return []
        b, h = call.q.shape[:2]
        mib = b * h * call.q_len * call.kv_len * 4 / 2**20
        return [
            f"eager FlexAttention on {call.device.type} materialises all B*H*Q*KV scores "
            f"({mib:,.0f} MiB of fp32 here)"
        ]

    def describe(self, call: AttentionCall) -> str:
        how = "compiled" if use_compile(call.device, call.compile) else "eager"
        return f"FlexAttention ({how}) with the BlockMask: empty tiles skipped"

    def run(self, call: AttentionCall) -> Tensor:
        compiled = use_compile(call.device, call.compile)
        bm = call.block_mask(tile_size(call), noop=noop_safe(call, compiled))
        fn = compiled_flex() if compiled else flex_attention
        # From `compiled`, not from which callable `fn` is: while a caller's
        # torch.compile traces this call, compiled_flex() comes back as flex_attention
        # itself, and its kernel then ran with torch's default options (H100, CogVideoX-2b
        # radial map: 12.0 ms against 6.9 untraced; BENCHMARKS.md, 2026-11-26).
        options = kernel_options(bm.BLOCK_SIZE, call.q, compiled)
        kw = {"kernel_options": options} if options else {}
        q, k, v = distinct(call.q, call.k, call.v)
        return fn(q, k, v, block_mask=bm, scale=call.scale, enable_gqa=call.gqa, **kw)


def noop_safe(call: AttentionCall, compiled: bool) -> bool:
    """Whether a map of empty and full tiles may carry ``noop_mask`` for this call: only
    where our own compiled FlexAttention on CUDA runs it, the one kernel sure to read the
    tile lists.

    - Eager FlexAttention applies ``mask_mod`` alone, so with ``noop_mask`` it would
      attend to every pair.
    - Inside a caller's ``torch.compile`` our compiled callable is traced into their graph,
      and their backend decides. ``backend="eager"`` / ``"aot_eager"`` run the eager path:
      an unmasked answer, no error (measured before this rule: max error 0.44 against the
      reference on a CPU tile map; on an H100, 0.12 against the untraced call).
    - On the CPU, torch 2.13's compiled FlexAttention fails to build the ``noop_mask``
      BlockMask of a map without partial tiles (a C++ compile error in the generated
      kernel; its empty partial lists share the full lists' index tensor).
    """
    return compiled and call.device.type == "cuda" and not torch.compiler.is_compiling()


def tile_size(call: AttentionCall) -> tuple[int, int]:
    """The call's tile size, else the mask's native one (a predicted map), else 128."""
    if call.block_size is not None:
        return call.block_size
    native = None if call.mask is None else getattr(call.mask, "native_block_size", None)
    return tuple(native) if native else DEFAULT_BLOCK


def distinct(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` as three distinct tensor objects (views, no copy).

    FlexAttention runs under Dynamo even in eager mode, and Dynamo guards on which inputs
    are the same object. When a call's aliasing differs from the cached graphs' (``q = k
    = v`` after ``q * 2, q, q``), Dynamo explains the recompile by evaluating every cached
    graph's guard sources against the new call, including closure cells of an earlier
    mask's ``mask_mod`` that the new one lacks, and raises ``TypeError: 'NoneType' object
    is not subscriptable`` (torch 2.11 and 2.13). Inputs that are never the same object
    never fail that guard."""
    if k is q:
        k = k.view(k.shape)
    if v is q or v is k:
        v = v.view(v.shape)
    return q, k, v


def use_compile(device: torch.device, compile: bool | None) -> bool:
    """Compile FlexAttention? ``compile`` if given, else ``FLEXSPARSE_COMPILE``, else on
    CUDA only."""
    if compile is not None:
        return compile
    env = os.environ.get("FLEXSPARSE_COMPILE", "auto")
    if env in ("0", "never"):
        return False
    if env in ("1", "always"):
        return True
    return device.type == "cuda"


#: Compiled variants kept by Dynamo for one function (new shapes, dtypes, masks recompile).
_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def compiled_flex():
    # A model sees many sequence lengths; Dynamo's default of 8 variants would silently fall
    # back to the unfused eager path after the eighth.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < _RECOMPILE_LIMIT:
            setattr(config, name, _RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


#: FLEXSPARSE_FLEX_TUNING=0 keeps torch's default FlexAttention kernel options.
_TUNED = os.environ.get("FLEXSPARSE_FLEX_TUNING", "1") != "0"


def kernel_options(block_size, q: Tensor, compiled: bool) -> dict | None:
    """Kernel options for compiled FlexAttention on CUDA.

    - Sparse blocks smaller than 128: the kernel's tile must divide the BlockMask's block
      size, so a (128, 64) map needs ``BLOCK_N <= 64``.
    - Hopper, head_dim <= 64: 128 x 64 tiles, 4 warps, 3 stages and TMA loads measured
      7.9 ms vs 12.3 ms with torch's defaults on the CogVideoX-2b radial mask (density
      0.53) and 13.4 vs 14.8 ms dense (H100, BENCHMARKS.md). Other head dims keep torch's
      tiles and only add TMA.
    """
    if q.device.type != "cuda" or not compiled:
        return None
    options: dict = {}
    hopper = cuda_capability(q.device)[0] == 9
    if hopper and _TUNED and q.shape[-1] <= 64:
        options.update(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    bq, bk = (int(x) for x in block_size)
    if bq < options.get("BLOCK_M", 128) or bk < options.get("BLOCK_N", 128):
        options.update(
            BLOCK_M=math.gcd(bq, options.get("BLOCK_M", 128)),
            BLOCK_N=math.gcd(bk, options.get("BLOCK_N", 128)),
        )
    if hopper and _TUNED and q.shape[-1] % 16 == 0:
        options["USE_TMA"] = True
    return options or None
