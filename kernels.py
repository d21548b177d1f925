"""Triton kernels for the decode steps: a few new tokens against weights and a long KV cache, at memory bandwidth.

    decode_attention(q, k, v, lengths, n_splits)  split-KV ("flash decoding") attention of T new tokens per sequence
    small_linear(x, weight, bias, scale)          x @ weight^T for a few rows, bf16/float32 or int8 weights

decode_attention reads each sequence's filled length from the device, so one launch serves every step of a CUDA
graph as the cache grows.
Importing this file needs no Triton; calling a kernel does (it ships with CUDA builds of PyTorch).
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decoding on the CPU needs no Triton, decoding on a GPU does
    triton = None


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, Lengths, Out, Lse, n_kv_heads,
        sqb, sqt, sqh, skb, skh, sks, svb, svh, svs, sob, soh, sos, sor, slb, slh, sls,
        T: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr, SCALE: tl.constexpr,
    ):
        # One program: one sequence, one KV head, one split of the filled slots. Its rows are the T new tokens
        # times the GROUP query heads that share the KV head, so each key and value is read once for all of them.
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = pid // n_kv_heads, pid % n_kv_heads
        rows = tl.arange(0, ROWS)
        t, g = rows // GROUP, rows % GROUP
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + t[:, None] * sqt + (h * GROUP + g)[:, None] * sqh + d[None, :],
                    mask=(rows < T * GROUP)[:, None], other=0.0)
        length = tl.load(Lengths + b)
        n_keys = length + T
        # Splits follow the filled length, not the capacity: every split has work and nothing past it is read.
        chunk = tl.cdiv(tl.cdiv(n_keys, N_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, n_keys)
        visible_end = length + t + 1  # row t sees the cache and the new tokens up to itself
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for s in range(start, end, BLOCK_N):
            slots = s + tl.arange(0, BLOCK_N)
            in_range = (slots < end)[:, None]
            k = tl.load(K + b * skb + h * skh + slots[:, None] * sks + d[None, :], mask=in_range, other=0.0)
            v = tl.load(V + b * svb + h * svh + slots[:, None] * svs + d[None, :], mask=in_range, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
            scores = tl.where(slots[None, :] < visible_end[:, None], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = tl.where(l[:, None] > 0, acc / l[:, None], 0.0)
        tl.store(Out + b * sob + h * soh + split * sos + rows[:, None] * sor + d[None, :], out)
        tl.store(Lse + b * slb + h * slh + split * sls + rows, m + tl.log(l))  # -inf for an empty split


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, n_splits: int):
    """Split-KV ("flash decoding") attention of T new tokens over a static cache.

    q [B, T, Hq, D]; k, v [B, Hkv, S, D] with the new tokens' keys/values already written at slots lengths[b] ..
    lengths[b] + T - 1; -> [B, T, Hq * D]. Token t of sequence b sees slots 0 .. lengths[b] + t (causal).

    The launch shape is fixed (it is captured in CUDA graphs); each program finds its piece of the filled slots
    from `lengths` on the device, so the pieces follow the length as it grows and nothing past it is read.
    """
    if triton is None:
        raise ImportError("decode attention on a GPU needs Triton (it ships with CUDA builds of PyTorch)")
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if D < 16 or D & (D - 1):
        raise NotImplementedError(f"the Triton decode kernel needs a power-of-two head_dim >= 16, got {D}")
    rows = max(16, triton.next_power_of_2(T * group))
    out = torch.empty(B, Hkv, n_splits, rows, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hkv, n_splits, rows, device=q.device, dtype=torch.float32)
    _decode_attention_kernel[(B * Hkv, n_splits)](
        q, k, v, lengths, out, lse, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *out.stride()[:4], *lse.stride()[:3],
        T=T, GROUP=group, ROWS=rows, HEAD_DIM=D, BLOCK_N=64, N_SPLITS=n_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SCALE=1.0 / math.sqrt(D),
        num_warps=4, num_stages=2,
    )
    weights = torch.softmax(lse, dim=2)  # merge the splits by their log-sum-exp
    merged = (weights[..., None] * out).sum(2)[:, :, : T * group]  # [B, Hkv, T * group, D]
    return merged.view(B, Hkv, T, group, D).transpose(1, 2).reshape(B, T, Hq * D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _small_linear_kernel(X, W, Scale, Bias, Y, M, N, K, sxm, swn, sym, INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr):
        # y[M, N] = x[M, K] @ w[N, K]^T for the few rows of a decode step: each program streams BLOCK_N rows of the
        # weight once. INT8: w is int8, with one scale per row applied to the sums.
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
            w = tl.load(W + rn[:, None] * swn + rk[None, :], mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
        if INT8:
            acc *= tl.load(Scale + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def small_linear(x, weight, bias=None, scale=None) -> torch.Tensor:
    """x [..., K] @ weight^T (+ bias) for a decode step's few rows, streaming the weight once (Triton, GPU).

    weight [N, K] in x's dtype, or int8 with `scale` [N].
    """
    if triton is None:
        raise ImportError("small_linear on a GPU needs Triton (it ships with CUDA builds of PyTorch)")
    flat = x.reshape(-1, x.shape[-1])
    (M, K), N = flat.shape, weight.shape[0]
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m = max(16, triton.next_power_of_2(M))  # tensor cores, the rows padded: faster than a register loop
    block_n = 64 if N >= 16384 else 32  # the large matrices get fewer, longer programs
    int8 = scale is not None
    _small_linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
        flat, weight, scale if int8 else weight, bias if bias is not None else weight, y, M, N, K,
        flat.stride(0), weight.stride(0), y.stride(0), INT8=int8, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=256 if K % 256 == 0 else 128,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4, num_stages=4 if int8 else 5,
    )
    return y.view(*x.shape[:-1], N)


def small_rows(x: torch.Tensor) -> bool:
    """A decode step's few rows on a GPU: the case of the Triton kernel above."""
    return x.is_cuda and x.numel() <= 16 * x.shape[-1]
