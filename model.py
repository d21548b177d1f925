"""Qwen2-VL in plain PyTorch: the Qwen2 language model with M-RoPE, a static KV cache, and the vision tower.

Shapes: B batch, T new tokens, L prompt length, S cache capacity, D head dim, Hq query heads, Hkv key/value heads.
Two forwards share the weights:
    prefill(one prompt)  -> fills one row of a KVCache; attention through SDPA (flash on a GPU)
    step(tokens [B, T])  -> runs a few new tokens of every row against the cache, appending their keys/values at
                            each row's own length; fixed shapes, so it can be compiled and captured in a CUDA graph.
                            On a GPU a layer's step is six Triton kernels (kernels.py), batch-invariant: a token's
                            logits and keys/values come out bit for bit the same whatever else is in the call.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from vision import RMSNorm, VisionConfig, VisionTransformer

PREFILL_MLP_CHUNK = 8192  # prompt tokens per MLP pass in prefill: bounds the largest activation of a long prompt


@dataclass
class ModelConfig:
    vocab_size: int = 152064
    dim: int = 3584
    n_layers: int = 28
    n_heads: int = 28
    n_kv_heads: int = 4
    intermediate_size: int = 18944
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # frequencies driven by the t, h and w position
    tie_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    stop_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, heads {self.n_heads}, kv heads {self.n_kv_heads} do not divide")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")


# ---------------------------------------------------------------------------------------------- KV cache


class LayerCache(NamedTuple):
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, D]
    lengths: torch.Tensor  # [B] filled slots per sequence
    split: int = kernels.SPLIT  # slots per piece of the GPU attention (kernels.py)


@dataclass(eq=False)  # identity, not elementwise tensor comparison
class KVCache:
    """Static keys/values of every layer, written at explicit slots, with each sequence's filled length.

    A step writes its T tokens at slots lengths[b] .. lengths[b] + T - 1 and leaves `lengths` alone:
    the caller keeps what it accepts by raising `lengths`, and rolls back by not raising it. Nothing is copied.
    Keys are stored after rotation, so a slot keeps its token's position wherever the slot is.
    """

    k: list[torch.Tensor]  # per layer [B, Hkv, S, D]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [B]
    split: int = kernels.SPLIT  # see LayerCache

    @classmethod
    def zeros(cls, n_layers, batch, n_kv_heads, capacity, head_dim, dtype, device, split=kernels.SPLIT) -> "KVCache":
        shape = (batch, n_kv_heads, capacity, head_dim)
        # Zeros, not empty: the masked SDPA path multiplies unfilled slots by a zero weight, and 0 * NaN is NaN.
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        return cls(k, v, torch.zeros(batch, dtype=torch.long, device=device), split)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.lengths, self.split)

    def first_layers(self, n: int) -> "KVCache":
        """The first n layers' storage, shared, with lengths of its own (an early-exit draft reads it)."""
        return KVCache(self.k[:n], self.v[:n], self.lengths.clone(), self.split)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)


# ---------------------------------------------------------------------------------------------- attention


def attend_cache(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """q [B, T, Hq, D] of tokens at slots lengths..lengths+T-1 (already written) -> [B, T, Hq * D], causal."""
    if q.is_cuda:
        return kernels.decode_attention(q.flatten(2), cache)
    # The query heads of a KV head become rows of one attention (row = head in group, token), like the GPU kernel:
    # each key is read once, never repeated per query head.
    B, T, Hq, D = q.shape
    Hkv = cache.k.shape[1]
    rows = q.view(B, T, Hkv, Hq // Hkv, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, -1, D)
    token = torch.arange(rows.shape[2], device=q.device) % T
    slots = torch.arange(cache.k.shape[2], device=q.device)
    visible = slots <= (cache.lengths[:, None, None] + token[:, None])  # [B, rows, S]
    out = F.scaled_dot_product_attention(rows, cache.k, cache.v, attn_mask=visible[:, None])
    return out.view(B, Hkv, Hq // Hkv, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq * D)


# ---------------------------------------------------------------------------------------------- layers


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def text_rope(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, D] of text tokens at pos [B, T]: one position on every M-RoPE axis."""
    angles = pos[..., None].to(inv_freq.dtype) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.to(cos.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v projections in one matrix: one read of the weights per step instead of three.
        self.qkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(B, T, self.n_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, cache: LayerCache, mirror: LayerCache | None = None) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        B, T = x.shape[:2]
        rows = torch.arange(B, device=x.device)[:, None]
        for c in (cache, mirror) if mirror is not None else (cache,):
            # Index assignment, not scatter_: compiled, it writes in place (scatter_ copies the whole cache).
            slots = c.lengths[:, None] + torch.arange(T, device=x.device)  # [B, T]
            c.k[rows, :, slots] = k
            c.v[rows, :, slots] = v
        return self.o_proj(attend_cache(q, cache))

    def prefill(self, x, cos, sin, k_cache, v_cache, row: int, query_rows):
        q, k, v = self.project(x, cos, sin)  # x: [1, L, dim]
        L = x.shape[1]
        k_cache[row, :, :L] = k[0].transpose(0, 1)
        v_cache[row, :, :L] = v[0].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        queries = q[0, query_rows] if query_rows is not None else None
        return self.o_proj(out.transpose(1, 2).reshape(1, L, -1)), queries


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    # Tensor parallel (tp.py): adds the ranks' partial sums of the output and down projections.
    partial_sums = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.post_attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, pos, inv_freq, cache: LayerCache, mirror: LayerCache | None = None,
                next_norm_weight: torch.Tensor | None = None):
        """A step: x [B, T, dim] are new tokens at positions pos [B, T], appended to `cache` (and also written to
        `mirror`, if given). x pending this layer's input norm (kernels.PendingNorm, from Qwen2VL.step on a GPU): the
        fused kernels, and the result pending the norm that reads it (of weight `next_norm_weight`); a tensor: plain
        PyTorch, the reference the kernels are tested on."""
        if isinstance(x, kernels.PendingNorm):
            return self.fused_step(x, pos, inv_freq, cache, mirror, next_norm_weight)
        return self.plain_step(x, pos, inv_freq, cache, mirror)

    def fusable(self) -> bool:
        return all(kernels.readable(m) for m in (self.attn.qkv, self.attn.o_proj, self.mlp.gate_up,
                                                 self.mlp.down_proj))

    def plain_step(self, x, pos, inv_freq, cache: LayerCache, mirror: LayerCache | None = None) -> torch.Tensor:
        cos, sin = text_rope(pos, inv_freq)
        x = x + self.summed(self.attn(self.input_norm(x), cos, sin, cache, mirror))
        return x + self.summed(self.mlp(self.post_attention_norm(x)))

    def summed(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.partial_sums is None else self.partial_sums(h)

    def fused_step(self, x: kernels.PendingNorm, pos, inv_freq, cache: LayerCache, mirror: LayerCache | None,
                   next_norm_weight: torch.Tensor) -> kernels.PendingNorm:
        """The same step as six kernels: the norms, rotary embedding and the cache writes, the residuals and the
        SiLU gate in the products' prologues and epilogues."""
        attn, mlp = self.attn, self.mlp
        q = kernels.qkv_rotary(x, kernels.weights_of(attn.qkv), pos, inv_freq, attn.n_heads, attn.n_kv_heads, cache,
                               mirror)
        x = self.plus(x.x, kernels.decode_attention(q, cache), attn.o_proj, self.post_attention_norm.weight)
        return self.plus(x.x, kernels.gated_linear(x, kernels.weights_of(mlp.gate_up)), mlp.down_proj,
                         next_norm_weight)

    def plus(self, x: torch.Tensor, h: torch.Tensor, linear, norm_weight: torch.Tensor) -> kernels.PendingNorm:
        """x + linear(h) pending the norm of weight `norm_weight`, all in the product's epilogue; tensor parallel, the
        norm's half after the ranks' sum."""
        eps = self.input_norm.eps  # one eps for every norm of a model (ModelConfig.norm_eps)
        if self.partial_sums is None:
            return kernels.linear(h, kernels.weights_of(linear), residual=x, then_norm=(norm_weight, eps))
        summed = x + self.partial_sums(kernels.linear(h, kernels.weights_of(linear)))
        return kernels.pending_norm(summed, norm_weight, eps)

    def prefill(self, x, cos, sin, k_cache, v_cache, row: int, query_rows):
        h, queries = self.attn.prefill(self.input_norm(x), cos, sin, k_cache, v_cache, row, query_rows)
        x = x + self.summed(h)
        # The MLP's intermediate activations are the largest of a long prompt: run it a chunk of tokens at a time.
        chunks = x.split(PREFILL_MLP_CHUNK, dim=1)
        return torch.cat([c + self.summed(self.mlp(self.post_attention_norm(c))) for c in chunks], dim=1), queries


# ---------------------------------------------------------------------------------------------- the model


def rope_index(input_ids: torch.Tensor, grid_thw: torch.Tensor | None, visual_token_ids, merge: int,
               time_steps=None) -> torch.Tensor:
    """M-RoPE positions [3, L] of a prompt (t, h, w axes).

    Text counts up by one on all three axes. A video's tokens take their (frame pair, row, column) grid index plus
    the position where the video starts; the text after it resumes one past the largest position used, as the
    original Qwen2-VL and Qwen2.5-VL code has it. time_steps (Qwen2.5-VL, one per video): the temporal position
    advances by this much per frame pair, rounded down (tokens_per_second x seconds per frame pair); Qwen2-VL: 1.
    """
    L = input_ids.shape[0]
    pos = torch.arange(L).expand(3, L).clone()
    visual = torch.isin(input_ids.cpu(), torch.tensor(visual_token_ids)).nonzero().flatten()
    grids = [] if grid_thw is None else [(t, h // merge, w // merge) for t, h, w in grid_thw.tolist()]
    if len(visual) != sum(t * h * w for t, h, w in grids):
        raise ValueError(f"the prompt has {len(visual)} visual tokens, grid_thw {grids} describes "
                         f"{sum(t * h * w for t, h, w in grids)}")
    steps = [1.0] * len(grids) if time_steps is None else [float(s) for s in time_steps]
    if len(steps) != len(grids):
        raise ValueError(f"{len(steps)} time steps (second_per_grid_ts) for {len(grids)} videos")
    first = 0
    for (t, h, w), step in zip(grids, steps):
        n = t * h * w
        start = visual[first].item()
        if visual[first + n - 1].item() != start + n - 1:
            raise ValueError(f"the {n} visual tokens of a {t}x{h}x{w} grid must be contiguous from position {start}")
        base = pos[0, start].item()
        grid = torch.stack(torch.meshgrid((torch.arange(t) * step).long(), torch.arange(h), torch.arange(w),
                                          indexing="ij"))
        pos[:, start : start + n] = grid.reshape(3, n) + base
        pos[:, start + n :] += int(grid.max()) + 1 - n
        first += n
    return pos


class Qwen2VL(nn.Module):
    partial_sums = None  # tensor parallel (tp.py): the sum of a tensor over the ranks

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.visual = VisionTransformer(config.vision)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, capacity: int, invariant: bool = True) -> KVCache:
        """invariant=False: a draft's cache, whose attention need not be batch-invariant (shorter pieces on a GPU)."""
        c = self.config  # the layers' own KV heads: a tensor-parallel rank holds some of them
        return KVCache.zeros(c.n_layers, batch, self.layers[0].attn.n_kv_heads, capacity, c.head_dim, self.dtype,
                             self.device, kernels.SPLIT if invariant else kernels.DRAFT_SPLIT)

    def inv_freq(self) -> torch.Tensor:
        """[D / 2] rotary frequencies, in float32 or better."""
        D = self.config.head_dim
        dtype = torch.promote_types(self.dtype, torch.float32)
        return 1.0 / self.config.rope_theta ** (torch.arange(0, D, 2, device=self.device).to(dtype) / D)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [3, ...] -> cos, sin [..., D]; frequency i turns with the t, h or w position by mrope_section."""
        sections = self.inv_freq().split(list(self.config.mrope_section))
        angles = torch.cat([pos[axis, ..., None].to(f.dtype) * f for axis, f in enumerate(sections)], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)

    def embed(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt (input_ids, pixel_values, grid_thw) -> embeddings [L, dim], video inside; positions [3, L]."""
        ids = inputs.input_ids.to(self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        x = self.embed_tokens(ids)
        visual = self.visual_mask(ids)
        grid_thw = getattr(inputs, "grid_thw", None)
        if visual.any():
            if inputs.pixel_values is None or grid_thw is None:
                raise ValueError(f"the prompt has {int(visual.sum())} visual tokens: it needs pixel_values and "
                                 "grid_thw")
            features = self.visual(inputs.pixel_values.to(self.device), grid_thw)
            if features.shape[0] != visual.sum():
                raise ValueError(f"the video gives {features.shape[0]} tokens, the prompt has {int(visual.sum())} pads")
            x[visual] = features.to(x.dtype)
        vision = self.config.vision
        time_steps = None
        if vision.model_type == "qwen2_5_vl" and grid_thw is not None:
            seconds = getattr(inputs, "second_per_grid_ts", None)
            seconds = [1.0] * len(grid_thw) if seconds is None else torch.as_tensor(seconds).flatten().tolist()
            time_steps = [vision.tokens_per_second * s for s in seconds]
        pos = rope_index(ids, grid_thw, (self.config.video_token_id, self.config.image_token_id),
                         vision.spatial_merge_size, time_steps)
        return x, pos.to(self.device)

    def prefill(self, embeds: torch.Tensor, pos: torch.Tensor, cache: KVCache, row: int = 0, query_rows=None):
        """Run one prompt through the model, filling `cache` row `row` (the caller sets its length).

        Returns the final-norm hidden states [L, dim] and, if `query_rows` is given, each layer's rotated queries
        at those prompt positions ([n_rows, Hq, D] per layer) for scoring the cache afterwards.
        """
        cos, sin = self.rope(pos)
        x, queries = embeds[None], []
        for i, layer in enumerate(self.layers):
            x, q = layer.prefill(x, cos[None, :, None], sin[None, :, None], cache.k[i], cache.v[i], row, query_rows)
            queries.append(q)
        return self.norm(x[0]), (queries if query_rows is not None else None)

    def step(self, tokens, pos, cache: KVCache, n_layers: int | None = None, mirror: KVCache | None = None,
             layer_fn=Block.forward):
        """tokens, pos [B, T] -> logits [B, T, vocab]; writes the tokens' keys/values, leaves `lengths` alone.

        Generated tokens are text: one position on all three M-RoPE axes. With `n_layers`, exit early after that
        many layers. With `mirror`, the keys/values are also written to that cache at its own lengths.
        `layer_fn(block, x, pos, inv_freq, cache, mirror, next_norm_weight)` runs one layer: std.py passes
        Block.forward compiled.
        """
        inv_freq = self.inv_freq()
        x = self.embed_tokens(tokens)
        layers = self.layers[:n_layers]
        norms = [layer.input_norm for layer in layers] + [self.norm]  # the norm before each layer, then the head's
        fused = x.is_cuda and all(layer.fusable() for layer in layers) and kernels.readable(self.lm_head)
        if fused:
            x = kernels.pending_norm(x, norms[0].weight, norms[0].eps)
        for i, layer in enumerate(layers):
            x = layer_fn(layer, x, pos, inv_freq, cache.layer(i), mirror.layer(i) if mirror is not None else None,
                         norms[i + 1].weight)
        if fused:
            return kernels.linear(x, kernels.weights_of(self.lm_head))
        return self.lm_head(self.norm(x))

    def forward(self, inputs) -> torch.Tensor:
        """Logits [L, vocab] at every position of one prompt."""
        embeds, pos = self.embed(inputs)
        hidden, _ = self.prefill(embeds, pos, self.new_cache(1, embeds.shape[0]))
        return self.lm_head(hidden)
