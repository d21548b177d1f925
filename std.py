"""Sparse-to-Dense decoding: lossless self-speculative decoding for long video prompts.

    result = generate(model, inputs, max_new_tokens=256, k=1024, gamma=6)
    result.tokens, result.stats.acceptance_rate

Once, after prefill: for every layer and KV head, score each prunable prompt position (by default the visual tokens)
by the attention the prompt's text gives it, and copy the keys/values of the top k, with all of the text, into a
small draft cache. Then rounds of
    draft:  gamma greedy tokens from the same model attending only to the draft cache;
    verify: one dense forward over [last token, drafts] with the full cache. Keep the longest prefix of drafts equal
            to the dense argmax, then the dense model's own next token; both caches roll back past the rest, and
            the draft cache takes the verifier's keys/values of the kept tokens.
Every emitted token is the dense model's argmax given all tokens before it, so the output is dense greedy decoding
(in exact arithmetic; test_std.py checks it token for token in float64).

Other drafts (`draft=`), equally lossless since the dense verifier decides every token:
    "topk-int8", "topk-int4"  the top-k draft through weight-only quantized copies of the linear layers
    "streaming"               the first 4 and the last k-4 prunable positions instead of the top k (StreamingLLM)
    "layerskip"               the first `exit_layer` layers with the full cache, then the final norm and head

On a GPU the dense step, the gamma draft steps and the verify step are each one CUDA graph over torch.compile'd
layers: a round is two graph launches and one small read back to the host.
"""
import copy
import math
import time
import weakref
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from model import Block, KVCache, Qwen2VL, decode_rows, small_linear

DRAFTS = ("topk", "topk-int8", "topk-int4", "streaming", "layerskip")
STREAMING_SINKS = 4  # StreamingLLM keeps the first 4 tokens: they soak up attention whatever they hold


@dataclass
class Stats:
    drafted: int = 0  # drafts judged by the verifier (if the output ends inside a round, those before its end)
    accepted: int = 0
    rounds: int = 0  # dense forwards that emitted tokens: the prefill, then each verification (or dense step)
    vision_s: float = 0.0  # vision encoder and embedding
    prefill_s: float = 0.0  # language-model prefill
    select_s: float = 0.0  # scoring, top-k and building the draft cache
    capture_s: float = 0.0  # torch.compile warm-up and CUDA graph capture (GPU only)
    draft_s: float = 0.0
    verify_s: float = 0.0  # dense decoding counts its steps here: a dense step verifies zero drafts
    # The times are the whole batch's: every sequence of a batch shares its prefill and each decode step.

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens a verification emits (the prefill's token aside): the paper's mean accepted length."""
        return (self.accepted + self.rounds - 1) / (self.rounds - 1) if self.rounds > 1 else float("nan")


@dataclass
class Result:
    tokens: list[int]  # new tokens, up to and including the first stop token; len(tokens) == accepted + rounds
    stats: Stats


# ---------------------------------------------------------------------------------------------- selection


def score_prompt(queries: list[torch.Tensor], cache: KVCache, row: int, query_rows: torch.Tensor, length: int):
    """Per layer, [Hkv, length]: the attention each prompt position gets from the query rows.

    Softmax over all keys each query sees (causal), in float32 or better, summed over the queries and over the
    query heads that share a KV head. Only the query rows are computed (rows x prompt, never prompt x prompt),
    and the cache is only read.
    """
    scores = []
    for q, keys in zip(queries, cache.k):
        n_q, n_heads, D = q.shape
        dtype = torch.promote_types(keys.dtype, torch.float32)
        keys_t = keys[row, :, :length].transpose(-1, -2)[:, None].to(dtype)  # [Hkv, 1, D, L]
        n_kv = keys_t.shape[0]
        total = torch.zeros(n_kv, length, device=keys.device, dtype=dtype)
        q = q.view(n_q, n_kv, -1, D).permute(1, 2, 0, 3)  # [Hkv, group, rows, D]
        chunk = max(1, 2**26 // (n_heads * length))  # rows per pass: [heads, rows, L] float32 logits near 256 MB
        for r in range(0, n_q, chunk):
            logits = q[:, :, r : r + chunk].to(dtype) @ keys_t / math.sqrt(D)
            future = torch.arange(length, device=keys.device) > query_rows[r : r + chunk, None]
            total += logits.masked_fill(future, float("-inf")).softmax(-1).sum((1, 2))
        scores.append(total)
    return scores


def top_positions(scores: torch.Tensor, selectable: torch.Tensor, k: int) -> torch.Tensor:
    """[Hkv, L] scores -> [Hkv, min(k, n_selectable)] selectable positions, best first; ties go to the earlier."""
    n = min(k, int(selectable.sum()))
    ranked = scores.masked_fill(~selectable, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    return ranked[:, :n]


def streaming_positions(selectable: torch.Tensor, k: int) -> torch.Tensor:
    """The first few prunable positions (attention sinks) and the most recent rest of the budget."""
    positions = selectable.nonzero().flatten()
    if k >= len(positions):
        return positions
    sinks = min(STREAMING_SINKS, k)
    return torch.cat([positions[:sinks], positions[len(positions) - (k - sinks) :]])


def fill_draft_row(draft: KVCache, dense: KVCache, row: int, kept: list[torch.Tensor], always: torch.Tensor):
    """Copy the kept positions (per layer, [Hkv, K]) and the always-kept ones into `draft` row `row`, prompt order."""
    for i, positions in enumerate(kept):
        positions = torch.cat([positions, always.expand(positions.shape[0], -1)], dim=1).sort(dim=1).values
        index = positions[..., None].expand(-1, -1, draft.k[i].shape[-1])
        n = positions.shape[1]
        draft.k[i][row, :, :n] = dense.k[i][row].gather(1, index)
        draft.v[i][row, :, :n] = dense.v[i][row].gather(1, index)


# ---------------------------------------------------------------------------------------------- quantized drafts


class Int8Linear(nn.Module):
    """Weight-only int8, one scale per output row.

    A decode step's few rows go through model.small_linear. At the 7B shape on an H100 it reads int8 weights at
    2.1-2.2 TB/s for 1 or 4 rows; PyTorch's `_weight_int8pack_mm` manages 0.07-0.11 TB/s, and gpt-fast's compiled
    `F.linear(x, w.to(x.dtype)) * scale` is about as fast at one row but drops to 0.5 TB/s at four
    (`bench.py --kernels`, BENCHMARKS.md section 5).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_rows(x):
            return small_linear(x, self.weight, self.bias, self.scale)
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


_quantized = weakref.WeakKeyDictionary()  # model -> {bits: drafter}, built once per model


def quantized_drafter(model: Qwen2VL, bits: int) -> Qwen2VL:
    """The model with int8/int4 copies of its decoder and head linears; embeddings and norms are shared."""
    drafters = _quantized.setdefault(model, {})
    if bits not in drafters:
        quantize = Int8Linear if bits == 8 else Int4Linear

        def copy_with_quantized_linears(module: nn.Module) -> nn.Module:
            clone = copy.copy(module)
            clone._modules = {name: quantize(child) if isinstance(child, nn.Linear)
                              else copy_with_quantized_linears(child) for name, child in module._modules.items()}
            return clone

        drafter = copy.copy(model)
        drafter._modules = {**model._modules, "layers": copy_with_quantized_linears(model.layers),
                            "lm_head": quantize(model.lm_head)}
        drafters[bits] = drafter
    return drafters[bits]


def extra_bytes(model: Qwen2VL, draft: str) -> int:
    """Memory a draft kind adds on top of the model (its caches aside)."""
    if draft not in ("topk-int8", "topk-int4"):
        return 0
    drafter = quantized_drafter(model, 8 if draft == "topk-int8" else 4)
    return sum(b.nbytes for b in drafter.layers.buffers()) + sum(b.nbytes for b in drafter.lm_head.buffers())


# ---------------------------------------------------------------------------------------------- decoding steps


@dataclass
class Draft:
    """How drafts are made: which weights, over which cache, through how many layers."""

    model: Qwen2VL  # the model itself, or a copy with quantized linear layers
    cache: KVCache
    n_layers: int | None = None  # layerskip exits early
    mirror: bool = True  # verify writes its keys/values into `cache` too (not when it is the dense cache's view)


class DecodeState:
    """What decoding carries between steps, in persistent tensors so that each step can be one CUDA graph."""

    def __init__(self, first: list[int], next_pos: list[int], gamma: int, device):
        B = len(first)
        self.last = torch.tensor(first, device=device)  # [B] newest token, not yet in any cache
        self.pos = torch.tensor(next_pos, device=device)  # [B] its M-RoPE position (text: same on all axes)
        self.active = torch.ones(B, dtype=torch.bool, device=device)  # finished sequences stop moving
        self.drafts = torch.zeros(B, gamma, dtype=torch.long, device=device)
        self.report = torch.zeros(B, gamma + 2, dtype=torch.long, device=device)  # drafts, accepted, next token


def dense_step(model: Qwen2VL, dense: KVCache, s: DecodeState, layer_fn) -> torch.Tensor:
    token = model.decode(s.last[:, None], s.pos[:, None], dense, layer_fn=layer_fn)[:, 0].argmax(-1)
    dense.lengths += s.active
    s.pos += s.active
    s.last.copy_(torch.where(s.active, token, s.last))
    return s.last


def draft_steps(draft: Draft, s: DecodeState, gamma: int, layer_fn) -> None:
    token = s.last
    for i in range(gamma):
        logits = draft.model.decode(token[:, None], (s.pos + i)[:, None], draft.cache, draft.n_layers,
                                    layer_fn=layer_fn)
        token = logits[:, 0].argmax(-1)
        draft.cache.lengths += 1
        s.drafts[:, i] = token
    draft.cache.lengths -= gamma  # the verify step rewrites these slots with the dense model's keys/values


def verify_step(model: Qwen2VL, dense: KVCache, draft: Draft, s: DecodeState, gamma: int, layer_fn):
    tokens = torch.cat([s.last[:, None], s.drafts], dim=1)  # [B, gamma + 1]
    positions = s.pos[:, None] + torch.arange(gamma + 1, device=tokens.device)
    mirror = draft.cache if draft.mirror else None
    target = model.decode(tokens, positions, dense, mirror=mirror, layer_fn=layer_fn).argmax(-1)
    accepted = (s.drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    following = target.gather(1, accepted[:, None])[:, 0]
    step = (accepted + 1) * s.active
    dense.lengths += step
    draft.cache.lengths += step
    s.pos += step
    s.last.copy_(torch.where(s.active, following, s.last))
    s.report[:, :gamma] = s.drafts
    s.report[:, gamma] = accepted
    s.report[:, gamma + 1] = following
    return s.report


_compiled_layer = None


def compiled_layer():
    """Block.forward compiled once: every layer (and every quantized copy) reuses it, its weights being inputs."""
    global _compiled_layer
    if _compiled_layer is None:
        # One entry per shape (T, batch) and layer structure; sweeps over gamma and batch need more than the default.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_layer = torch.compile(Block.forward, fullgraph=True, dynamic=False)
    return _compiled_layer


def cuda_graph(fn, state: list[torch.Tensor], pool):
    """Record `fn` (which reads and writes only persistent tensors) as one CUDA graph; return its replay."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up; writes land in unfilled cache slots, the state is restored below
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def make_steps(model, dense: KVCache, draft: Draft | None, state: DecodeState, gamma: int, compile: bool) -> dict:
    """The step functions of a decode; with `compile`, each is a CUDA graph of compiled layers."""
    layer_fn = compiled_layer() if compile else Block.forward
    if draft is None:
        steps = {"dense": lambda: dense_step(model, dense, state, layer_fn)}
    else:
        steps = {"draft": lambda: draft_steps(draft, state, gamma, layer_fn),
                 "verify": lambda: verify_step(model, dense, draft, state, gamma, layer_fn)}
    if not compile:
        return steps
    caches = [dense] + ([draft.cache] if draft is not None and draft.mirror else [])
    for cache in caches:
        for t in cache.k + cache.v:
            torch._dynamo.mark_dynamic(t, 2)  # one compiled layer serves every cache capacity
    persistent = [dense.lengths, state.last, state.pos] + ([draft.cache.lengths] if draft is not None else [])
    pool = torch.cuda.graph_pool_handle()
    return {name: cuda_graph(fn, persistent, pool) for name, fn in steps.items()}


class Clock:
    """Phase times without stalling the GPU: CUDA events are recorded in the stream and read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, phase: str, start, end) -> None:
        self.spans.append((phase, start, end))

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for phase, start, end in self.spans:
            out[phase] = out.get(phase, 0.0) + (start.elapsed_time(end) / 1e3 if self.cuda else end - start)
        return out


# ---------------------------------------------------------------------------------------------- generate


def cache_room(max_new_tokens: int, gamma: int | None) -> int:
    """Free slots a decode needs past the prompt: a verify writes gamma + 1 slots past a length that may already be
    gamma past the last accepted token; dense decoding writes one slot past its last token."""
    return max_new_tokens + (2 * (gamma + 1) if gamma else 1)


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def resolve_draft(model, k, gamma, draft, exit_layer):
    """Check the decoding arguments; -> (draft kind or None for dense decoding, exit_layer)."""
    positive_int("gamma", gamma)
    if draft is None:
        draft = "topk" if k is not None else None
    if draft is None:
        if exit_layer is not None:
            raise ValueError("exit_layer is for draft='layerskip'")
        return None, None
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {', '.join(DRAFTS)}; got {draft!r}")
    if draft != "layerskip":
        if k is None:
            raise ValueError(f"draft={draft!r} needs k, the prunable positions it keeps")
        positive_int("k", k)
        if exit_layer is not None:
            raise ValueError("exit_layer is for draft='layerskip'")
        return draft, None
    if k is not None:
        raise ValueError("draft='layerskip' attends to the full cache: leave k=None")
    n = model.config.n_layers
    exit_layer = n // 2 if exit_layer is None else exit_layer
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < n:
        raise ValueError(f"exit_layer must be an int in [1, {n}), got {exit_layer!r}")
    return draft, exit_layer


def selectable_masks(model, batch, select, need_text_after: bool) -> list[torch.Tensor]:
    selects = select if isinstance(select, (list, tuple)) else [select] * len(batch)
    if len(selects) != len(batch):
        raise ValueError(f"{len(selects)} select masks for {len(batch)} inputs")
    masks = []
    for inputs, mask in zip(batch, selects):
        L = inputs.input_ids.shape[0]
        if mask is None:
            mask = model.visual_mask(inputs.input_ids)
        elif mask.dtype != torch.bool or mask.shape != (L,):
            raise ValueError(f"select must be a bool tensor of the prompt's shape ({L},), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        mask = mask.to(model.device)
        if need_text_after:
            if not mask.any():
                raise ValueError("the prompt has no visual tokens to prune: pass select= to mark prunable positions "
                                 "(a long document, say), or k=None for dense decoding")
            if mask[int(mask.nonzero()[0]) :].all():
                raise ValueError("no text follows the prunable positions, so nothing scores them")
        masks.append(mask)
    return masks


@dataclass
class Prefill:
    """A batch of prompts after prefill: any number of decodes (dense, or any draft, k and gamma) start from it."""

    model: Qwen2VL
    dense: KVCache  # row b holds prompt b; decoding writes past the prompts, so each decode starts over from them
    lengths: list[int]
    masks: list[torch.Tensor]  # prunable prompt positions
    first: list[int]  # each prompt's first new token, from the prefill
    next_pos: list[int]  # the M-RoPE position of that token
    queries: list | None  # per prompt, per layer: rotated queries of the text after the first prunable position
    query_rows: list | None  # per prompt: the prompt positions those queries sit at
    vision_s: float
    prefill_s: float


def prefill(model: Qwen2VL, inputs, room: int, select=None, score: bool = True) -> Prefill:
    """Prefill every prompt into one dense cache with `room` free slots past the longest.

    With `score`, keep what top-k selection needs (it then requires text after the prunable positions).
    """
    batch = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not batch:
        raise ValueError("no inputs")
    positive_int("room", room)
    masks = selectable_masks(model, batch, select, need_text_after=score)
    device = model.device
    with torch.inference_mode():
        clock = Clock(device)
        t0 = clock.mark()
        prompts = [model.embed(x) for x in batch]
        t1 = clock.mark()
        lengths = [embeds.shape[0] for embeds, _ in prompts]
        dense = model.new_cache(len(batch), max(lengths) + room)
        first, next_pos, queries, query_rows = [], [], [], []
        for row, ((embeds, pos), mask) in enumerate(zip(prompts, masks)):
            rows = None
            if score:  # the text after the first prunable position scores the prunable positions
                rows = (~mask & (torch.arange(len(mask), device=device) > mask.nonzero()[0])).nonzero().flatten()
            hidden, q = model.prefill(embeds, pos, dense, row, rows)
            first.append(int(model.lm_head(hidden[-1]).argmax()))
            next_pos.append(int(pos.max()) + 1)
            queries.append(q)
            query_rows.append(rows)
        dense.lengths.copy_(torch.tensor(lengths))
        clock.add("vision", t0, t1)
        clock.add("prefill", t1, clock.mark())
        times = clock.totals()
    return Prefill(model, dense, lengths, masks, first, next_pos, queries if score else None,
                   query_rows if score else None, times["vision"], times["prefill"])


def decode(p: Prefill, max_new_tokens: int, k: int | None = None, gamma: int = 6, draft: str | None = None,
           exit_layer: int | None = None, compile: bool | None = None) -> list[Result]:
    """Decode every prompt of `p` greedily: densely, or drafting with `draft` (see generate)."""
    model = p.model
    positive_int("max_new_tokens", max_new_tokens)
    kind, exit_layer = resolve_draft(model, k, gamma, draft, exit_layer)
    if kind in ("topk", "topk-int8", "topk-int4") and p.queries is None:
        raise ValueError("this prefill kept no text queries (score=False): top-k selection needs them")
    room = cache_room(max_new_tokens, gamma if kind else None)
    if max(p.lengths) + room > p.dense.capacity:
        raise ValueError(f"the prefill left room for {p.dense.capacity - max(p.lengths)} tokens, this decode needs "
                         f"{room}")
    if kind not in (None, "layerskip") and not all(mask.any() for mask in p.masks):
        raise ValueError(f"draft={kind!r} prunes, and a prompt has no prunable positions: pass select=, or k=None")
    compile = model.device.type == "cuda" if compile is None else compile
    if compile and model.device.type != "cuda":
        raise ValueError("compile=True captures CUDA graphs and needs the model on a GPU")
    with torch.inference_mode():
        return _decode(p, max_new_tokens, k, gamma, kind, exit_layer, compile)


def generate(model: Qwen2VL, inputs, max_new_tokens: int, k: int | None = None, gamma: int = 6, select=None,
             draft: str | None = None, exit_layer: int | None = None, compile: bool | None = None):
    """Greedy decoding; with `k`, Sparse-to-Dense (the same tokens, drafted cheaply and verified densely).

    inputs: an object with input_ids [L], pixel_values, grid_thw (see load.Processor), or a list of them (a batch).
    k: prunable positions kept per layer and KV head in the draft cache (None: plain dense decoding).
    gamma: tokens drafted per verification.
    select: bool mask [L] of the prompt positions that may be pruned (default: the visual tokens), or a list.
    draft: one of DRAFTS (default "topk" when k is given); "layerskip" takes exit_layer (default: half the layers).
    compile: torch.compile + CUDA graphs for the decode steps (default: on a GPU).
    Returns a Result (a list of them for a list of inputs), tokens stopping at the first stop token.

    No silent fallback to dense decoding: a pruning draft on a prompt with nothing to prune (no visual tokens and no
    `select`) raises ValueError, and so does top-k when no text follows the prunable positions (only the text
    after them scores them). Pass k=None to decode such prompts densely.
    """
    positive_int("max_new_tokens", max_new_tokens)
    kind, _ = resolve_draft(model, k, gamma, draft, exit_layer)
    p = prefill(model, inputs, cache_room(max_new_tokens, gamma if kind else None), select,
                score=kind in ("topk", "topk-int8", "topk-int4"))
    results = decode(p, max_new_tokens, k, gamma, draft, exit_layer, compile)
    return results if isinstance(inputs, (list, tuple)) else results[0]


def _decode(p: Prefill, max_new_tokens, k, gamma, kind, exit_layer, compile):
    model, dense, device = p.model, p.dense, p.model.device
    stops = set(model.config.stop_token_ids)
    dense.lengths.copy_(torch.tensor(p.lengths))  # start from the prompts, whatever an earlier decode wrote
    clock = Clock(device)
    draft = None
    if kind is not None:
        t0 = clock.mark()
        draft = build_draft(model, kind, p, k, exit_layer, cache_room(max_new_tokens, gamma))
        clock.add("select", t0, clock.mark())

    results = [Result([token], Stats(rounds=1, vision_s=p.vision_s, prefill_s=p.prefill_s)) for token in p.first]
    state = DecodeState(p.first, p.next_pos, gamma, device)
    for row, token in enumerate(p.first):
        if token in stops or max_new_tokens == 1:
            state.active[row] = False
    active = [bool(a) for a in state.active.tolist()]

    start = time.perf_counter()
    steps = make_steps(model, dense, draft, state, gamma, compile and any(active))
    capture_s = time.perf_counter() - start if compile else 0.0

    while any(active):
        if draft is None:
            t0 = clock.mark()
            report = steps["dense"]()
            clock.add("verify", t0, clock.mark())
            new = [[token] for token in report.tolist()]
        else:
            t0 = clock.mark()
            steps["draft"]()
            t1 = clock.mark()
            report = steps["verify"]()
            clock.add("draft", t0, t1)
            clock.add("verify", t1, clock.mark())
            new = [r[: r[gamma]] + [r[gamma + 1]] for r in report.tolist()]  # the one read back of a round
        for row, tokens in enumerate(new):
            if not active[row]:
                continue
            result, stats = results[row], results[row].stats
            # The round's tokens up to and including the first stop token, within the budget.
            room = max_new_tokens - len(result.tokens)
            kept = next((n for n, token in enumerate(tokens[:room], 1) if token in stops), min(len(tokens), room))
            result.tokens += tokens[:kept]
            if result.tokens[-1] in stops or len(result.tokens) == max_new_tokens:
                active[row] = False
                state.active[row] = False
            stats.rounds += 1
            if draft is not None:
                # Output cut inside the accepted drafts: its last token counts as the round's own (it equals the
                # dense argmax), so only the drafts before it were judged. Then tokens == accepted + rounds.
                judged = gamma if kept == len(tokens) else kept - 1
                stats.drafted += judged
                stats.accepted += min(judged, len(tokens) - 1)

    times = clock.totals()
    for r in results:
        r.stats.capture_s = capture_s
        for phase, seconds in times.items():
            setattr(r.stats, f"{phase}_s", seconds)
    return results


def build_draft(model, kind, p: Prefill, k, exit_layer, room) -> Draft:
    """The draft of each sequence; `room` is the space its cache needs beyond the kept prompt positions."""
    if kind == "layerskip":
        return Draft(model, p.dense.first_layers(exit_layer), n_layers=exit_layer, mirror=False)
    n_kv = model.config.n_kv_heads
    kept = []
    for row, (mask, n) in enumerate(zip(p.masks, p.lengths)):
        if kind == "streaming":
            kept.append([streaming_positions(mask, k).expand(n_kv, -1)] * model.config.n_layers)
        else:
            scores = score_prompt(p.queries[row], p.dense, row, p.query_rows[row], n)
            kept.append([top_positions(s, mask, k) for s in scores])
    sizes = [kept_row[0].shape[1] + int((~mask).sum()) for kept_row, mask in zip(kept, p.masks)]
    cache = model.new_cache(len(p.lengths), max(sizes) + room)
    for row, (kept_row, mask) in enumerate(zip(kept, p.masks)):
        fill_draft_row(cache, p.dense, row, kept_row, (~mask).nonzero().flatten())
    cache.lengths.copy_(torch.tensor(sizes))
    drafter = quantized_drafter(model, 8 if kind == "topk-int8" else 4) if kind.startswith("topk-int") else model
    return Draft(drafter, cache)
