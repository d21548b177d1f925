"""Weight-only int8 and int4 quantisation: cheaper drafts that read fewer bytes per step.

    drafter = quantized_copy(model, bits=4)   # the model with int4 copies of its decoder and head linears

Only the draft runs quantized; the dense model verifies every token, so the output does not change, only how often
drafts are accepted.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import Weights


class Int8Linear(nn.Module):
    """Weight-only int8, one scale per output row. A decode step on a GPU reads it through the kernels of
    kernels.py, which stream int8 weights faster than PyTorch's `_weight_int8pack_mm` (`bench.py --kernels`)."""
    bits = 8

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def decode_weights(self) -> Weights:
        return Weights(self.weight, self.bias, bits=8, scale=self.scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class Int4Linear(nn.Module):
    """Weight-only int4: per group of 128 (or 64, 32) input columns, w ~ (q - 8) * scale + zero with q in 0..15.

    Stored for kernels.py's int4 products, which a GPU runs on its tensor cores: `packed` [N / 16, K / group, 32,
    group / 16] int32, eight q a word, each word one thread's share of a 16 x 16 weight tile in the `mma` instruction's
    operand layout (`_pack`); scale and zero as one bfloat16 pair in an int32 [K / group, N]. On the CPU the weight is
    dequantized, so a draft can run in any dtype, float64 included. Both hold the same quantized values.
    """
    bits = 4

    def __init__(self, linear: nn.Linear):
        super().__init__()
        N, K = linear.weight.shape
        self.group = next((g for g in (128, 64, 32) if K % g == 0), None)
        if self.group is None or N % 16:
            raise ValueError(f"int4 needs in_features a multiple of 32 (its groups) and out_features of 16 "
                             f"(its tiles), got {K} and {N}")
        w = linear.weight.float().view(N, K // self.group, self.group)
        lowest, highest = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((highest - lowest) / 15).clamp(min=1e-8)
        q = ((w - lowest[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(N, K)
        self.register_buffer("packed", _pack(q, self.group))
        zero = lowest + 8 * scale
        pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # [K / group, N, 2]
        # One int32 a pair, as the kernel loads it; as an integer it also stays bfloat16 through model.to(dtype).
        self.register_buffer("scale_and_zero", pairs.view(torch.int32).squeeze(-1))
        # A split product's count of arrived pieces and their float32 sums, per tile (kernels._split_sum); the sums
        # are kept as int32 zeros, which the kernel reads as float32, so that model.to(dtype) leaves them alone.
        self.register_buffer("counters", torch.zeros(kernels.INT4_PROGRAMS, dtype=torch.int32, device=w.device),
                             persistent=False)
        self.register_buffer("sums", torch.zeros(kernels.split_sums(N), dtype=torch.int32, device=w.device),
                             persistent=False)
        self.bias = linear.bias

    def decode_weights(self) -> Weights:
        return Weights(self.packed, self.bias, bits=4, scale=self.scale_and_zero, counters=self.counters,
                       sums=self.sums)

    def scale_and_zero_bf16(self) -> torch.Tensor:
        """[K / group, N, 2] bfloat16: PyTorch's int4 kernels' layout."""
        return self.scale_and_zero.unsqueeze(-1).view(torch.bfloat16)

    def values(self) -> torch.Tensor:
        """q [N, K], int32 in 0..15."""
        return _unpack(self.packed)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.values().to(dtype).view(self.packed.shape[0] * 16, -1, self.group) - 8
        scale, zero = self.scale_and_zero_bf16().to(dtype).transpose(0, 1).unbind(-1)  # [N, K / group] each
        return (q * scale[..., None] + zero[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.packed.device:
            raise RuntimeError(f"int4 weights on {self.packed.device} cannot multiply an input on {x.device}")
        if x.is_cuda:
            return kernels.linear(x, self.decode_weights())
        return F.linear(x, self.dequantized(x.dtype), self.bias)


# Where a q sits in `packed`. A tile is 16 output columns (col = 8 * hi + g) by a group's K columns, cut into
# 32-input slices c; a slice's input 8 * t + 4 * s + 2 * r + h of a column is in thread 4 * g + t's word 2 * c + s,
# at bits 4 * (2 * r + hi) + 16 * h: the `mma` operand's register 2 * r + hi (r: its first or second eight inputs,
# hi: the tile's first or second eight columns), half h (the even or odd input). So a thread's word is its whole
# share of one 16 x 16 `mma`, its eight inputs of x are side by side (one 16-byte load), and a warp's words for a
# group are one contiguous piece.
_PACKED_DIMS = "tile hi g group c t s r h"  # q [N, K] viewed so
_PACKED_ORDER = "tile group g t c s r hi h"  # packed's order; the last three make a word's bits
_WORD_BITS = [4 * (2 * r + hi) + 16 * h for r in range(2) for hi in range(2) for h in range(2)]


def _pack(q: torch.Tensor, group: int) -> torch.Tensor:
    """q [N, K] in 0..15 -> [N / 16, K / group, 32, group / 16] int32."""
    N, K = q.shape
    sizes = dict(tile=N // 16, hi=2, g=8, group=K // group, c=group // 32, t=4, s=2, r=2, h=2)
    dims, order = _PACKED_DIMS.split(), _PACKED_ORDER.split()
    q = q.view(*(sizes[d] for d in dims)).permute(*(dims.index(d) for d in order)).flatten(-3)  # bits r, hi, h
    shifts = torch.tensor(_WORD_BITS, dtype=torch.int32, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.int32).reshape(N // 16, K // group, 32, group // 16).contiguous()


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of _pack: q [N, K]."""
    tiles, groups, _, steps = packed.shape
    sizes = dict(tile=tiles, hi=2, g=8, group=groups, c=steps // 2, t=4, s=2, r=2, h=2)
    dims, order = _PACKED_DIMS.split(), _PACKED_ORDER.split()
    shifts = torch.tensor(_WORD_BITS, dtype=torch.int32, device=packed.device)
    q = (packed.view(*(sizes[d] for d in order[:-3]), 1) >> shifts) & 0xF
    q = q.view(*(sizes[d] for d in order)).permute(*(order.index(d) for d in dims))
    return q.reshape(tiles * 16, groups * steps * 16)


def quantized_copy(model: nn.Module, bits: int) -> nn.Module:
    """`model` with int8/int4 copies of the linear layers in `model.layers` and of `model.lm_head`.

    Everything else (embeddings, norms, the vision tower) is shared with `model`, not copied.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    quantize = Int8Linear if bits == 8 else Int4Linear

    def with_quantized_linears(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)
        clone._modules = {name: quantize(child) if isinstance(child, nn.Linear) else with_quantized_linears(child)
                          for name, child in module._modules.items()}
        return clone

    drafter = copy.copy(model)
    drafter._modules = {**model._modules, "layers": with_quantized_linears(model.layers),
                        "lm_head": quantize(model.lm_head)}
    return drafter
