"""Weight-only int8 and int4 quantisation: cheaper drafts that read fewer bytes per step.

    drafter = quantized_copy(model, bits=4)   # the model with int4 copies of its decoder and head linears

Only the draft runs quantized; the dense model verifies every token, so the output does not change, only how often
drafts are accepted.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import Weights


class Int8Linear(nn.Module):
    """Weight-only int8, one scale per output row. A decode step on a GPU reads it through the kernels of
    kernels.py, which stream int8 weights faster than PyTorch's `_weight_int8pack_mm` (`bench.py --kernels`)."""

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

    On a GPU the product is PyTorch's own int4 kernel (tinygemm, `_weight_int4pack_mm`, as gpt-fast uses it), which
    wants its packed layout and bfloat16 activations. Elsewhere the weight is kept two nibbles a byte and dequantized,
    so a draft can run in any dtype, float64 included. Both hold the same quantized values.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        N, K = linear.weight.shape
        self.group = next((g for g in (128, 64, 32) if K % g == 0), None)
        if self.group is None or N % 8:
            raise ValueError(f"int4 needs in_features a multiple of 32 (its groups) and out_features a multiple of 8 "
                             f"(tinygemm's tiles), got {K} and {N}")
        w = linear.weight.float().view(N, K // self.group, self.group)
        lowest, highest = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((highest - lowest) / 15).clamp(min=1e-8)
        q = ((w - lowest[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
        pairs = q[:, ::2] << 4 | q[:, 1::2]  # [N, K / 2], the even column in the high nibble
        self.tinygemm = linear.weight.is_cuda  # the layout is fixed here: the module cannot move between devices
        if self.tinygemm:
            inner_k_tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
            pairs = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
        self.register_buffer("packed", pairs)
        zero = lowest + 8 * scale
        self.register_buffer("scale_and_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
                             .contiguous())  # [K / group, N, 2]
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.tinygemm:
            raise RuntimeError("int4 weights quantized on a GPU are in tinygemm's layout, which only its kernel reads")
        q = torch.stack([self.packed >> 4, self.packed & 0xF], dim=-1).to(dtype)  # [N, K / 2, 2]
        q = q.view(q.shape[0], -1, self.group) - 8
        scale, zero = self.scale_and_zero.to(dtype).transpose(0, 1).unbind(-1)  # [N, K / group] each
        return (q * scale[..., None] + zero[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda != self.tinygemm:
            raise RuntimeError(f"int4 weights were quantized on {'a GPU' if self.tinygemm else 'the CPU'} and cannot "
                               f"run on {x.device}: quantize the model where it runs")
        if self.tinygemm:
            flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scale_and_zero)
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(x.dtype), self.bias)


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
