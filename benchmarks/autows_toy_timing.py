# ruff: noqa
"""Experiment of 2026-11-25 (night), issue 14; removed in the next commit (BENCHMARKS.md).
"""
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def sub(q, kk, v, m_i, l_i, acc):
    s = tl.dot(q, kk).to(tl.float32) * 0.01
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(tl.bfloat16), v, acc)
    return m_new, l_i, acc

@triton.jit
def k(Q, K, V, Out, N, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr, SPLIT: tl.constexpr, DAMB: tl.constexpr):
    pid = tl.program_id(0)
    hb = tl.program_id(1) * N
    H: tl.constexpr = BM // 2 if SPLIT else BM
    dq = tl.make_tensor_descriptor(Q, [N * 64, D], [D, 1], [H, D])
    dk = tl.make_tensor_descriptor(K, [N * 64, D], [D, 1], [BN, D])
    dv = tl.make_tensor_descriptor(V, [N * 64, D], [D, 1], [BN, D])
    q0 = dq.load([hb + pid * BM, 0])
    m0 = tl.full([H], float("-inf"), tl.float32)
    l0 = tl.zeros([H], tl.float32)
    a0 = tl.zeros([H, D], tl.float32)
    if SPLIT:
        q1 = dq.load([hb + pid * BM + H, 0])
        m1 = tl.full([H], float("-inf"), tl.float32)
        l1 = tl.zeros([H], tl.float32)
        a1 = tl.zeros([H, D], tl.float32)
    for start in tl.range(0, N, BN, warp_specialize=WS, disallow_acc_multi_buffer=DAMB):
        kk = dk.load([hb + start, 0]).T
        v = dv.load([hb + start, 0])
        m0, l0, a0 = sub(q0, kk, v, m0, l0, a0)
        if SPLIT:
            m1, l1, a1 = sub(q1, kk, v, m1, l1, a1)
    offs = tl.arange(0, D)
    r0 = hb + pid * BM + tl.arange(0, H)
    tl.store(Out + r0[:, None] * D + offs[None, :], (a0 / l0[:, None]).to(tl.bfloat16))
    if SPLIT:
        tl.store(Out + (r0 + H)[:, None] * D + offs[None, :], (a1 / l1[:, None]).to(tl.bfloat16))

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
N, D, HEADS = 16384, int(sys.argv[1]) if len(sys.argv) > 1 else 128, 48
q = torch.randint(-20, 20, (HEADS * N, D), dtype=torch.int8, device="cuda")
kk = torch.randint(-20, 20, (HEADS * N, D), dtype=torch.int8, device="cuda")
v = torch.randn(HEADS * N, D, dtype=torch.bfloat16, device="cuda")
ref = None
ops = 4.0 * HEADS * N * N * D
CFGS = [
    ("plain 128 w4", 128, 64, False, False, False, 4, 3),
    ("plain 256 w8", 256, 64, False, False, False, 8, 3),
    ("ws 128 single", 128, 64, True, False, False, 4, 3),
    ("ws 128 single damb", 128, 64, True, False, True, 4, 3),
    ("ws 256 split damb", 256, 64, True, True, True, 4, 3),
    ("ws 256 split", 256, 64, True, True, False, 4, 3),
    ("ws 256 split s2", 256, 64, True, True, True, 4, 2),
    ("ws 128 split damb", 128, 64, True, True, True, 4, 3),
]
sel = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else range(len(CFGS))
for name, bm, bn, ws, split, damb, nw, ns in [CFGS[i] for i in sel]:
    o = torch.zeros(HEADS * N, D, dtype=torch.bfloat16, device="cuda")
    f = lambda: k[(N // bm, HEADS)](q, kk, v, o, N, D=D, BM=bm, BN=bn, WS=ws, SPLIT=split, DAMB=damb, num_warps=nw, num_stages=ns)
    try:
        f(); torch.cuda.synchronize()
    except Exception as e:
        print(f"{name:22s} FAIL {str(e)[:100]}", flush=True); continue
    if ref is None:
        import os
        if os.path.exists(f"/tmp/ref{D}.pt"):
            ref = torch.load(f"/tmp/ref{D}.pt")
        else:
            ref = o.float().clone(); torch.save(ref, f"/tmp/ref{D}.pt")
    err = ((o.float() - ref).norm() / ref.norm()).item()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    for _ in range(3): f()
    st.record()
    for _ in range(10): f()
    en.record(); torch.cuda.synchronize()
    ms = st.elapsed_time(en) / 10
    print(f"{name:22s} err {err:.2e} {ms:7.3f} ms {ops / ms / 1e9:6.0f} TOPS", flush=True)
