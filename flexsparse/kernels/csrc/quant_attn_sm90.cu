// Quantized block-sparse attention for Hopper (sm_90a): INT8 Q·Kᵀ and 16-bit P·V on the
// tensor cores through wgmma, K and V brought in by the tensor-memory accelerator (TMA).
//
// The arithmetic is the Triton kernel's (flexsparse/kernels/quant.py, module docstring),
// which quant_reference mirrors in PyTorch: scores in log2 units from the exact int32
// dot times the two block scales, online softmax, P rounded to V's 16-bit type, fp32
// accumulation, zeros for a row that keeps no key.
//
// A producer warpgroup and NC consumer warpgroups of 64 query rows each, FlashAttention-3's
// division of labour: two per 128-row work item (registers 32 / 232 after setmaxnreg), or
// three per 192-row item at head_dim 64 (32 / 160), which walk a map's 128-row tiles in
// pairs, over the union of their lists. The grid is persistent (one CTA per multiprocessor):
// one producer thread hands out work items from a counter, each with its Q (two Q slots),
// another copies K and V through a ring of STAGES buffers that runs on from item to item,
// each stage guarded by a "full" barrier (the copy landed) and an "empty" one (every
// consumer warp is done with it); K is released as soon as the scores are computed, V after
// the P·V product.
//
// A map's partial tiles (kept only in part: the token rule of scenes, segments, token-granular
// radial maps, causal diagonals) carry their rule as packed bits, one bit per (row, key) of
// the tile, arranged so that each consumer thread's bits are one or two words of its own
// (sm90.thread_bits); it masks its scores with them before the maximum. Maps with partial
// tiles run an instantiation of their own (PARTIAL): the registers of three consumer
// warpgroups at head_dim 64 are all taken, and the maps of whole tiles keep the kernel they
// had.
//
// What this kernel does not do (the Triton kernel does): an in-kernel causal rule (a causal
// mask comes as its BlockMask), pvthreshd, FP8 P·V. The host side (sm90.py, quant.py) sends
// only calls without them.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "wgmma.cuh"

namespace fsq {

constexpr int BLOCK_M = 128;  // query rows per Q scale and per map tile
constexpr int MAGIC_INT = 0x4B400000;  // float_bits(1.5 * 2**23)
constexpr float MAGIC_FLOAT = 12582912.0f;
// PARTIAL: the score of a masked pair. Below every int8 dot (|s| < 2^21), so it never wins a
// row's maximum over a kept pair, and MASKED + MAGIC_INT is the bit pattern of -inf, so its
// probability comes out 0 with no pass to zero it. A row that keeps no pair of a block gets a
// finite maximum far below its scores (exact softmax all the same: its probabilities are 0
// and O is 0 until a kept pair comes, which rescales it, or stays within the slack).
constexpr int MASKED = int(0xFF800000u - 0x4B400000u);
// How far (log2 units) a row's maximum may rise before O is rescaled (attn_kernel's
// RESCALE_SLACK), by P's type: P <= 2^14 in fp16 (up to 65504), 2^24 in bf16 (fp32's
// range; the row sums and O in fp32 hold far more). FlashAttention-4 uses 8. The norm bound
// of `within_slack` needs room: on flat attention a row's first maximum is ~3.7 log2 units,
// the bound of a warp's rows against a block ~14-16 at head_dim 64 and ~19-21 at 128; at
// slack 8 or 11 it seldom held (measured).
constexpr float SLACK_FP16 = 14.0f, SLACK_BF16 = 24.0f;

struct Params {
  const float* qs;        // [B, Hq, NQB]
  const float* ks;        // [B, Hkv, NKB]
  void* out;              // [B, Hq, Nq, D]
  const int* full_num;    // [Bm, Hm, NQB] (lists) or null (dense)
  const int* full_idx;    // [Bm, Hm, NQB, KVb]
  const int* row_order;   // [NQB] or null
  // Of each list entry with a partial tile (bits 26, 27): the index in `bits` of each of the
  // two tiles' rules, an int2 per entry at the entry's own offset (PARTIAL only).
  const int2* part_at;
  const unsigned* bits;   // [P, 8, 32, BN / 64]: sm90.thread_bits of quant.TileLists.bits
  long long sob, soh, son;
  long long snb, snh, sib, sih, siq;
  int hq, group, hkv, nq, nk, nqb, nkb, n_dense, pingpong, nq_pad;
  int n_tiles, n_items;  // ROWS-row query tiles per head; work items (tiles x heads)
  int max_ctas;          // the grid's cap (0: one CTA per multiprocessor)
  int* work;             // the next work item to hand out, 0 at launch
  // Norms of the quantized rows, in float units (quant._quantize_qk): Q's per row [B, Hq,
  // NQ_PAD], each K block's largest with a margin [B, Hkv, NKB]. Their product bounds a
  // row's scores against the block (log2 units); null: no bound.
  const float* qn;
  const float* kn;
};

// -- shared memory, barriers, copies --------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void bar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t* bar, int parity) {
  bar_wait(smem_addr(bar), parity);
}

// The copies take shared-memory addresses (32 bits): the producer, at 32 registers, holds
// no 64-bit generic pointers.
__device__ __forceinline__ void tma_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                       int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void tma_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                       int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// A plain bulk copy (no tensor map) of `bytes` (a multiple of 16) into shared memory.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Position in the STAGES-deep ring of K / V buffers: the stage, and the phase parity its
// barriers are at (flips each time the ring wraps).
template <int STAGES>
struct Ring {
  int stage = 0, parity = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      parity ^= 1;
    }
  }
};

// -- wgmma plumbing ---------------------------------------------------------------------

// Shared-memory matrix descriptor: start address, leading / stride byte offsets (16-byte
// units) and the swizzle mode (bits 62-63: 1 = 128 B, 2 = 64 B).
template <int SWIZZLE>
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  static_assert(SWIZZLE == 64 || SWIZZLE == 128, "swizzle of 64 or 128 bytes");
  uint64_t d = (smem_addr(p) & 0x3FFFF) >> 4;
  d |= uint64_t((lbo & 0x3FFFF) >> 4) << 16;
  d |= uint64_t((sbo & 0x3FFFF) >> 4) << 32;
  d |= uint64_t(SWIZZLE == 128 ? 1 : 2) << 62;
  return d;
}

// Steps along a tile move only the start address, the low 14 bits: adding the step to the
// low word alone (shared memory ends below 256 KB, so no carry can leave it) spares the
// 64-bit add with carry and its register moves that each product's descriptor costs otherwise.
__device__ __forceinline__ uint64_t desc_step(uint64_t desc, uint32_t step) {
  return (desc & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(static_cast<uint32_t>(desc) + step);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across the
// asynchronous MMA that owns it.
template <int N>
__device__ __forceinline__ void fence_regs(int (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int BN>
__device__ __forceinline__ void mma_qk(int (&s)[BN / 2], uint64_t da, uint64_t db, int acc) {
  if constexpr (BN == 64) wgmma_s8_m64n64k32(s, da, db, acc);
  else wgmma_s8_m64n128k32(s, da, db, acc);
}

// O[64 x (D + 8)] += P V1 with V1 = [V | ones]: columns D.. of O carry the row sums of P.
template <typename T, int D>
__device__ __forceinline__ void mma_pv(float (&o)[D / 2 + 4], const uint32_t (&a)[4],
                                       uint64_t db) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (bf16 && D == 64) wgmma_bf16_m64n72k16_rs(o, a, db);
  else if constexpr (bf16) wgmma_bf16_m64n136k16_rs(o, a, db);
  else if constexpr (D == 64) wgmma_f16_m64n72k16_rs(o, a, db);
  else wgmma_f16_m64n136k16_rs(o, a, db);
}

// Two floats rounded to T and packed, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return reinterpret_cast<uint32_t&>(v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return reinterpret_cast<uint32_t&>(v);
  }
}

// -- the kernel -------------------------------------------------------------------------

// What the producer tells the consumers about a stage: the key block, its K scale, which of
// the item's map tiles keep it (bits 0 and 1, pairs) and keep it only in part (bits 2 and 3,
// PARTIAL), where those two tiles' rules are in `bits`, and the block's largest K norm
// (Params::kn; infinity without).
struct alignas(16) StageInfo {
  int block;
  float scale;
  int tiles;
  int part[2];
  float k_norm;
};

// A work item as the producer hands it out with its Q: the query tile (of ROWS rows), the
// batch, head and K / V head, how many key blocks it walks (-1: no more items), and the Q
// scale of each consumer warpgroup's rows. The divisions are done once, by the thread that
// hands items out.
struct alignas(16) ItemInfo {
  int tile_m, b, h, hk, n_blocks;
  float c_q[3];
};

// NC consumer warpgroups of 64 query rows each: 2 (128-row items), or 3 at head_dim 64
// (192 rows: a third warp per scheduler to hide latency; a map's tiles are then walked in
// pairs).
template <int D, int BN, int STAGES, int NC, bool PARTIAL>
struct Layout {
  static constexpr int ROWS = 64 * NC;               // query rows per work item
  static constexpr int THREADS = 128 * (NC + 1);     // the producer warpgroup, then NC
  // Registers per thread after setmaxnreg, in multiples of 8: the producer's 32 hold its
  // loops without spilling; the consumers take the rest of what the CTA launched with
  // (64K / THREADS rounded down to 8 each). Asking for more than that makes setmaxnreg.inc
  // wait forever (seen on the GPU: 240 with two consumer warpgroups hung).
  static constexpr int PRODUCER_REGS = 32;
  static constexpr int CONSUMER_REGS = NC == 2 ? 232 : 160;
  static constexpr int LAUNCH_REGS = 65536 / THREADS / 8 * 8;
  static_assert(128 * PRODUCER_REGS + 128 * NC * CONSUMER_REGS <= LAUNCH_REGS * THREADS,
                "the warpgroups' registers exceed what the CTA launches with");
  static constexpr int Q_BYTES = ROWS * D;           // int8, per slot (two: the next item's
                                                     // Q lands while this one runs)
  static constexpr int K_BYTES = BN * D;             // int8
  // 16-bit V: D / 64 panels of BN x 128 B, then a panel of ones (row sums of P).
  static constexpr int V_BYTES = BN * (D + 64) * 2;
  static constexpr int V_COPY_BYTES = BN * D * 2;  // what the copies bring per stage
  static constexpr int K_OFF = 2 * Q_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * K_BYTES;
  static constexpr int BAR_OFF = V_OFF + STAGES * V_BYTES;
  static constexpr int N_BARS = 4 + 4 * STAGES;  // Q full / empty per slot, K and V rings
  // PARTIAL with three consumer warpgroups: per stage, the rules of the item's two tiles
  // (sm90.thread_bits), brought in with the stage's K (its "full" barrier counts them). With
  // two, the consumers read their rule from global memory: the 4-8 KB would take the
  // 128-row layouts past 164 KB of shared memory, the next carve-out halving the L1
  // (causal 2 x 32 x 8,192 at D=128 ran 2-6 % slower with them).
  static constexpr bool RULES_IN_SMEM = PARTIAL && NC == 3;
  static constexpr int RULE_WORDS = BN / 64;           // per thread
  static constexpr int RULE_BYTES = 256 * RULE_WORDS * 4;  // per tile
  static constexpr int RULE_OFF = BAR_OFF + N_BARS * 8;
  static constexpr int RULES_END = RULE_OFF + (RULES_IN_SMEM ? STAGES * 2 * RULE_BYTES : 0);
  // Per stage: the key block, its K scale and which of the item's map tiles keep it; then
  // the two Q slots' work items.
  static constexpr int INFO_OFF = (RULES_END + 15) / 16 * 16;
  static constexpr int ITEM_OFF = INFO_OFF + STAGES * int(sizeof(StageInfo));
  static constexpr int BYTES = ITEM_OFF + 2 * int(sizeof(ItemInfo));
  static constexpr int SWIZZLE_QK = D == 128 ? 128 : 64;  // an int8 row is D bytes
};

template <int D, int BN, int STAGES, int NC, bool PARTIAL, typename T>
__global__ void __launch_bounds__(Layout<D, BN, STAGES, NC, PARTIAL>::THREADS, 1)
    attn_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                const __grid_constant__ CUtensorMap tm_v, const Params p) {
  using L = Layout<D, BN, STAGES, NC, PARTIAL>;
  static_assert(NC == 2 || NC == 3, "two or three consumer warpgroups");
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr float RESCALE_SLACK = BF16 ? SLACK_BF16 : SLACK_FP16;
  // The norm bound of `within_slack` (sm90.uses_bound): where its slack covers flat
  // attention's bound.
  constexpr bool BOUND = D == 64 || BF16;
  extern __shared__ uint8_t smem_raw[];
  // 128-byte swizzle atoms must sit on 1024-byte boundaries.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* s_q = smem;
  uint8_t* s_k = smem + L::K_OFF;
  uint8_t* s_v = smem + L::V_OFF;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::BAR_OFF);
  uint64_t* full_q = bars;  // two slots, then empty_q's two
  uint64_t* empty_q = bars + 2;
  uint64_t* full_k = bars + 4;
  uint64_t* full_v = full_k + STAGES;
  uint64_t* empty_k = full_v + STAGES;
  uint64_t* empty_v = empty_k + STAGES;
  // Written by the producer before it arms full_k (whose arrival releases them): the key
  // block of each stage and its K scale, so the consumers' loop reads no global memory.
  StageInfo* stage_info = reinterpret_cast<StageInfo*>(smem + L::INFO_OFF);
  ItemInfo* item_info = reinterpret_cast<ItemInfo*>(smem + L::ITEM_OFF);

  const bool lists = p.full_num != nullptr;
  // A 192-row item spans two of a map's 128-row tiles: it walks the union of their lists,
  // whose entries carry bit 24 (the first tile keeps the block) and bit 25 (the second).
  const bool pairs = NC == 3 && lists;

  // The grid is persistent: each CTA takes work items (a query tile of ROWS rows of one
  // (batch, head); tiles fastest, in row_order when given) until none is left, so that the
  // next item's copies overlap this one's last blocks and stores, and no CTA pays a launch
  // and a pipeline fill per tile. Its first item is its index, the later ones come from a
  // counter (dynamic: maps give items of different lengths).
  auto item_at = [&](int w, int& tile_m, int& bh) {
    const int x = w % p.n_tiles;
    bh = w / p.n_tiles;
    tile_m = (lists && p.row_order) ? p.row_order[x] : x;
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      bar_init(full_q + s, 1);
      bar_init(empty_q + s, 4 * NC);  // one arrival per consumer warp
    }
    for (int s = 0; s < STAGES; ++s) {
      bar_init(full_k + s, 1);
      bar_init(full_v + s, 1);
      bar_init(empty_k + s, 4 * NC);  // one arrival per consumer warp
      bar_init(empty_v + s, 4 * NC);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // Producer warpgroup.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(L::PRODUCER_REGS));
    // Two threads of it, each in 32 registers: one hands out work items (each with its Q),
    // one copies K and V through the ring, STAGES blocks ahead of the consumers.
    if (threadIdx.x == 32) {
      const uint32_t sq = smem_addr(s_q), fq = smem_addr(full_q), eq = smem_addr(empty_q);
      Ring<2> q_ring;
      for (int w = blockIdx.x;; q_ring.advance()) {
        const int slot = q_ring.stage;
        bar_wait(eq + 8 * slot, q_ring.parity ^ 1);  // its item two back is done with
        ItemInfo& item = item_info[slot];
        if (w >= p.n_items) {
          item.n_blocks = -1;
          bar_arrive(full_q + slot);
          break;
        }
        int tile_m, bh;
        item_at(w, tile_m, bh);
        const int b = bh / p.hq, h = bh - b * p.hq;
        item.tile_m = tile_m;
        item.b = b;
        item.h = h;
        item.hk = h / p.group;
        item.n_blocks = lists ? p.full_num[b * p.snb + h * p.snh + tile_m] : p.n_dense;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int row = tile_m * L::ROWS + 64 * c;
          item.c_q[c] = p.qs[(long long)bh * p.nqb + min(row / BLOCK_M, p.nqb - 1)];
        }
        bar_expect(fq + 8 * slot, L::Q_BYTES);  // rows past the padded end arrive as zeros
#pragma unroll
        for (int c = 0; c < NC; ++c)
          tma_3d(sq + slot * L::Q_BYTES + c * 64 * D, &tm_q, fq + 8 * slot, 0,
                 tile_m * L::ROWS + 64 * c, bh);
        // The consumers still have this item's blocks to go: the counter's latency hides.
        w = atomicAdd(p.work, 1) + gridDim.x;
      }
    } else if (threadIdx.x == 0) {
      const uint32_t sk = smem_addr(s_k), sv = smem_addr(s_v), fk = smem_addr(full_k),
                     fv = smem_addr(full_v), ek = smem_addr(empty_k), ev = smem_addr(empty_v);
      Ring<STAGES> ring;  // continues from item to item, as the consumers' does
      for (Ring<2> q_ring;; q_ring.advance()) {
        // The item's Q has landed: its ItemInfo is written (STAGES blocks of the item
        // before it still hide that wait from the consumers).
        bar_wait(full_q + q_ring.stage, q_ring.parity);
        const ItemInfo& item = item_info[q_ring.stage];
        const int n_blocks = item.n_blocks;
        if (n_blocks < 0) break;
        const int tile_m = item.tile_m, b = item.b, h = item.h, hk = item.hk;
        const int kv_head = b * p.hkv + hk;
        const int* idx = lists ? p.full_idx + b * p.sib + h * p.sih + tile_m * p.siq : nullptr;
        const float* k_scale = p.ks + (long long)kv_head * p.nkb;
        // (read only when p.kn is set; a select here would spill the producer's 32 registers)
        const float* k_norm = p.kn + (long long)kv_head * p.nkb;
        int entry = n_blocks > 0 ? (idx ? idx[0] : 0) : 0;
#pragma unroll 1
        for (int it = 0; it < n_blocks; ++it, ring.advance()) {
          // The "empty" barriers start a phase ahead: the first round waits on none.
          const int s = ring.stage, parity = ring.parity ^ 1;
          const int j = entry & 0xFFFFFF;
          const float scale = k_scale[j], norm = p.kn ? k_norm[j] : INFINITY;
          const int next = it + 1 < n_blocks ? (idx ? idx[it + 1] : it + 1) : 0;
          int2 part = make_int2(-1, -1);
          if (PARTIAL && (entry & (3 << 26)))  // an entry of a list: idx is not null
            part = p.part_at[idx + it - p.full_idx];
          bar_wait(ek + 8 * s, parity);
          stage_info[s] = StageInfo{j, scale, entry >> 24, {part.x, part.y}, norm};
          if constexpr (L::RULES_IN_SMEM) {
            // The tiles' rules land with K (one when both tiles are one: the last item).
            const bool second = part.y >= 0 && part.y != part.x;
            bar_expect(fk + 8 * s, L::K_BYTES + L::RULE_BYTES * ((part.x >= 0) + second));
            const uint32_t rules = smem_addr(smem + L::RULE_OFF) + s * 2 * L::RULE_BYTES;
            if (part.x >= 0)
              bulk_copy(rules, p.bits + part.x * (L::RULE_BYTES / 4), L::RULE_BYTES, fk + 8 * s);
            if (second)
              bulk_copy(rules + L::RULE_BYTES, p.bits + part.y * (L::RULE_BYTES / 4),
                        L::RULE_BYTES, fk + 8 * s);
          } else {
            bar_expect(fk + 8 * s, L::K_BYTES);
          }
          tma_3d(sk + s * L::K_BYTES, &tm_k, fk + 8 * s, 0, j * BN, kv_head);
          bar_wait(ev + 8 * s, parity);
          bar_expect(fv + 8 * s, L::V_COPY_BYTES);
#pragma unroll
          for (int c = 0; c < D / 64; ++c)
            tma_4d(sv + s * L::V_BYTES + c * BN * 128, &tm_v, fv + 8 * s, c * 64, j * BN, hk, b);
          entry = next;
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(L::CONSUMER_REGS));
  const int half = wg - 1;  // rows 64 * half .. + 63 of the item's
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  constexpr int SBO_QK = L::SWIZZLE_QK * 8;  // 8 rows of one swizzle atom
  const int col_in = 2 * (lane % 4);
  // Of the current item: the first of these rows (within one 128-row Q scale block), which
  // map tile of the pair they are in (pairs; the bit of StageInfo::tiles, none for rows
  // past the end, which then skip every block), their Q scale and Q descriptor.
  int row_base = 0, my_tile = 0;
  float c_q = 0.f;
  float q_norm0 = INFINITY, q_norm1 = INFINITY;  // of the thread's two rows (Params::qn)
  uint64_t desc_q = 0;
  // PARTIAL: a partial tile's rule for the thread's scores, bit rh * BN / 4 + 2 i + b for
  // score 4 i + 2 rh + b (sm90.thread_bits).
  constexpr int RULE_WORDS = L::RULE_WORDS;
  uint32_t rule[RULE_WORDS];
  // Whether this warpgroup's tile keeps stage s only in part; if so, its rule is read (from
  // the stage's copy in shared memory, which landed with K, or from global memory).
  auto load_rule = [&](int s) {
    if constexpr (!PARTIAL) {
      return false;
    } else {
      if (!(stage_info[s].tiles & (my_tile << 2))) return false;
      // the thread's words: its 16-row group of the tile and its lane
      const int at = ((row_base % BLOCK_M) / 16 + (threadIdx.x / 32) % 4) * 32 + threadIdx.x % 32;
      const uint32_t* src;
      if constexpr (L::RULES_IN_SMEM)
        src = reinterpret_cast<const uint32_t*>(smem + L::RULE_OFF +
                                                (2 * s + (my_tile >> 1)) * L::RULE_BYTES);
      else
        src = p.bits + static_cast<long long>(stage_info[s].part[my_tile >> 1]) * 256 *
                           RULE_WORDS;
      src += at * RULE_WORDS;
      if constexpr (RULE_WORDS == 2) {
        const uint2 w = *reinterpret_cast<const uint2*>(src);
        rule[0] = w.x, rule[1] = w.y;
      } else {
        rule[0] = *src;
      }
      return true;
    }
  };

  // The ones panels (never overwritten: the copies fill the V panels only), then a
  // proxy fence: the tensor cores read what ordinary stores wrote.
  {
    const uint32_t one2 = pack2<T>(1.f, 1.f);
    const int tid = threadIdx.x - 128;
    for (int s = 0; s < STAGES; ++s) {
      uint32_t* ones = reinterpret_cast<uint32_t*>(s_v + s * L::V_BYTES + (D / 64) * BN * 128);
      for (int i = tid; i < BN * 32; i += 128 * NC) ones[i] = one2;
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("bar.sync 3, %0;" ::"n"(128 * NC) : "memory");
  }

  constexpr int NO = D / 2 + 4;  // O, then the row sums (o[D/2], o[D/2 + 2])
  float o[NO];
  int sc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) sc[i] = 0;
  float x[BN / 2];      // probabilities of the block being softmaxed
  uint32_t pk[BN / 4];  // P of the block whose P·V is in flight, 16-bit pairs
  float m0 = -INFINITY, m1 = -INFINITY;     // running maxima of the thread's two rows
  float log_alpha0 = 0.f, log_alpha1 = 0.f;  // log2 of the factors O is rescaled by
  bool rescale = false;                       // whether any row of the warp's moved

  auto issue_qk = [&](int s) {
    const uint64_t desc_k = smem_desc<L::SWIZZLE_QK>(s_k + s * L::K_BYTES, 16, SBO_QK);
    fence_regs(sc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
      mma_qk<BN>(sc, desc_step(desc_q, 2 * kk), desc_step(desc_k, 2 * kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int s) {
    // P from registers (the accumulator layout is the A-fragment layout), [V | ones]
    // MN-major: D / 64 + 1 panels, BN * 128 bytes apart.
    const uint64_t desc_v = smem_desc<128>(s_v + s * L::V_BYTES, BN * 128, 1024);
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int t = 0; t < BN / 16; ++t) {
      const uint32_t a[4] = {pk[4 * t], pk[4 * t + 1], pk[4 * t + 2], pk[4 * t + 3]};
      mma_pv<T, D>(o, a, desc_step(desc_v, t * 2048 >> 4));
    }
    wgmma_commit();
  };
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) bar_arrive(bar);
  };
  // Whether no score of the warp's rows against a key block (largest K norm k_norm) can
  // exceed its row's running maximum by more than RESCALE_SLACK: |q . k| <= |q| |k|
  // (Params::qn, kn) bounds them, and a bound within the slack moves no maximum, so
  // `softmax` may skip the block's row maxima (the same result). That skips the chain
  // maxima -> shuffles -> exponentials, the consumers' longest, on most blocks of flat
  // attention (+5-7 % dense at head_dim 64, H100). Never while a row has no maximum yet
  // (-inf). Off for fp16 P at head_dim 128, where the bound of flat attention exceeds
  // fp16's slack. (Asked before the wait for the scores, which it does not need, it
  // measured no faster.)
  auto within_slack = [&](float k_norm) {
    return BOUND && __all_sync(0xffffffff, q_norm0 * k_norm <= m0 + RESCALE_SLACK &&
                                               q_norm1 * k_norm <= m1 + RESCALE_SLACK);
  };
  // Online softmax of key block j (K scale k_scale) on the biased scores MAGIC + s (exact;
  // the integer maximum first), log2 units: x holds the probabilities afterwards,
  // rescale / log_alpha what O is to be multiplied by. Columns past the keys get the score
  // INT_MIN (MASKED in PARTIAL), and probability 0. `partial` (PARTIAL): `rule` masks the
  // block's pairs too.
  auto softmax = [&](int j, float k_scale, float k_norm, bool partial) {
    fence_regs(sc);
    const float c = c_q * k_scale;
    const bool ragged = (j + 1) * BN > p.nk;
    constexpr int PAD = PARTIAL ? MASKED : INT_MIN;
    if (ragged) {  // the last block: columns past the keys drop out of the maximum
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        const int col = j * BN + 8 * i + col_in;
        if (col >= p.nk) sc[4 * i] = sc[4 * i + 2] = PAD;
        if (col + 1 >= p.nk) sc[4 * i + 1] = sc[4 * i + 3] = PAD;
      }
    }
    if (PARTIAL && partial) {
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int bit = rh * BN / 4 + 2 * i;
          const uint32_t w = rule[bit / 32];
          // ptxas moves the word's bits into predicates seven at a time (R2P): one select
          // per score
          if (!(w & (1u << (bit % 32)))) sc[4 * i + 2 * rh] = MASKED;
          if (!(w & (2u << (bit % 32)))) sc[4 * i + 2 * rh + 1] = MASKED;
        }
      }
    }
    // The block's row maxima, unless they would move nothing (within_slack).
    int mi0 = INT_MIN, mi1 = INT_MIN;
    if (!within_slack(k_norm)) {
      mi0 = __vimax3_s32(sc[0], sc[1], INT_MIN);
      mi1 = __vimax3_s32(sc[2], sc[3], INT_MIN);
      int mj0 = INT_MIN, mj1 = INT_MIN;  // two chains per row
#pragma unroll
      for (int i = 1; i < BN / 8; ++i) {
        if (i % 2) {
          mj0 = __vimax3_s32(mj0, sc[4 * i], sc[4 * i + 1]);
          mj1 = __vimax3_s32(mj1, sc[4 * i + 2], sc[4 * i + 3]);
        } else {
          mi0 = __vimax3_s32(mi0, sc[4 * i], sc[4 * i + 1]);
          mi1 = __vimax3_s32(mi1, sc[4 * i + 2], sc[4 * i + 3]);
        }
      }
      mi0 = max(mi0, mj0);
      mi1 = max(mi1, mj1);
      mi0 = max(mi0, __shfl_xor_sync(0xffffffff, mi0, 1));
      mi0 = max(mi0, __shfl_xor_sync(0xffffffff, mi0, 2));
      mi1 = max(mi1, __shfl_xor_sync(0xffffffff, mi1, 1));
      mi1 = max(mi1, __shfl_xor_sync(0xffffffff, mi1, 2));
    }
    // A row's running maximum moves only when the block's exceeds it by more than
    // RESCALE_SLACK (FlashAttention-4's conditional rescaling): P then stays below
    // 2^RESCALE_SLACK, which 16-bit P and the fp32 accumulators hold as precisely, and O
    // is rescaled a few times per row instead of whenever a maximum creeps up.
    const float blk0 = mi0 == INT_MIN ? -INFINITY : float(mi0) * c;
    const float blk1 = mi1 == INT_MIN ? -INFINITY : float(mi1) * c;
    const float new0 = blk0 > m0 + RESCALE_SLACK ? blk0 : m0;
    const float new1 = blk1 > m1 + RESCALE_SLACK ? blk1 : m1;
    const float safe0 = new0 == -INFINITY ? 0.f : new0;
    const float safe1 = new1 == -INFINITY ? 0.f : new1;
    rescale = __any_sync(0xffffffff, new0 != m0 || new1 != m1);
    log_alpha0 = m0 - safe0;  // -inf on a row's first keys: O is still 0
    log_alpha1 = m1 - safe1;
    m0 = new0;
    m1 = new1;
    const float bias0 = MAGIC_FLOAT * c + safe0, bias1 = MAGIC_FLOAT * c + safe1;
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      x[4 * i] = exp2f(fmaf(__int_as_float(sc[4 * i] + MAGIC_INT), c, -bias0));
      x[4 * i + 1] = exp2f(fmaf(__int_as_float(sc[4 * i + 1] + MAGIC_INT), c, -bias0));
      x[4 * i + 2] = exp2f(fmaf(__int_as_float(sc[4 * i + 2] + MAGIC_INT), c, -bias1));
      x[4 * i + 3] = exp2f(fmaf(__int_as_float(sc[4 * i + 3] + MAGIC_INT), c, -bias1));
    }
    if (!PARTIAL && ragged) {  // (MASKED's probabilities are 0 already)
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        const int col = j * BN + 8 * i + col_in;
        if (col >= p.nk) x[4 * i] = x[4 * i + 2] = 0.f;
        if (col + 1 >= p.nk) x[4 * i + 1] = x[4 * i + 3] = 0.f;
      }
    }
  };
  // After the previous P·V is done: O *= alpha (only in a warp where some row's maximum
  // moved, rare after the first blocks), this block's P packed into the A fragments.
  auto rescale_and_pack = [&]() {
    fence_regs(o);
    if (rescale) {
      const float alpha0 = exp2f(log_alpha0), alpha1 = exp2f(log_alpha1);
#pragma unroll
      for (int i = 0; i < NO / 4; ++i) {
        o[4 * i] *= alpha0;
        o[4 * i + 1] *= alpha0;
        o[4 * i + 2] *= alpha1;
        o[4 * i + 3] *= alpha1;
      }
    }
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      pk[2 * i] = pack2<T>(x[4 * i], x[4 * i + 1]);
      pk[2 * i + 1] = pack2<T>(x[4 * i + 2], x[4 * i + 3]);
    }
  };
  // Two consumer warpgroups may take turns issuing their MMAs (FlashAttention-3's
  // ping-pong), so that one's softmax runs while the other's products do.
  constexpr int PINGPONG = 1;  // named barriers 1 and 2 (0 is __syncthreads, 3 the setup)
  const bool pingpong = NC == 2 && p.pingpong;
  auto turn_wait = [&]() {
    if (pingpong) asm volatile("bar.sync %0, 256;" ::"r"(PINGPONG + half) : "memory");
  };
  auto turn_pass = [&]() {
    if (pingpong) asm volatile("bar.arrive %0, 256;" ::"r"(PINGPONG + 1 - half) : "memory");
  };
  if (pingpong && half == 1) asm volatile("bar.arrive %0, 256;" ::"r"(PINGPONG) : "memory");

  int prev = -1, prev_parity = 0;  // the stage whose P·V is still to be issued
  auto finish_pv = [&]() {
    bar_wait(full_v + prev, prev_parity);
    turn_wait();
    issue_pv(prev);
    turn_pass();
    wgmma_wait<0>();
    fence_regs(o);
    release(empty_v + prev);
    prev = -1;
  };
  Ring<STAGES> ring;
  Ring<2> q_ring;
  for (;; q_ring.advance()) {  // work items
    const int slot = q_ring.stage;
    bar_wait(full_q + slot, q_ring.parity);
    const int n_blocks = item_info[slot].n_blocks;
    if (n_blocks < 0) break;
    const int tile_m = item_info[slot].tile_m;
    row_base = tile_m * L::ROWS + half * 64;
    my_tile = row_base >= p.nq ? 0 : 1 << (row_base / BLOCK_M - tile_m * L::ROWS / BLOCK_M);
    c_q = item_info[slot].c_q[half];
    if (BOUND && p.qn) {
      const long long bh = (long long)item_info[slot].b * p.hq + item_info[slot].h;
      const float* qn = p.qn + bh * p.nq_pad;
      const int row0 = row_base + warp * 16 + lane / 4, row1 = row0 + 8;
      q_norm0 = row0 < p.nq_pad ? qn[row0] : 0.f;
      q_norm1 = row1 < p.nq_pad ? qn[row1] : 0.f;
    }
    desc_q = smem_desc<L::SWIZZLE_QK>(s_q + slot * L::Q_BYTES + half * 64 * D, 16, SBO_QK);
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.f;
    m0 = m1 = -INFINITY;
    for (int it = 0; it < n_blocks; ++it, ring.advance()) {
      const int s = ring.stage, parity = ring.parity;
      bar_wait(full_k + s, parity);
      if (pairs && !(stage_info[s].tiles & my_tile)) {  // a block only the other tile keeps
        release(empty_k + s);
        // The pending P·V stays pending (its next kept block issues it with its scores)
        // unless this stage is its V's: this round's copy into it waits for that V to be
        // released, so the wait below would never end. Skips nearer than STAGES are safe:
        // their copies wait only on blocks every warpgroup has released.
        if (s == prev) finish_pv();
        // V's "empty" arrival waits for this round's copy: an earlier one could count
        // towards the previous round, while other warps still read that V.
        bar_wait(full_v + s, parity);
        release(empty_v + s);
        continue;
      }
      // The stage's info and a partial tile's rule are read while the products run: their
      // latency hides under them.
      StageInfo info;
      if (prev < 0) {
        turn_wait();
        issue_qk(s);
        turn_pass();
        info = stage_info[s];
        const bool partial = load_rule(s);
        wgmma_wait<0>();
        softmax(info.block, info.scale, info.k_norm, partial);
        release(empty_k + s);
      } else {
        bar_wait(full_v + prev, prev_parity);
        turn_wait();
        issue_qk(s);
        issue_pv(prev);
        turn_pass();
        info = stage_info[s];
        const bool partial = load_rule(s);
        wgmma_wait<1>();  // the scores are in; P·V of the previous block may still run
        softmax(info.block, info.scale, info.k_norm, partial);
        release(empty_k + s);
        wgmma_wait<0>();
        fence_regs(o);
        release(empty_v + prev);
      }
      rescale_and_pack();
      prev = s;
      prev_parity = parity;
    }
    if (prev >= 0) finish_pv();
    const int b = item_info[slot].b, h = item_info[slot].h;
    release(empty_q + slot);  // every product that read this Q (and its item) is complete

    // Epilogue: O / l (0 for a row with no key), 16-bit stores.
    const float l0 = o[D / 2], l1 = o[D / 2 + 2];
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const int row0 = row_base + warp * 16 + lane / 4, row1 = row0 + 8;
    T* out = static_cast<T*>(p.out) + b * p.sob + h * p.soh;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = 8 * i + col_in;
      if (row0 < p.nq)
        *reinterpret_cast<uint32_t*>(out + row0 * p.son + col) =
            pack2<T>(o[4 * i] * inv0, o[4 * i + 1] * inv0);
      if (row1 < p.nq)
        *reinterpret_cast<uint32_t*>(out + row1 * p.son + col) =
            pack2<T>(o[4 * i + 2] * inv1, o[4 * i + 3] * inv1);
    }
  }
}

}  // namespace fsq

// -- host side ----------------------------------------------------------------------------

extern "C" {

// Mirrored by ctypes in sm90.py; every field 8 bytes.
struct FsqArgs {
  unsigned long long q, k, v, qs, ks, out, full_num, full_idx, row_order, stream;
  unsigned long long part_at, bits;  // partial tiles' rules (sm90.walk_lists; null: none)
  long long v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;  // elements
  long long snb, snh, sib, sih, siq;
  long long batch, hq, hkv, nq, nk, nq_pad, nk_pad, d, bn, bf16, nqb, nkb, n_dense, pingpong;
  long long nc, n_tiles;  // consumer warpgroups (2, or 3 at D=64); query tiles per head
  unsigned long long work;  // int32 work-item counter, zero
  long long max_ctas;       // at most this many CTAs (0: one per multiprocessor)
  unsigned long long qn, kn;  // norms of the quantized rows (quant._quantize_qk; null: none)
};

}

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult res;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &res) == cudaSuccess &&
        res == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

int make_map(CUtensorMap* map, CUtensorMapDataType type, int rank, void* addr,
             const unsigned long long* dims, const unsigned long long* strides_bytes,
             const unsigned* box, CUtensorMapSwizzle swizzle, char* err, int err_len) {
  auto fn = encode_fn();
  if (!fn) {
    snprintf(err, err_len, "cuTensorMapEncodeTiled is not available from the CUDA driver");
    return 1;
  }
  cuuint64_t d[5], st[4];
  cuuint32_t bx[5], es[5];
  for (int i = 0; i < rank; ++i) {
    d[i] = dims[i];
    bx[i] = box[i];
    es[i] = 1;
    if (i + 1 < rank) st[i] = strides_bytes[i];
  }
  CUresult r = fn(map, type, rank, addr, d, st, bx, es, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    snprintf(err, err_len, "cuTensorMapEncodeTiled failed with CUresult %d", int(r));
    return 1;
  }
  return 0;
}

// The current device's multiprocessor count, asked once per device (atomics: host threads
// may launch at once).
cudaError_t multiprocessors(int* sms) {
  static std::atomic<int> known[64] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device >= 64) return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  int count = known[device].load(std::memory_order_relaxed);
  if (count == 0) {
    e = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
    known[device].store(count, std::memory_order_relaxed);
  }
  *sms = count;
  return cudaSuccess;
}

template <int D, int BN, int STAGES, int NC, typename T>
int launch(const FsqArgs& a, const CUtensorMap& tq, const CUtensorMap& tk, const CUtensorMap& tv,
           const fsq::Params& p, char* err, int err_len) {
  using L = fsq::Layout<D, BN, STAGES, NC, false>;
  using LP = fsq::Layout<D, BN, STAGES, NC, true>;  // maps with partial tiles
  auto kernel = p.part_at ? fsq::attn_kernel<D, BN, STAGES, NC, true, T>
                          : fsq::attn_kernel<D, BN, STAGES, NC, false, T>;
  const int smem = (p.part_at ? LP::BYTES : L::BYTES) + 1024;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e == cudaSuccess) {
    // Persistent: one CTA per multiprocessor (the registers allow one), fewer for few items
    // or under the caller's cap (tests: many items per CTA).
    int sms = 0;
    e = multiprocessors(&sms);
    if (e == cudaSuccess && p.n_items > 0) {
      const int cap = p.max_ctas > 0 ? std::min(p.max_ctas, sms) : sms;
      const unsigned grid = static_cast<unsigned>(std::min(p.n_items, cap));
      kernel<<<grid, L::THREADS, smem, reinterpret_cast<cudaStream_t>(a.stream)>>>(tq, tk, tv, p);
      e = cudaGetLastError();
    }
  }
  if (e != cudaSuccess) {
    snprintf(err, err_len, "sm90 attention launch failed: %s", cudaGetErrorString(e));
    return 1;
  }
  return 0;
}

template <int D, int BN, typename T>
int launch_stages(const FsqArgs& a, const CUtensorMap& tq, const CUtensorMap& tk,
                  const CUtensorMap& tv, const fsq::Params& p, char* err, int err_len) {
  // Shared memory: two stages at D=128 (144 KB), three at D=64 (128 KB, 132 KB with three
  // consumer warpgroups, which D=128's accumulators would not fit in 160 registers).
  if constexpr (D == 64) {
    if (a.nc == 3) return launch<D, BN, 3, 3, T>(a, tq, tk, tv, p, err, err_len);
  }
  if (a.nc != 2) {
    snprintf(err, err_len, "no sm90 kernel with %lld consumer warpgroups at head_dim %d", a.nc, D);
    return 1;
  }
  return launch<D, BN, D == 128 ? 2 : 3, 2, T>(a, tq, tk, tv, p, err, err_len);
}

}  // namespace

extern "C" int fsq_attention_sm90(const FsqArgs* a, char* err, int err_len) {
  CUtensorMap tq, tk, tv;
  const unsigned d = static_cast<unsigned>(a->d), bn = static_cast<unsigned>(a->bn);
  const CUtensorMapSwizzle sw_qk =
      d == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  {
    const unsigned long long dims[3] = {d, (unsigned long long)a->nq_pad,
                                        (unsigned long long)(a->batch * a->hq)};
    const unsigned long long st[2] = {d, (unsigned long long)(a->nq_pad * d)};
    const unsigned box[3] = {d, 64, 1};  // one box per consumer warpgroup
    if (make_map(&tq, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, (void*)a->q, dims, st, box, sw_qk, err,
                 err_len))
      return 1;
  }
  {
    const unsigned long long dims[3] = {d, (unsigned long long)a->nk_pad,
                                        (unsigned long long)(a->batch * a->hkv)};
    const unsigned long long st[2] = {d, (unsigned long long)(a->nk_pad * d)};
    const unsigned box[3] = {d, bn, 1};
    if (make_map(&tk, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, (void*)a->k, dims, st, box, sw_qk, err,
                 err_len))
      return 1;
  }
  {
    const unsigned long long dims[4] = {d, (unsigned long long)a->nk, (unsigned long long)a->hkv,
                                        (unsigned long long)a->batch};
    const unsigned long long st[3] = {(unsigned long long)a->v_sn * 2,
                                      (unsigned long long)a->v_sh * 2,
                                      (unsigned long long)a->v_sb * 2};
    const unsigned box[4] = {64, bn, 1, 1};
    if (make_map(&tv,
                 a->bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                 (void*)a->v, dims, st, box, CU_TENSOR_MAP_SWIZZLE_128B, err, err_len))
      return 1;
  }
  fsq::Params p;
  p.qs = reinterpret_cast<const float*>(a->qs);
  p.ks = reinterpret_cast<const float*>(a->ks);
  p.out = reinterpret_cast<void*>(a->out);
  p.full_num = reinterpret_cast<const int*>(a->full_num);
  p.full_idx = reinterpret_cast<const int*>(a->full_idx);
  p.row_order = reinterpret_cast<const int*>(a->row_order);
  p.part_at = reinterpret_cast<const int2*>(a->part_at);
  p.bits = reinterpret_cast<const unsigned*>(a->bits);
  p.sob = a->o_sb;
  p.soh = a->o_sh;
  p.son = a->o_sn;
  p.snb = a->snb;
  p.snh = a->snh;
  p.sib = a->sib;
  p.sih = a->sih;
  p.siq = a->siq;
  p.hq = int(a->hq);
  p.group = int(a->hq / a->hkv);
  p.hkv = int(a->hkv);
  p.nq = int(a->nq);
  p.nk = int(a->nk);
  p.nqb = int(a->nqb);
  p.nkb = int(a->nkb);
  p.n_dense = int(a->n_dense);
  p.pingpong = int(a->pingpong);
  p.n_tiles = int(a->n_tiles);
  p.n_items = int(a->n_tiles * a->batch * a->hq);
  p.work = reinterpret_cast<int*>(a->work);
  p.max_ctas = int(std::min<long long>(std::max<long long>(a->max_ctas, 0), INT_MAX));
  p.nq_pad = int(a->nq_pad);
  p.qn = reinterpret_cast<const float*>(a->qn);
  p.kn = reinterpret_cast<const float*>(a->kn);

#define FSQ_CASE(D_, BN_, T_)                                             \
  if (d == D_ && bn == BN_ && (a->bf16 != 0) == std::is_same<T_, __nv_bfloat16>::value) \
    return launch_stages<D_, BN_, T_>(*a, tq, tk, tv, p, err, err_len);
  FSQ_CASE(64, 64, __half)
  FSQ_CASE(64, 128, __half)
  FSQ_CASE(128, 64, __half)
  FSQ_CASE(128, 128, __half)
  FSQ_CASE(64, 64, __nv_bfloat16)
  FSQ_CASE(64, 128, __nv_bfloat16)
  FSQ_CASE(128, 64, __nv_bfloat16)
  FSQ_CASE(128, 128, __nv_bfloat16)
#undef FSQ_CASE
  snprintf(err, err_len, "no sm90 kernel for head_dim %u, block_n %u", d, bn);
  return 1;
}
