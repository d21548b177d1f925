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
    """Weight-only int4: per group of 128 (or 64, 32) input columns, w ~ (q - 8) * scale + zero with q in 0..15,
    scale and zero in bfloat16 (the convention of PyTorch's int4 kernels, tinygemm).

    Two values a byte, in the layout kernels.Weights describes: byte i of a group holds column i in its low nibble
    and column i + group / 2 in its high nibble, so the kernel unpacks a group into two contiguous halves. The same
    layout on every device: a decode step on a GPU reads it through kernels.py; elsewhere it is dequantized.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        N, K = linear.weight.shape
        self.group = next((g for g in (128, 64, 32) if K % g == 0), None)
        if self.group is None:
            raise ValueError(f"int4 needs in_features a multiple of 32 (its groups), got {K}")
        w = linear.weight.float().view(N, K // self.group, self.group)
        lowest, highest = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((highest - lowest) / 15).clamp(min=1e-8)
        q = ((w - lowest[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        low, high = q.chunk(2, dim=-1)  # [N, K / group, group / 2] each
        self.register_buffer("packed", (low | high << 4).view(N, K // 2))
        self.register_buffer("scale", scale.t().to(torch.bfloat16).contiguous())  # [K / group, N]
        self.register_buffer("zero", (lowest + 8 * scale).t().to(torch.bfloat16).contiguous())
        self.bias = linear.bias

    def decode_weights(self) -> Weights:
        return Weights(self.packed, self.bias, bits=4, scale=self.scale, zero=self.zero, group=self.group)

    def quantized_values(self) -> torch.Tensor:
        """q [N, K] in 0..15."""
        N = self.packed.shape[0]
        halves = self.packed.view(N, -1, self.group // 2)
        return torch.cat([halves & 0xF, halves >> 4], dim=-1).view(N, -1)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.quantized_values().to(dtype) - 8
        q = q.view(q.shape[0], -1, self.group)
        scale, zero = self.scale.t().to(dtype), self.zero.t().to(dtype)  # [N, K / group] each
        return (q * scale[..., None] + zero[..., None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
