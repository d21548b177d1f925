"""Triton kernels for the decode steps: a few new tokens against the weights and a long KV cache, at bandwidth.

A decoder layer's step on a GPU is six launches:
    q = qkv_rotary(x, ...)                       the q/k/v product, rotary embedding; new keys/values into the cache
    a = decode_attention(q, cache)               split-KV attention over fixed pieces of the cache, then one merge
    x = linear(a, o_proj, residual=x, then_norm) the output projection plus the residual
    h = gated_linear(x, gate_up)                 gate and up, SiLU(gate) * up
    x = linear(h, down, residual=x, then_norm)   the down projection plus the residual
and the head is `linear(x, lm_head)`. The RMSNorms have no launches of their own: a product that writes the residual
stream also writes it times the next norm's weight and its sums of squares (`PendingNorm`), and the product that
reads it scales its sums by 1 / rms. Weights come as bfloat16/float32, int8 or int4 (`Weights`); int4 products run
on the tensor cores with the weights straight from registers (inline PTX) and are neither batch-invariant nor
deterministic (a split product adds its pieces with atomics), which they need not be: only drafts run int4, and the
dense model checks every token a draft proposes.

Batch invariance (16 and 8 bits): a row's arithmetic never depends on the other rows of the call. Rows go through
in tiles of ROW_TILE whatever their number, every reduction runs in a fixed order over blocks that depend only on the
shapes of the weights, and attention cuts the cache at fixed absolute slots (every SPLIT slots, whatever the
length). So a verify pass over gamma + 1 tokens computes each token's logits and keys/values bit for bit as one-token
dense steps would, and speculative decoding in bfloat16 emits exactly the tokens of bfloat16 dense decoding.

On Hopper and later each kernel is a programmatic dependent launch: it is placed on the GPU while the kernel before
it finishes, and waits for that kernel to end before it touches memory, so that the fixed start-up of a short kernel
overlaps the tail of the last. Each launch is a custom op (torch.library), so that torch.compile calls it as it is,
launch settings and all, and compiles the layer around it.

Importing this file needs no Triton; calling a kernel does (it ships with CUDA builds of PyTorch, and runs on the CPU
under TRITON_INTERPRET=1, which the tests use).
"""
import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decoding on the CPU needs no Triton, decoding on a GPU does
    triton = None

ROW_TILE = 16  # rows per program: the smallest tensor-core tile, and the same for every call (batch invariance)
SPLIT = 1024  # cache slots per attention program, at fixed absolute positions (batch invariance)
DRAFT_SPLIT = 128  # the same for a draft's small cache, which needs no batch invariance: more, shorter programs
ATTENTION_ROWS = 64  # (token, query head) rows per attention program: a verify pass of 7B's 7-head groups is one tile
ATTENTION_LAUNCH = dict(BLOCK_N=64, num_warps=4, num_stages=3)  # keys a loop step; tuned on an H200
MERGE_BLOCK = 64  # attention splits the merge combines at once


class Weights(NamedTuple):
    """A linear layer's weight as the kernels read it: y = x @ w^T (+ bias).
    bits 16: `data` [N, K] in the activations' dtype.  bits 8: int8 [N, K], w = data * scale[n].
    bits 4: `data` [N / 16, K / group, 32, group / 16] int32, eight 4-bit q a word in the tensor cores' operand
    layout (quant._pack); `scale` [K / group, N] int32, a bfloat16 scale in the low half and a zero in the high;
    w = (q - 8) * scale + zero; for split K, `counters` [INT4_PROGRAMS] and `sums` [split_sums(N)] int32 zeros
    (the sums read as float32), as every launch leaves them."""
    data: torch.Tensor
    bias: torch.Tensor | None = None
    bits: int = 16
    scale: torch.Tensor | None = None
    counters: torch.Tensor | None = None
    sums: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.data.shape[0] * 16 if self.bits == 4 else self.data.shape[0]


class PendingNorm(NamedTuple):
    """x on its way into an RMSNorm and the product after it, which finishes the norm.

    RMSNorm(x) @ w^T = (x * weight) @ w^T / rms(x): the product reads `scaled` as it is (an operand changed in
    registers costs a trip through shared memory every step, see `_product`) and multiplies its sums by 1 / rms(x),
    the squares added in a fixed order (batch-invariant)."""
    x: torch.Tensor  # [..., K] the residual stream itself
    scaled: torch.Tensor  # [..., K] x * the norm's weight, rounded to x's dtype
    squares: torch.Tensor  # [M, P] float32: sums of x^2 over P pieces of each of the M rows
    eps: float


def readable(linear) -> bool:
    """Whether the kernels read this layer: an nn.Linear, or a module with its own `decode_weights()` (quant.py)."""
    return isinstance(linear, torch.nn.Linear) or hasattr(linear, "decode_weights")


def weights_of(linear) -> Weights:
    own = getattr(linear, "decode_weights", None)
    return own() if own is not None else Weights(linear.weight, linear.bias)


def needs_triton(x: torch.Tensor) -> None:
    if triton is None:
        raise ImportError("decoding on a GPU needs Triton (it ships with CUDA builds of PyTorch)")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"the decode kernels take bfloat16, float16 or float32 activations, got {x.dtype}")


# ---------------------------------------------------------------------------------------------- int4 arithmetic


INT4_PROGRAMS = 512  # K is split until an int4 product has about this many programs: a small matrix needs them
INT4_ROWS = 8  # rows a program: the n of the tensor cores' m16n8k16 product, whatever the call's rows
INT4_COLUMNS = 64  # output columns a program, 16 a warp
# A split int4 product's registers a thread: left to itself, ptxas gives it fewer and holds its loads back
# (BENCHMARKS.md, section 8).
INT4_SPLIT_REGISTERS = 128


if triton is not None:

    @triton.jit
    def _load_b32x4(at):
        # Four 32-bit registers from 16 bytes at `at`: int4 words, or eight bfloat16 inputs as bf16x2 pairs. float32
        # inputs are 32 bytes, rounded to bfloat16 pairwise.
        if at.dtype.element_ty == tl.float32:
            return tl.inline_asm_elementwise(
                """{
                .reg .f32 a0, a1, a2, a3, a4, a5, a6, a7;
                ld.global.nc.v4.f32 {a0, a1, a2, a3}, [$4];
                ld.global.nc.v4.f32 {a4, a5, a6, a7}, [$4 + 16];
                cvt.rn.bf16x2.f32 $0, a1, a0;
                cvt.rn.bf16x2.f32 $1, a3, a2;
                cvt.rn.bf16x2.f32 $2, a5, a4;
                cvt.rn.bf16x2.f32 $3, a7, a6;
                }""", "=r,=r,=r,=r,l", [at], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [at],
                                         dtype=(tl.int32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _int4_group_words(at, lane, WORDS: tl.constexpr, PTX: tl.constexpr):
        # A thread's WORDS words of one group, in 16-byte loads (one 8-byte load for groups of 32); eight returned, the
        # ones past WORDS repeats. The interpreter's twin reads the words where they lie: for it, the address of the
        # group's words of the tile, so that it goes through the same turns as the words.
        # (One return: Triton 3.6 compares the types of every return, even one in a branch not compiled.)
        if not PTX:
            w0 = at - lane * WORDS
            w1, w2, w3, w4, w5, w6, w7 = w0, w0, w0, w0, w0, w0, w0
        else:
            if WORDS == 2:
                w0, w1 = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [at],
                                                   dtype=(tl.int32,) * 2, is_pure=True, pack=1)
                w2, w3 = w0, w1
            else:
                w0, w1, w2, w3 = _load_b32x4(at)
            if WORDS == 8:
                w4, w5, w6, w7 = _load_b32x4(at + 4)
            else:
                w4, w5, w6, w7 = w0, w1, w2, w3
        return w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _int4_mma(w0, w1, x0, x1, x2, x3, c0, c1, c2, c3, s0, s1):
        # A thread's part of two m16n8k16 products on the tensor cores, a 32-input slice (quant._pack): each word's
        # pairs of q, masked and OR-ed into the mantissas of 128.0, are the bf16x2 operands (128 + q, 128 + q') with
        # one instruction, and the tensor cores add the products (128 + q) * x, each exact, in float32 into c. A tile
        # of ones times the same inputs adds their sums into s, for the zero point (_int4_product).
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 a0, a1, a2, a3, b, mask, magic, one, d0, d1;
            mov.b32 mask, 0x000f000f;
            mov.b32 magic, 0x43004300;
            mov.b32 one, 0x3f803f80;
            lop3.b32 a0, $12, mask, magic, 0xea;
            shr.u32 b, $12, 4;
            lop3.b32 a1, b, mask, magic, 0xea;
            shr.u32 b, $12, 8;
            lop3.b32 a2, b, mask, magic, 0xea;
            shr.u32 b, $12, 12;
            lop3.b32 a3, b, mask, magic, 0xea;
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
                {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$14, $15}, {$6, $7, $8, $9};
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
                {$4, $5, d0, d1}, {one, one, one, one}, {$14, $15}, {$10, $11, $10, $11};
            lop3.b32 a0, $13, mask, magic, 0xea;
            shr.u32 b, $13, 4;
            lop3.b32 a1, b, mask, magic, 0xea;
            shr.u32 b, $13, 8;
            lop3.b32 a2, b, mask, magic, 0xea;
            shr.u32 b, $13, 12;
            lop3.b32 a3, b, mask, magic, 0xea;
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
                {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$16, $17}, {$0, $1, $2, $3};
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
                {$4, $5, d0, d1}, {one, one, one, one}, {$16, $17}, {$4, $5, d0, d1};
            }""", "=f,=f,=f,=f,=f,=f,f,f,f,f,f,f,r,r,r,r,r,r", [c0, c1, c2, c3, s0, s1, w0, w1, x0, x1, x2, x3],
            dtype=(tl.float32,) * 6, is_pure=True, pack=1)

    @triton.jit
    def _round_bf16(v):
        # float32 to the nearest bfloat16 (ties to even), kept in float32: what the kernel's conversions give.
        bits = v.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_mma_plain(tile_words, part, x0_at, x1_at, g, WORDS: tl.constexpr, c0, c1, c2, c3, s0, s1):
        # What _int4_mma computes in thread (g, t), in plain Triton for its interpreter (which runs no PTX): the sums
        # over the group's 32-input slice `part` for its columns g and g + 8 and its rows 2t and 2t + 1 (x0_at,
        # x1_at at the slice), each q read from the thread that holds it. tile_words: the group's words of the tile.
        k = tl.arange(0, 32)[None, :]  # the slice's input 8 t' + 4 s + 2 r + h
        word = tl.load(tile_words[:, None] + (4 * g[:, None] + k // 8) * WORDS + 2 * part + (k // 4) % 2)
        shift = 8 * ((k // 2) % 2) + 16 * (k % 2)
        lo = (128 + ((word >> shift) & 15)).to(tl.float32)  # columns g
        hi = (128 + ((word >> (shift + 4)) & 15)).to(tl.float32)  # columns g + 8
        x0 = _round_bf16(tl.load(x0_at[:, None] + k).to(tl.float32))
        x1 = _round_bf16(tl.load(x1_at[:, None] + k).to(tl.float32))
        return (c0 + tl.sum(lo * x0, 1), c1 + tl.sum(lo * x1, 1), c2 + tl.sum(hi * x0, 1), c3 + tl.sum(hi * x1, 1),
                s0 + tl.sum(x0, 1), s1 + tl.sum(x1, 1))

    @triton.jit
    def _int4_group_sums(w0, w1, w2, w3, w4, w5, w6, w7, x_at, WORDS: tl.constexpr):
        # A group's (128 + q) . x and sum(x) for a thread: WORDS / 2 slices of 32 inputs.
        c0 = tl.zeros(w0.shape, tl.float32)
        c1, c2, c3, s0, s1 = c0, c0, c0, c0, c0
        x0, x1, x2, x3 = _load_b32x4(x_at)
        c0, c1, c2, c3, s0, s1 = _int4_mma(w0, w1, x0, x1, x2, x3, c0, c1, c2, c3, s0, s1)
        if WORDS >= 4:
            x0, x1, x2, x3 = _load_b32x4(x_at + 32)
            c0, c1, c2, c3, s0, s1 = _int4_mma(w2, w3, x0, x1, x2, x3, c0, c1, c2, c3, s0, s1)
        if WORDS == 8:
            x0, x1, x2, x3 = _load_b32x4(x_at + 64)
            c0, c1, c2, c3, s0, s1 = _int4_mma(w4, w5, x0, x1, x2, x3, c0, c1, c2, c3, s0, s1)
            x0, x1, x2, x3 = _load_b32x4(x_at + 96)
            c0, c1, c2, c3, s0, s1 = _int4_mma(w6, w7, x0, x1, x2, x3, c0, c1, c2, c3, s0, s1)
        return c0, c1, c2, c3, s0, s1

    @triton.jit
    def _int4_group_sums_plain(tile_words, x0_at, x1_at, g, WORDS: tl.constexpr):
        # The same, in plain Triton for its interpreter.
        c0 = tl.zeros(g.shape, tl.float32)
        c1, c2, c3, s0, s1 = c0, c0, c0, c0, c0
        for part in tl.static_range(WORDS // 2):
            c0, c1, c2, c3, s0, s1 = _int4_mma_plain(tile_words, part, x0_at + 32 * part, x1_at + 32 * part, g,
                                                     WORDS, c0, c1, c2, c3, s0, s1)
        return c0, c1, c2, c3, s0, s1

    @triton.jit
    def _int4_scales(pair, pair8):
        # [scale, zero] of columns g and g + 8 -> their scales, and zeros less 136 scales (for 128 + q - 8).
        scale, scale8 = (pair << 16).to(tl.float32, bitcast=True), (pair8 << 16).to(tl.float32, bitcast=True)
        return (scale, (pair & -65536).to(tl.float32, bitcast=True) - 136 * scale,
                scale8, (pair8 & -65536).to(tl.float32, bitcast=True) - 136 * scale8)

    @triton.jit
    def _int4_add_group(acc0, acc1, acc2, acc3, sums, scales):
        c0, c1, c2, c3, s0, s1 = sums
        scale, zero, scale8, zero8 = scales
        return (acc0 + scale * c0 + zero * s0, acc1 + scale * c1 + zero * s1, acc2 + scale8 * c2 + zero8 * s0,
                acc3 + scale8 * c3 + zero8 * s1)

    @triton.jit
    def _int4_product(X, sxm, pid_m, M, W, SZ, first, second, N_W, K, groups_each, InSquares, sisq, P, eps,
                      NORM_IN: tl.constexpr, P_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr):
        """float32 [ROWS, BLOCK_N]: rows pid_m * ROWS ... of x times the int4 weight's (N_W columns)
        columns first + j % (BLOCK_N / 2) + (j // (BLOCK_N / 2)) * second, j < BLOCK_N, over this program's piece of
        K (groups_each groups from program_id(2)), on the tensor cores. NORM_IN as in _product. PDL: the dependent
        launch's wait is here, after the first two groups' weights and scales are asked for: no kernel of a decode
        step writes them, so they come in while the kernel before finishes.

        A warp takes 16 of the columns, a thread its share of their words (quant._pack). For a group with scale s
        and zero z, x . ((q - 8) s + z) = s (x . (128 + q)) + (z - 136 s) sum(x): the tensor cores add the first
        dot product and the inputs' sum, and the scales come once a group, in float32."""
        tl.static_assert(ROWS == 8)  # the n of the m16n8k16 product
        tl.static_assert(BLOCK_N % 16 == 0)  # and its m; launched with BLOCK_N / 16 warps (_blocks, qkv_rotary)
        WARPS: tl.constexpr = BLOCK_N // 16
        WORDS: tl.constexpr = GROUP // 16  # a thread's words of a group
        HALF: tl.constexpr = BLOCK_N // 2
        i = tl.arange(0, 32 * WARPS)  # one element a thread: lane i % 32 of warp i // 32
        lane = i % 32
        g, t = lane // 4, lane % 4
        j = (i // 32) * 16  # the warp's first column in the block
        tile = tl.minimum(first + j % HALF + (j // HALF) * second, N_W - 16) // 16  # past the end: masked after
        groups = K // GROUP
        group0 = tl.program_id(2) * groups_each
        end = tl.minimum(group0 + groups_each, groups)
        words_at = W + (tile * groups * 32 + lane) * WORDS  # a group's: + group * 32 * WORDS
        pairs_at = SZ + tile * 16 + g  # [scale, zero] of column g, a group's: + group * N_W; of column g + 8: + 8
        row0 = pid_m * ROWS
        if PTX:  # a thread's inputs are the product's operand b: row g, 8 t + ... of each slice
            x_at = X + tl.minimum(row0 + g, M - 1) * sxm + 8 * t
        else:
            x0_at = X + tl.minimum(row0 + 2 * t, M - 1) * sxm
            x1_at = X + tl.minimum(row0 + 2 * t + 1, M - 1) * sxm
        # Two groups' words and scales in flight while one is used; the loop takes them in turns, each reloaded
        # as soon as it is used, so that no loaded value is moved (a move would wait on its load).
        wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7 = _int4_group_words(words_at + group0 * 32 * WORDS, lane, WORDS, PTX)
        wb0, wb1, wb2, wb3, wb4, wb5, wb6, wb7 = wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7
        pair_a = tl.load(pairs_at + group0 * N_W)  # [scale, zero] of column g; pair_a8: of column g + 8
        pair_a8 = tl.load(pairs_at + group0 * N_W + 8)
        pair_b, pair_b8 = pair_a, pair_a8
        if group0 + 1 < end:
            wb0, wb1, wb2, wb3, wb4, wb5, wb6, wb7 = _int4_group_words(words_at + (group0 + 1) * 32 * WORDS, lane,
                                                                       WORDS, PTX)
            pair_b = tl.load(pairs_at + (group0 + 1) * N_W)
            pair_b8 = tl.load(pairs_at + (group0 + 1) * N_W + 8)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc0 = tl.zeros([32 * WARPS], tl.float32)  # (row 2t, column g), (2t + 1, g), (2t, g + 8), (2t + 1, g + 8)
        acc1 = tl.zeros([32 * WARPS], tl.float32)
        acc2 = tl.zeros([32 * WARPS], tl.float32)
        acc3 = tl.zeros([32 * WARPS], tl.float32)
        for group in range(group0, end, 2):
            scales = _int4_scales(pair_a, pair_a8)
            if PTX:
                sums = _int4_group_sums(wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, x_at + group * GROUP, WORDS)
            else:
                sums = _int4_group_sums_plain(wa0, x0_at + group * GROUP, x1_at + group * GROUP, g, WORDS)
            if group + 2 < end:
                wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7 = _int4_group_words(words_at + (group + 2) * 32 * WORDS, lane,
                                                                           WORDS, PTX)
                pair_a = tl.load(pairs_at + (group + 2) * N_W)
                pair_a8 = tl.load(pairs_at + (group + 2) * N_W + 8)
            acc0, acc1, acc2, acc3 = _int4_add_group(acc0, acc1, acc2, acc3, sums, scales)
            if group + 1 < end:
                scales = _int4_scales(pair_b, pair_b8)
                if PTX:
                    sums = _int4_group_sums(wb0, wb1, wb2, wb3, wb4, wb5, wb6, wb7, x_at + (group + 1) * GROUP, WORDS)
                else:
                    sums = _int4_group_sums_plain(wb0, x0_at + (group + 1) * GROUP, x1_at + (group + 1) * GROUP, g,
                                                  WORDS)
                if group + 3 < end:
                    wb0, wb1, wb2, wb3, wb4, wb5, wb6, wb7 = _int4_group_words(words_at + (group + 3) * 32 * WORDS,
                                                                               lane, WORDS, PTX)
                    pair_b = tl.load(pairs_at + (group + 3) * N_W)
                    pair_b8 = tl.load(pairs_at + (group + 3) * N_W + 8)
                acc0, acc1, acc2, acc3 = _int4_add_group(acc0, acc1, acc2, acc3, sums, scales)
        # The threads' sums as [row, column]: thread (g, t) of warp w holds rows 2t + p, columns 16 w + 8 h + g.
        acc = tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3))  # [thread, h, p]
        acc = tl.reshape(tl.permute(tl.reshape(acc, (WARPS, 8, 4, 2, 2)), (2, 4, 0, 3, 1)), (ROWS, BLOCK_N))
        if NORM_IN:
            rows = row0 + tl.arange(0, ROWS)
            acc *= _inverse_rms(InSquares, sisq, rows, rows < M, P, K, eps, P_BLOCK)[:, None]
        return acc

    @triton.jit
    def _interleaved(acc, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        # [ROWS, BLOCK_N] as (a0 .. a(n-1), b0 .. b(n-1)) -> (a0, b0, a1, b1, ...): a warp of the int4 product takes
        # 16 neighbouring columns of the weight (a tile of its layout), so its block comes as gate columns then up
        # columns (first halves then second halves of rotary pairs); the epilogues take pairs.
        return tl.reshape(tl.permute(tl.reshape(acc, (ROWS, 2, BLOCK_N // 2)), (0, 2, 1)), (ROWS, BLOCK_N))

    @triton.jit
    def _split_sum(acc, Sums, Counters, splits, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """K split over program_id(2): each piece of a tile adds its sums into the tile's float32 sums (atomics, so
        in the order the pieces arrive: int4 drafts need not be deterministic), and the last program of the tile to
        arrive reads them back and leaves zeros. -> (the sum, True) in that program, (zeros, False) in the others, the
        flag a row vector."""
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        at = (Sums.to(tl.pointer_type(tl.float32)) + tile * ROWS * BLOCK_N + tl.arange(0, ROWS)[:, None] * BLOCK_N
              + tl.arange(0, BLOCK_N)[None, :])
        tl.atomic_add(at, acc, sem="relaxed")
        tl.debug_barrier()  # every thread's sums are added before the count says so
        arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
        last = (tl.zeros([ROWS], tl.int32) + arrived) == splits - 1  # a vector: Triton's interpreter needs one
        total = tl.load(at, mask=last[:, None], other=0.0, cache_modifier=".cg")
        tl.store(at, tl.zeros([ROWS, BLOCK_N], tl.float32), mask=last[:, None])  # ready for the next launch
        tl.store(Counters + tile, 0, mask=arrived == splits - 1)
        return total, last


# ---------------------------------------------------------------------------------------------- matrix-vector


if triton is not None:
    TILE = tl.constexpr(ROW_TILE)

    @triton.jit
    def _pending_norm_kernel(X, sxm, Weight, Scaled, ssm, Squares, ssq, K: tl.constexpr, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        # One program a row, the whole row at once: x * weight and the sum of x^2 (one piece).
        if PDL:  # nothing touches memory before the wait (_dependent_launch); a short kernel lets the next in at once
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        k = tl.arange(0, BLOCK)
        x = tl.load(X + row * sxm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(Squares + row * ssq, tl.sum(x * x, 0))
        weight = tl.load(Weight + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(Scaled + row * ssm + k, (x * weight).to(Scaled.dtype.element_ty), mask=k < K)

    @triton.jit
    def _write_pending_norm(y, rows, row_ok, cols, col_ok, piece, NormWeight, Scaled, ssm, Squares, ssq):
        # y [TILE, BLOCK_N]: the rounded output, in float32. Its columns are piece `piece` of each row's squares.
        # (The norm's weight loaded before the product measured slower with int8 weights.)
        tl.store(Squares + rows * ssq + piece, tl.sum(tl.where(col_ok[None, :], y * y, 0.0), 1), mask=row_ok)
        weight = tl.load(NormWeight + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(Scaled + rows[:, None] * ssm + cols[None, :], (y * weight[None, :]).to(Scaled.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _product(X, sxm, rows, row_ok, W, swn, Scale, cols, col_ok, K, InSquares, sisq, P, eps, BITS: tl.constexpr,
                 NORM_IN: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
        """float32 [TILE, BLOCK_N]: x[rows] times the weight rows `cols`, summed over K in order, BLOCK_K at a time.
        NORM_IN: x is a PendingNorm's `scaled`, and the sums are multiplied by 1 / rms(x).

        Both operands go into the tensor-core product exactly as loaded: an operand changed in registers (an RMSNorm
        applied to x, int4 values dequantized) costs a trip through shared memory every step, which measured slower
        than a separate norm kernel (BENCHMARKS.md). Hence PendingNorm; int4 has its own product, which gives the
        tensor cores its dequantized operand from registers (_int4_product)."""
        acc = tl.zeros([TILE, BLOCK_N], tl.float32)
        k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + rows[:, None] * sxm + (k0 + k)[None, :], mask=row_ok[:, None], other=0.0)
            w = tl.load(W + cols[:, None] * swn + (k0 + k)[None, :], mask=col_ok[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        if BITS == 8:
            acc *= tl.load(Scale + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if NORM_IN:
            acc *= _inverse_rms(InSquares, sisq, rows, row_ok, P, K, eps, P_BLOCK)[:, None]
        return acc

    @triton.jit
    def _inverse_rms(InSquares, sisq, rows, row_ok, P, K, eps, P_BLOCK: tl.constexpr):
        # The P pieces of the squares, added by one reduction tree. Read after the product's loop, not before it or
        # a piece a step alongside x: both measured slower (registers held through the loop; instructions in it).
        p = tl.arange(0, P_BLOCK)
        squares = tl.load(InSquares + rows[:, None] * sisq + p[None, :], mask=row_ok[:, None] & (p < P)[None, :],
                          other=0.0)
        return tl.rsqrt(tl.sum(squares, 1) / K + eps)

    @triton.jit
    def _linear_kernel(X, sxm, W, swn, Scale, Bias, Res, srm, Y, sym, M, N, K, InSquares, sisq, P, eps, NormWeight,
                       Scaled, sscm, OutSquares, sosq, Sums, Counters, groups_each, splits, BITS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, NORM_IN: tl.constexpr,
                       NORM_OUT: tl.constexpr, P_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, PTX: tl.constexpr,
                       PDL: tl.constexpr):
        # Row tiles are the fastest program index: the tiles that share a block of the weight run together, so it
        # comes from memory once and from the L2 cache after. int4: program_id(2) is the piece of K.
        if PDL and BITS != 4:  # nothing touches memory before the wait (_dependent_launch); int4: _int4_product
            tl.extra.cuda.gdc_wait()
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        j = tl.arange(0, BLOCK_N)
        if GATED:  # gate column c and up column N + c side by side: SiLU(gate) * up is one output column
            out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            cols = pid_n * (BLOCK_N // 2) + j // 2 + (j % 2) * N
            col_ok = (pid_n * (BLOCK_N // 2) + j // 2) < N
        else:
            out_cols = pid_n * BLOCK_N + j
            cols = out_cols
            col_ok = cols < N
        res_at = Res + rows[:, None] * srm + out_cols[None, :]
        res_ok = row_ok[:, None] & (out_cols < N)[None, :]
        if RESIDUAL and BITS != 4:  # loaded before the product, so that the epilogue does not wait on it
            res = tl.load(res_at, mask=res_ok, other=0.0)
        if BITS == 4:
            if GATED:  # the block's gate columns, then its up columns; paired after
                acc = _int4_product(X, sxm, pid_m, M, W, Scale, pid_n * (BLOCK_N // 2), N, 2 * N, K, groups_each,
                                    InSquares, sisq, P, eps, NORM_IN, P_BLOCK, ROWS, BLOCK_N, BLOCK_K, PTX, PDL)
                acc = _interleaved(acc, ROWS, BLOCK_N)
            else:
                acc = _int4_product(X, sxm, pid_m, M, W, Scale, pid_n * BLOCK_N, BLOCK_N // 2, N, K, groups_each,
                                    InSquares, sisq, P, eps, NORM_IN, P_BLOCK, ROWS, BLOCK_N, BLOCK_K, PTX, PDL)
            if RESIDUAL:  # an earlier kernel writes it: after the product, which holds the wait
                res = tl.load(res_at, mask=res_ok, other=0.0)
            if SPLIT:  # only the last program of a tile goes on, with the whole sum
                acc, last = _split_sum(acc, Sums, Counters, splits, ROWS, BLOCK_N)
                row_ok = row_ok & last
        else:
            acc = _product(X, sxm, rows, row_ok, W, swn, Scale, cols, col_ok, K, InSquares, sisq, P, eps, BITS,
                           NORM_IN, P_BLOCK, BLOCK_N, BLOCK_K, PRECISION)
        if PDL:  # the next kernel in once the main loop is done: at the start, it measured slower
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(Y.dtype.element_ty)  # rounded as the unfused layer rounds its product
        if GATED:
            gate, up = tl.split(tl.reshape(y, (ROWS, BLOCK_N // 2, 2)))
            gate = gate.to(tl.float32)
            y = (gate * tl.sigmoid(gate)).to(Y.dtype.element_ty).to(tl.float32) * up.to(tl.float32)
        if RESIDUAL:
            y = res.to(tl.float32) + y.to(tl.float32)
        y = y.to(Y.dtype.element_ty)
        tl.store(Y + rows[:, None] * sym + out_cols[None, :], y, mask=row_ok[:, None] & (out_cols < N)[None, :])
        if NORM_OUT:
            _write_pending_norm(y.to(tl.float32), rows, row_ok, out_cols, out_cols < N, pid_n, NormWeight, Scaled,
                                sscm, OutSquares, sosq)

    @triton.jit
    def _qkv_rotary_kernel(X, sxm, W, swn, Scale, Bias, Pos, InvFreq, Q, sqm, T,
                           K1, V1, L1, sk1b, sk1h, sk1s, sv1b, sv1h, sv1s,
                           K2, V2, L2, sk2b, sk2h, sk2s, sv2b, sv2h, sv2s, M, N, K, InSquares, sisq, P, eps,
                           Sums, Counters, groups_each, splits, N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, MIRROR: tl.constexpr,
                           P_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT: tl.constexpr, PRECISION: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr):
        # A program holds BLOCK_N / 2 rotary pairs (i, i + HEAD_DIM / 2) of one head, so it can turn them itself.
        if PDL and BITS != 4:  # nothing touches memory before the wait (_dependent_launch); int4: _int4_product
            tl.extra.cuda.gdc_wait()
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        PAIRS: tl.constexpr = BLOCK_N // 2
        PER_HEAD: tl.constexpr = HEAD_DIM // BLOCK_N
        head = pid_n // PER_HEAD
        i = (pid_n % PER_HEAD) * PAIRS + tl.arange(0, PAIRS)  # frequency index, 0 .. HEAD_DIM / 2
        j = tl.arange(0, BLOCK_N)
        cols = head * HEAD_DIM + (pid_n % PER_HEAD) * PAIRS + j // 2 + (j % 2) * (HEAD_DIM // 2)
        rows = pid_m * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        b, t = rows // T, rows % T
        # The epilogue's operands first, so that it does not wait on them; int4: after the product, which holds the
        # wait (the bias, a weight, before it). Generated tokens are text: one position on every M-RoPE axis, so
        # every frequency turns with it.
        if BITS != 4:
            cos, sin, slot1, slot2 = _rotary_operands(Pos, InvFreq, L1, L2, rows, row_ok, b, t, i)
        if HAS_BIAS:
            bias = tl.load(Bias + cols).to(tl.float32)
        if BITS == 4:  # the block's first halves, then its second halves; paired after
            acc = _int4_product(X, sxm, pid_m, M, W, Scale, head * HEAD_DIM + (pid_n % PER_HEAD) * PAIRS,
                                HEAD_DIM // 2, N, K, groups_each, InSquares, sisq, P, eps, True, P_BLOCK, ROWS,
                                BLOCK_N, BLOCK_K, PTX, PDL)
            acc = _interleaved(acc, ROWS, BLOCK_N)
            cos, sin, slot1, slot2 = _rotary_operands(Pos, InvFreq, L1, L2, rows, row_ok, b, t, i)
            if SPLIT:  # only the last program of a tile goes on, with the whole sum
                acc, last = _split_sum(acc, Sums, Counters, splits, ROWS, BLOCK_N)
                row_ok = row_ok & last
        else:
            acc = _product(X, sxm, rows, row_ok, W, swn, Scale, cols, cols < N, K, InSquares, sisq, P, eps, BITS,
                           True, P_BLOCK, BLOCK_N, BLOCK_K, PRECISION)
        if PDL:  # the next kernel in once the main loop is done: at the start, it measured slower
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_BIAS:
            acc += bias[None, :]
        first, second = tl.split(tl.reshape(acc.to(Q.dtype.element_ty), (ROWS, PAIRS, 2)))
        first, second = first.to(tl.float32), second.to(tl.float32)
        if head < N_HEADS + N_KV_HEADS:  # queries and keys turn; values do not
            first, second = first * cos - second * sin, second * cos + first * sin
        first, second = first.to(Q.dtype.element_ty), second.to(Q.dtype.element_ty)
        if head < N_HEADS:
            out = Q + rows[:, None] * sqm + head * HEAD_DIM + i[None, :]
            tl.store(out, first, mask=row_ok[:, None])
            tl.store(out + HEAD_DIM // 2, second, mask=row_ok[:, None])
        else:  # a key or value head: into the cache (and the mirror)
            if head < N_HEADS + N_KV_HEADS:
                _write_head(K1, slot1, sk1b, sk1h, sk1s, b, head - N_HEADS, i, first, second, row_ok, HEAD_DIM)
                if MIRROR:
                    _write_head(K2, slot2, sk2b, sk2h, sk2s, b, head - N_HEADS, i, first, second, row_ok, HEAD_DIM)
            else:
                h = head - N_HEADS - N_KV_HEADS
                _write_head(V1, slot1, sv1b, sv1h, sv1s, b, h, i, first, second, row_ok, HEAD_DIM)
                if MIRROR:
                    _write_head(V2, slot2, sv2b, sv2h, sv2s, b, h, i, first, second, row_ok, HEAD_DIM)

    @triton.jit
    def _rotary_operands(Pos, InvFreq, L1, L2, rows, row_ok, b, t, i):
        # The rows' turns (cos, sin) for frequencies i, and their new keys' and values' slots in the cache and the
        # mirror: each sequence's length plus the row's index.
        angle = tl.load(Pos + rows, mask=row_ok, other=0).to(tl.float32)[:, None] * tl.load(InvFreq + i)[None, :]
        return (tl.cos(angle), tl.sin(angle), tl.load(L1 + b, mask=row_ok, other=0) + t,
                tl.load(L2 + b, mask=row_ok, other=0) + t)

    @triton.jit
    def _write_head(Cache, slot, scb, sch, scs, b, h, i, first, second, row_ok, HEAD_DIM: tl.constexpr):
        # The rotary pairs (i, i + HEAD_DIM / 2) of the rows of sequences b, into head h at their slots.
        out = Cache + b[:, None] * scb + h * sch + slot[:, None] * scs + i[None, :]
        tl.store(out, first, mask=row_ok[:, None])
        tl.store(out + HEAD_DIM // 2, second, mask=row_ok[:, None])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")  # as Triton reads it


def _dependent_launch(device: torch.device) -> dict:
    """Programmatic dependent launch, on Hopper and later: a kernel is placed on the GPU while the one before it
    finishes, instead of after, so that in a chain of short kernels each one's start-up overlaps the last one's
    tail. Each kernel waits (gdc_wait) until the one before has finished and its writes are visible before it
    touches any memory that the step's kernels write: no read of what that kernel writes, no write to what it reads
    (an int4 product asks for its first weights before the wait: _int4_product). A kernel two back has then finished
    too (the one before passed its own wait), and a kernel launched without the setting (Inductor's, PyTorch's)
    waits as always. Where a kernel lets the next one in (gdc_launch_dependents) is a matter of speed only: the
    products' and attention's programs, once the next kernel's programs were waiting beside them, ran slower
    (BENCHMARKS.md, section 8)."""
    on = not _interpreting() and _has_dependent_launch(device)
    return dict(PDL=on, launch_pdl=on)


@functools.cache
def _has_dependent_launch(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.hip is None  # an NVIDIA feature; ROCm's GPUs also say "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _weight_operands(w: Weights, x: torch.Tensor, K: int):
    if K % 16:
        raise ValueError(f"the decode kernels need in_features a multiple of 16, got {K}")
    if w.bits == 4 and x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"int4 products take bfloat16 or float32 activations, got {x.dtype}")
    return w.data, w.data.stride(0), w.scale if w.scale is not None else w.data


def _blocks(w: Weights, K: int, columns: int | None = None) -> dict:
    """Tile sizes and launch settings for a weight. For 16 and 8 bits they depend on the weight alone, never on the
    rows (batch invariance).

    Swept on an H200 over the decoder matrices of Qwen2-VL-2B, 7B and a 72B tensor-parallel rank. A matrix with
    few output rows gets narrow column blocks, so that there are programs for every multiprocessor; a long row
    gets a deeper pipeline of loads. int4 products take INT4_ROWS rows and INT4_COLUMNS columns a program, a warp
    each 16 columns. columns: at most this many columns a program (q/k/v: a program's columns lie in one head)."""
    N, most = w.out_features, columns or 1 << 31  # most: the columns a program may take
    if w.bits == 4:
        block_n = min(INT4_COLUMNS, most)
        return dict(ROWS=INT4_ROWS, BLOCK_N=block_n, BLOCK_K=K // w.scale.shape[0], BITS=4, num_warps=block_n // 16)
    if w.bits == 8:  # int8 keeps its own settings: the 16-bit rule measured slower for it (BENCHMARKS.md, section 8)
        block_n = 64 if N >= 16384 else 32
        return dict(ROWS=ROW_TILE, BLOCK_N=min(block_n, most), BLOCK_K=_block_k(K, 256), BITS=8,
                    num_warps=4, num_stages=4)
    wide = N >= 16384
    block_k = _block_k(K, 128 if wide else 256)
    block_n = (64 if K > 4096 else 32) if wide else 16
    return dict(ROWS=ROW_TILE, BLOCK_N=min(block_n, most), BLOCK_K=block_k, BITS=w.bits, num_warps=2,
                num_stages=6 if K // block_k > 32 else 4)


def split_sums(out_features: int) -> int:
    """The float32 sums an int4 weight keeps for its split products: a tile's for each of the most tiles a split
    product of out_features columns has (at most INT4_PROGRAMS / 2; none if one row of tiles is more)."""
    columns = -(-out_features // INT4_COLUMNS)
    return INT4_PROGRAMS // 2 // columns * columns * INT4_ROWS * INT4_COLUMNS


def _split_k(w: Weights, K: int, blocks: dict, grid: tuple) -> tuple[tuple, dict]:
    """The launch grid with its pieces of K, and the kernel's split arguments. int4 products with at most
    INT4_PROGRAMS / 2 tiles are cut along K (a piece a whole number of groups); other products are not split."""
    tiles = grid[0] * grid[1]
    groups = K // blocks["BLOCK_K"]
    splits = max(1, min(groups, INT4_PROGRAMS // tiles)) if w.bits == 4 else 1
    groups_each = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_each)
    if splits > 1 and tiles * blocks["ROWS"] * blocks["BLOCK_N"] > w.sums.numel():
        raise ValueError(f"a split int4 product needs {tiles * blocks['ROWS'] * blocks['BLOCK_N']} sums and its "
                         f"weight keeps {w.sums.numel()}: it was built with a smaller kernels.INT4_PROGRAMS")
    sums, counters = (w.sums, w.counters) if splits > 1 else (w.data, w.data)  # unread without a split
    budget = dict(maxnreg=INT4_SPLIT_REGISTERS) if splits > 1 else {}
    return (*grid, splits), dict(Sums=sums, Counters=counters, groups_each=groups_each, splits=splits,
                                 SPLIT=splits > 1, PTX=not _interpreting(), **budget)


def _block_k(K: int, largest: int) -> int:
    return next(b for b in (256, 128, 64, 32, 16) if b <= largest and K % b == 0)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # float32 exactly; tf32 is ignored for 16-bit inputs


# The launches as custom ops. Traced into by torch.compile, a launch would keep only num_warps and num_stages of its
# settings (Inductor's configs for Triton kernels): the split int4 products lost their register budget (measured),
# and, by our reading of Inductor, every kernel would lose its dependent launch. An op declares what it changes for
# good (the caches); an int4 weight's counters and sums it leaves as it found them, which holds as long as no two
# launches with the same weight run at once (one stream). Weights go in as their fields, in the NamedTuple's order.


def pending_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> PendingNorm:
    """x [..., K] pending RMSNorm(weight, eps), for a product to finish; one program a row."""
    needs_triton(x)
    return PendingNorm(x, *_pending_norm(x, weight), eps)


@torch.library.custom_op("std_decoding::pending_norm", mutates_args=())
def _pending_norm(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    scaled = torch.empty_like(flat)
    squares = torch.empty(flat.shape[0], 1, device=x.device, dtype=torch.float32)
    K = flat.shape[1]
    _pending_norm_kernel[(flat.shape[0],)](flat, flat.stride(0), weight, scaled, scaled.stride(0), squares,
                                           squares.stride(0), K=K, BLOCK=triton.next_power_of_2(K), num_warps=8,
                                           **_dependent_launch(x.device))
    return scaled.view(x.shape), squares


@_pending_norm.register_fake
def _(x, weight):
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], 1, dtype=torch.float32)


def _finish_norm(squares: torch.Tensor, eps: float) -> dict:
    """The arguments with which a product finishes a norm pending with these squares."""
    P = squares.shape[1]
    return dict(InSquares=squares, sisq=squares.stride(0), P=P, eps=eps, P_BLOCK=triton.next_power_of_2(P))


def linear(x: torch.Tensor | PendingNorm, w: Weights, residual: torch.Tensor | None = None, gated: bool = False,
           then_norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor | PendingNorm:
    """x [..., K] -> [..., N]: x @ w^T, plus bias and `residual`. A PendingNorm x is normalized first.

    gated: w holds gate then up (N = 2 I rows) and the result is SiLU(x @ gate^T) * (x @ up^T), [..., I].
    then_norm (weight, eps): the result comes pending that RMSNorm (a PendingNorm), for the next product.
    """
    x, squares, eps = (x.scaled, x.squares, x.eps) if isinstance(x, PendingNorm) else (x, None, 0.0)
    needs_triton(x)
    norm_weight, norm_eps = then_norm if then_norm is not None else (None, 0.0)
    out = _linear(x, squares, eps, *w, residual, gated, norm_weight)
    return out[0] if then_norm is None else PendingNorm(*out, norm_eps)


@torch.library.custom_op("std_decoding::linear", mutates_args=())
def _linear(x: torch.Tensor, squares: torch.Tensor | None, eps: float, data: torch.Tensor, bias: torch.Tensor | None,
            bits: int, scale: torch.Tensor | None, counters: torch.Tensor | None, sums: torch.Tensor | None,
            residual: torch.Tensor | None, gated: bool, norm_weight: torch.Tensor | None) -> list[torch.Tensor]:
    """linear's launch (x pending a norm with these squares, or none): [y], or with a norm_weight [y, y times it, the
    squares of y]."""
    w = Weights(data, bias, bits, scale, counters, sums)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    (M, K), N = flat.shape, _out_columns(w, gated)
    if gated and w.bits == 4 and N % 16:
        raise ValueError(f"int4 gate/up products need an intermediate size a multiple of 16, got {N}")
    data, swn, scale = _weight_operands(w, x, K)
    blocks = _blocks(w, K)
    unnormed = dict(InSquares=x, sisq=0, P=1, eps=0.0, P_BLOCK=1)
    norm_in = _finish_norm(squares, eps) if squares is not None else unnormed
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    res = residual.reshape(M, N) if residual is not None else y
    grid = (triton.cdiv(M, blocks["ROWS"]), _column_blocks(N, blocks["BLOCK_N"], gated))
    if norm_weight is not None:
        scaled = torch.empty_like(y)
        out_squares = torch.empty(M, grid[1], device=x.device, dtype=torch.float32)  # a piece per column block
        norm_out = dict(NormWeight=norm_weight, Scaled=scaled, sscm=scaled.stride(0), OutSquares=out_squares,
                        sosq=out_squares.stride(0))
    else:
        norm_out = dict(NormWeight=y, Scaled=y, sscm=0, OutSquares=y, sosq=0)
    launch, split = _split_k(w, K, blocks, grid)
    _linear_kernel[launch](
        flat, flat.stride(0), data, swn, scale, w.bias if w.bias is not None else flat, res, res.stride(0), y,
        y.stride(0), M, N, K, HAS_BIAS=w.bias is not None, RESIDUAL=residual is not None, GATED=gated,
        NORM_IN=squares is not None, NORM_OUT=norm_weight is not None, PRECISION=_precision(x), **norm_in,
        **norm_out, **split, **blocks, **_dependent_launch(x.device),
    )
    y = y.view(*x.shape[:-1], N)
    return [y] if norm_weight is None else [y, scaled.view(y.shape), out_squares]


@_linear.register_fake
def _(x, squares, eps, data, bias, bits, scale, counters, sums, residual, gated, norm_weight):
    w = Weights(data, bias, bits, scale, counters, sums)
    N, K = _out_columns(w, gated), x.shape[-1]
    y = x.new_empty(*x.shape[:-1], N)
    if norm_weight is None:
        return [y]
    columns = _column_blocks(N, _blocks(w, K)["BLOCK_N"], gated)
    return [y, y.new_empty(y.shape), x.new_empty(x.numel() // K, columns, dtype=torch.float32)]


def _out_columns(w: Weights, gated: bool) -> int:
    return w.out_features // 2 if gated else w.out_features


def _column_blocks(N: int, block_n: int, gated: bool) -> int:
    """A product's programs along its N output columns (a gated product's block holds gate and up columns)."""
    return triton.cdiv(N, block_n // 2 if gated else block_n)


def gated_linear(x: torch.Tensor | PendingNorm, w: Weights) -> torch.Tensor:
    return linear(x, w, gated=True)


def qkv_rotary(x: PendingNorm, w: Weights, pos: torch.Tensor, inv_freq: torch.Tensor, n_heads: int,
               n_kv_heads: int, cache, mirror=None) -> torch.Tensor:
    """x [B, T, dim], pending its RMSNorm -> queries [B, T, n_heads * D], rotated; the tokens' rotated keys and
    values are written to `cache` (.k, .v [B, Hkv, S, D], .lengths [B]) at slots lengths[b] + t, and to `mirror` at
    its own lengths.

    pos [B, T]: each token's position, the same on every M-RoPE axis (generated tokens are text).
    """
    needs_triton(x.x)
    D = cache.k.shape[-1]
    if D < 16 or D & (D - 1):
        raise NotImplementedError(f"the decode kernels need a power-of-two head_dim of at least 16, got {D}")
    mirrored = (mirror.k, mirror.v, mirror.lengths) if mirror is not None else (None, None, None)
    return _qkv_rotary(x.scaled, x.squares, x.eps, *w, pos, inv_freq, n_heads, n_kv_heads, cache.k, cache.v,
                       cache.lengths, *mirrored)


@torch.library.custom_op("std_decoding::qkv_rotary", mutates_args=("cache_k", "cache_v", "mirror_k", "mirror_v"))
def _qkv_rotary(x: torch.Tensor, squares: torch.Tensor, eps: float, data: torch.Tensor, bias: torch.Tensor | None,
                bits: int, scale: torch.Tensor | None, counters: torch.Tensor | None, sums: torch.Tensor | None,
                pos: torch.Tensor, inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int, cache_k: torch.Tensor,
                cache_v: torch.Tensor, lengths: torch.Tensor, mirror_k: torch.Tensor | None,
                mirror_v: torch.Tensor | None, mirror_lengths: torch.Tensor | None) -> torch.Tensor:
    """qkv_rotary's launch: x [B, T, dim] is the pending norm's `scaled`, finished with its squares and eps."""
    w = Weights(data, bias, bits, scale, counters, sums)
    B, T, K = x.shape
    D = cache_k.shape[-1]
    flat = x.reshape(B * T, K).contiguous()
    N = (n_heads + 2 * n_kv_heads) * D
    data, swn, scale = _weight_operands(w, flat, K)
    blocks = _blocks(w, K, columns=D)
    q = torch.empty(B * T, n_heads * D, device=flat.device, dtype=flat.dtype)
    has_mirror = mirror_k is not None
    if not has_mirror:  # the kernel takes a mirror's arguments either way and writes it only with MIRROR
        mirror_k, mirror_v, mirror_lengths = cache_k, cache_v, lengths
    launch, split = _split_k(w, K, blocks, (triton.cdiv(B * T, blocks["ROWS"]), N // blocks["BLOCK_N"]))
    _qkv_rotary_kernel[launch](
        flat, flat.stride(0), data, swn, scale, w.bias if w.bias is not None else flat,
        pos.reshape(-1).contiguous(), inv_freq, q, q.stride(0), T,
        cache_k, cache_v, lengths, *cache_k.stride()[:3], *cache_v.stride()[:3],
        mirror_k, mirror_v, mirror_lengths, *mirror_k.stride()[:3], *mirror_v.stride()[:3], B * T, N,
        K, N_HEADS=n_heads, N_KV_HEADS=n_kv_heads, HEAD_DIM=D, HAS_BIAS=w.bias is not None,
        MIRROR=has_mirror, PRECISION=_precision(flat), **_finish_norm(squares, eps), **split, **blocks,
        **_dependent_launch(x.device),
    )
    return q.view(B, T, n_heads * D)


@_qkv_rotary.register_fake
def _(x, squares, eps, data, bias, bits, scale, counters, sums, pos, inv_freq, n_heads, n_kv_heads, cache_k, cache_v,
      lengths, mirror_k, mirror_v, mirror_lengths):
    B, T, _ = x.shape
    return x.new_empty(B, T, n_heads * cache_k.shape[-1])


# ---------------------------------------------------------------------------------------------- attention


if triton is not None:

    @triton.jit
    def _attention_kernel(Q, sqm, K, V, Lengths, Part, Lse, T, n_kv_heads, n_tiles, skb, skh, sks, svb, svh, svs,
                          spr, sps, slr, N_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr,
                          SCALE: tl.constexpr, PDL: tl.constexpr):
        # One program: one tile of ROWS rows of one sequence and KV head, over one fixed piece of SPLIT slots. Its
        # rows are (token, query head of the group): each key and value is read once for all of them.
        if PDL:  # nothing touches memory before the wait (_dependent_launch)
            tl.extra.cuda.gdc_wait()
        LOG2_SCALE: tl.constexpr = SCALE * 1.4426950408889634
        pid, split = tl.program_id(0), tl.program_id(1)
        tile, bh = pid % n_tiles, pid // n_tiles
        b, h = bh // n_kv_heads, bh % n_kv_heads
        r = tile * ROWS + tl.arange(0, ROWS)
        row_ok = r < T * GROUP
        t, g = r // GROUP, r % GROUP
        d = tl.arange(0, HEAD_DIM)
        length = tl.load(Lengths + b).to(tl.int32)  # slot arithmetic in 32 bits (see the masks below)
        visible_end = length + t + 1  # token t sees the cache and the new tokens up to itself
        last_t = tl.minimum(tile * ROWS + ROWS - 1, T * GROUP - 1) // GROUP
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, length + last_t + 1)
        filled = r * 0 + start < end  # per row (a scalar mask won't do): a piece past the filled slots reads nothing
        q = tl.load(Q + (b * T + t)[:, None] * sqm + (h * GROUP + g)[:, None] * HEAD_DIM + d[None, :],
                    mask=(row_ok & filled)[:, None], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        # Blocks past a row's last visible slot change nothing of it, bit for bit (their weights are exactly 0 and
        # the running maximum stays): a row gets the same result in a call of one token or of many.
        for s in range(start, end, BLOCK_N):
            # Masks compare j = slot - s, a slot's place in the block, with per-row bounds: the compiler keeps j in 32
            # bits (the slot itself it widens to 64, two compares each).
            j = tl.arange(0, BLOCK_N)
            in_range = (j < end - s)[:, None]
            k = tl.load(K + b * skb + h * skh + (s + j)[:, None] * sks + d[None, :], mask=in_range, other=0.0)
            v = tl.load(V + b * svb + h * svh + (s + j)[:, None] * svs + d[None, :], mask=in_range, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            scores = tl.where(j[None, :] < (visible_end - s)[:, None], scores, float("-inf"))
            # The running maximum and the weights in base 2 (scores scaled by SCALE * log2(e)): each weight is one
            # multiply-add and one exp2.
            m_new = tl.maximum(m, tl.max(scores, 1) * LOG2_SCALE)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores * LOG2_SCALE - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m = m_new
        if PDL:  # the next kernel in once the main loop is done: at the start, it measured slower
            tl.extra.cuda.gdc_launch_dependents()
        row = (b * T + t) * N_HEADS + h * GROUP + g
        store = row_ok & (start < visible_end)  # the merge reads only the splits a row sees, and they are not empty
        l = tl.where(store, l, 1.0)
        tl.store(Part + row[:, None] * spr + split * sps + d[None, :], acc / l[:, None], mask=store[:, None])
        tl.store(Lse + row * slr + split, m + tl.log2(l), mask=store)  # base 2, as the merge reads it

    @triton.jit
    def _merge_kernel(Part, Lse, Lengths, Out, T, spr, sps, slr, som, N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_S: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
        # One program: one (sequence, token, query head). Its splits are combined by their log-sum-exp (base 2, as
        # the attention kernel stores it) in one pass, BLOCK_S at a time and in a fixed order: each block's weights
        # and pieces are loaded together, and the sums so far rescaled to the block's maximum. A row sees every
        # split before its end, and none is empty.
        if PDL:  # nothing touches memory before the wait (_dependent_launch); a short kernel lets the next in at once
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)  # (b * T + t) * N_HEADS + head
        b, t, head = row // (T * N_HEADS), (row // N_HEADS) % T, row % N_HEADS
        n = tl.cdiv(tl.load(Lengths + b) + t + 1, SPLIT)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM)
        top = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for s0 in range(0, n, BLOCK_S):
            ok = s0 + s < n
            lse = tl.load(Lse + row * slr + s0 + s, mask=ok, other=float("-inf"))
            part = tl.load(Part + row * spr + (s0 + s)[:, None] * sps + d[None, :], mask=ok[:, None], other=0.0)
            new_top = tl.maximum(top, tl.max(lse, 0))
            rescale = tl.exp2(top - new_top)  # 0 at the first block
            weight = tl.exp2(lse - new_top)
            total = total * rescale + tl.sum(weight, 0)
            acc = acc * rescale + tl.sum(weight[:, None] * part, 0)
            top = new_top
        out = acc / total
        tl.store(Out + (b * T + t) * som + head * HEAD_DIM + d, out.to(Out.dtype.element_ty))


def decode_attention(q: torch.Tensor, cache) -> torch.Tensor:
    """Split-KV ("flash decoding") attention of T new tokens per sequence over a static cache.

    q [B, T, Hq * D], rotated; cache .k, .v [B, Hkv, S, D] with the new tokens' keys/values already written at slots
    lengths[b] .. lengths[b] + T - 1, .split (SPLIT, or DRAFT_SPLIT) -> [B, T, Hq * D]. Token t of sequence b sees
    slots 0 .. lengths[b] + t.

    The launch covers the whole capacity in pieces of cache.split slots; a piece past the filled length does nothing and
    the merge reads only the pieces a row sees. The launch shape is fixed, so it is captured in CUDA graphs.
    """
    needs_triton(q)
    return _decode_attention(q, cache.k, cache.v, cache.lengths, cache.split)


@torch.library.custom_op("std_decoding::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                      split: int) -> torch.Tensor:
    B, T, width = q.shape
    Hkv, S, D = k.shape[1:]
    Hq = width // D
    group = Hq // Hkv
    n_tiles = triton.cdiv(T * group, ATTENTION_ROWS)
    n_splits = triton.cdiv(S, split)
    part = torch.empty(B * T * Hq, n_splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * T * Hq, n_splits, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    _attention_kernel[(B * Hkv * n_tiles, n_splits)](
        q, q.stride(1), k, v, lengths, part, lse, T, Hkv, n_tiles, *k.stride()[:3], *v.stride()[:3], part.stride(0),
        part.stride(1), lse.stride(0), N_HEADS=Hq, GROUP=group, HEAD_DIM=D, SPLIT=split, ROWS=ATTENTION_ROWS,
        PRECISION=_precision(q), SCALE=D ** -0.5, **ATTENTION_LAUNCH, **_dependent_launch(q.device),
    )
    out = torch.empty(B, T, Hq * D, device=q.device, dtype=q.dtype)
    _merge_kernel[(B * T * Hq,)](part, lse, lengths, out, T, part.stride(0), part.stride(1), lse.stride(0),
                                 out.stride(1), N_HEADS=Hq, HEAD_DIM=D, BLOCK_S=MERGE_BLOCK, SPLIT=split,
                                 num_warps=4, **_dependent_launch(q.device))
    return out


@_decode_attention.register_fake
def _(q, k, v, lengths, split):
    return q.new_empty(q.shape)
