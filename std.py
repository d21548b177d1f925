"""Sparse-to-Dense decoding: lossless self-speculative decoding for long video prompts.

    result = generate(model, inputs, max_new_tokens=256, k=1024, gamma=6)
    result.tokens, result.stats.acceptance_rate

The algorithm. Once, after prefill: for every layer and KV head, score each prunable prompt position (by default
the visual tokens) by the attention the text after them pays it, and copy the keys/values of the top k, with all
of the text, into a small draft cache. Then rounds of
    draft:  gamma greedy tokens from the same model attending only to the draft cache;
    verify: one dense forward over [last token, drafts] with the full cache. Keep the longest prefix of drafts equal
            to the dense argmax, then the dense model's own next token; both caches roll back past the rest, and
            the draft cache takes the verifier's keys/values of the kept tokens.
Every emitted token is the dense model's argmax given all tokens before it, so the output is dense greedy decoding
(in exact arithmetic; test_std.py checks it token for token in float64). On a GPU also in bfloat16: the decode
kernels are batch-invariant (kernels.py), so a verify pass computes each token bit for bit as a dense step would.

Other drafts (`draft=`), equally lossless since the dense verifier decides every token:
    "topk-int8", "topk-int4"  the top-k draft through weight-only quantized copies of the linear layers (quant.py)
    "streaming"               the first 4 and the last k-4 prunable positions instead of the top k (StreamingLLM)
    "layerskip"               the first `exit_layer` layers with the full cache, then the final norm and head
    "sibling"                 a smaller model of the same family (`draft_model=`) over k of the video tokens, chosen
                              by the dense model's attention (SpecVLM, Ji et al., EMNLP 2025): a draft that reads a
                              fraction of the weights

On a GPU the dense step, the gamma draft steps and the verify step are each one CUDA graph over torch.compile'd
layers: a round is two graph launches and one small read back to the host.

This file reads top-down: generate, prefill, decode and the round loop; how a draft is built (selection); the three
steps (dense, draft, verify); then the plumbing (CUDA graphs, timing, argument checks).

What it needs from a model (model.Qwen2VL has all of it; another model with the same can be plugged in):
    model.config                .n_layers, .stop_token_ids
    model.partial_sums          None, or (tensor parallel) the sum of a tensor over the ranks
    model.device
    model.embed(inputs)         -> embeddings [L, dim], positions [3, L] (M-RoPE's t, h, w axes)
    model.visual_mask(ids [L])  -> bool [L]: the positions pruned unless `prunable=` says otherwise
    model.new_cache(B, S, invariant=True)
                                -> a cache: .k, .v (per layer [B, Hkv, S, D]), .lengths [B], .capacity,
                                   .first_layers(n) (a view of the first n layers with lengths of its own);
                                   invariant=False for a draft's, whose attention need not be batch-invariant
    model.prefill(embeds, pos, cache, row, query_rows)
                                -> final hidden states [L, dim], and per layer the rotated queries [rows, Hq, D] at
                                   query_rows; fills cache row `row` (the caller sets its length)
    model.lm_head(hidden)       -> logits
    model.step(tokens [B, T], pos [B, T], cache, n_layers=None, mirror=None, layer_fn=...)
                                -> logits [B, T, vocab]: new tokens against the cache, their keys/values written at
                                   each row's length (and into `mirror`), lengths untouched
    model.layers                the step's layers; it runs each as layer_fn(layer, ...), and std compiles that
                                function (the layer class's forward) once for a GPU
"""
import functools
import math
import time
from dataclasses import dataclass, field

import torch

DRAFTS = ("topk", "topk-int8", "topk-int4", "streaming", "layerskip", "sibling")
SCORED = ("topk", "topk-int8", "topk-int4", "sibling")  # the drafts that choose their positions by attention
QUANTIZED_BITS = {"topk-int8": 8, "topk-int4": 4}
STREAMING_SINKS = 4  # StreamingLLM keeps the first 4 tokens: they soak up attention whatever they hold
SIBLING_MASS = 0.4  # SpecVLM's Stage I: the most attended prunable positions until they hold this share of attention
SIBLING_SHARE = 0.1  # the sibling's budget when k is not given: this share of each prompt's prunable positions


@dataclass
class Stats:
    drafted: int = 0  # drafts judged by the verifier (if the output ends inside a round, those before its end)
    accepted: int = 0
    rounds: int = 0  # verifications (a dense step is a verification of zero drafts); the prefill is not one
    vision_s: float = 0.0  # vision encoder and embedding
    prefill_s: float = 0.0  # language-model prefill
    select_s: float = 0.0  # scoring, top-k and building the draft cache
    capture_s: float = 0.0  # torch.compile warm-up and CUDA graph capture (GPU only)
    draft_s: float = 0.0
    verify_s: float = 0.0  # dense decoding counts its steps here
    # The times are the whole batch's: every sequence of a batch shares its prefill and each decode step.

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens a verification emits: the paper's mean accepted length."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


@dataclass
class Result:
    tokens: list[int]  # new tokens, up to and including the first stop token; len(tokens) == 1 + accepted + rounds
    stats: Stats  # (the first token comes from the prefill)


# ---------------------------------------------------------------------------------------------- generate


def generate(model, inputs, max_new_tokens: int, k: int | None = None, gamma: int = 6, prunable=None,
             draft: str | None = None, exit_layer: int | None = None, compiled: bool | None = None,
             draft_model=None):
    """Greedy decoding; with `k`, Sparse-to-Dense (the same tokens, drafted cheaply and verified densely).

    inputs: an object with input_ids [L], pixel_values, grid_thw (see load.Inputs), or a list of them (a batch).
    k: prunable positions kept per layer and KV head in the draft cache (None: plain dense decoding); for
       draft="sibling", per prompt, and None keeps SIBLING_SHARE of them.
    gamma: tokens drafted per verification.
    prunable: bool mask [L] of the prompt positions the draft may drop (default: the visual tokens), or a list.
    draft: one of DRAFTS (default "topk" when k is given); "layerskip" takes exit_layer (default: half the layers);
        "sibling" takes draft_model, a smaller model of the same family and tokenizer.
    compiled: torch.compile + CUDA graphs for the decode steps (default: on a GPU).
    Returns a Result (a list of them for a list of inputs), tokens stopping at the first stop token.

    No silent fallback to dense decoding: a pruning draft on a prompt with nothing to prune (no visual tokens and no
    `prunable`) raises ValueError, and so does top-k when no text follows the prunable positions (only the text
    after them scores them). Pass k=None to decode such prompts densely.
    """
    positive_int("max_new_tokens", max_new_tokens)
    draft, _ = check_draft(model, k, gamma, draft, exit_layer, draft_model)
    room = cache_room(max_new_tokens, gamma if draft else None)
    p = prefill(model, inputs, room, prunable, score=draft in SCORED)
    results = decode(p, max_new_tokens, k, gamma, draft, exit_layer, compiled, draft_model)
    return results if isinstance(inputs, (list, tuple)) else results[0]


@dataclass
class Prefill:
    """A batch of prompts after prefill: any number of decodes (dense, or any draft, k and gamma) start from it."""

    model: object
    inputs: list  # the prompts
    positions: list[torch.Tensor]  # per prompt, its M-RoPE positions [3, L]
    dense: object  # the KV cache; row b holds prompt b, and each decode starts over from the prompts
    lengths: list[int]
    prunable: list[torch.Tensor]  # per prompt, bool [L]
    first: list[int]  # each prompt's first new token, from the prefill
    next_pos: list[int]  # the M-RoPE position of that token
    queries: list | None  # per prompt, per layer: rotated queries of the text after the first prunable position
    query_rows: list | None  # per prompt: the prompt positions those queries sit at
    vision_s: float
    prefill_s: float
    quantized: dict = field(default_factory=dict)  # bits -> quantized copy of the model (see prefill)


def prefill(model, inputs, room: int, prunable=None, score: bool = True, quantized: dict | None = None) -> Prefill:
    """Prefill every prompt into one dense cache with `room` free slots past the longest.

    With `score`, keep what top-k selection needs (it then requires text after the prunable positions).
    quantized: bits -> quantized copy of the model, for the int8/int4 drafts. A decode that needs a copy makes it
    and adds it here, so pass the same dict to every prefill to quantize once (quantizing a 7B model takes seconds
    and gigabytes); by default each prefill starts with none.
    """
    batch = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not batch:
        raise ValueError("no inputs")
    positive_int("room", room)
    masks = prunable_masks(model, batch, prunable, need_text_after=score)
    device = model.device
    with torch.inference_mode():
        clock = Clock(device)
        t0 = clock.mark()
        prompts = [model.embed(x) for x in batch]
        t1 = clock.mark()
        lengths = [embeds.shape[0] for embeds, _ in prompts]
        dense = model.new_cache(len(batch), max(lengths) + room)
        first, next_pos, queries, query_rows, positions = [], [], [], [], []
        for row, ((embeds, pos), mask) in enumerate(zip(prompts, masks)):
            rows = None
            if score:  # the text after the first prunable position scores the prunable positions
                rows = (~mask & (torch.arange(len(mask), device=device) > mask.nonzero()[0])).nonzero().flatten()
            hidden, q = model.prefill(embeds, pos, dense, row, rows)
            first.append(int(model.lm_head(hidden[-1]).argmax()))
            next_pos.append(int(pos.max()) + 1)
            positions.append(pos)
            queries.append(q)
            query_rows.append(rows)
        dense.lengths.copy_(torch.tensor(lengths))
        clock.add("vision", t0, t1)
        clock.add("prefill", t1, clock.mark())
        times = clock.totals()
    return Prefill(model, batch, positions, dense, lengths, masks, first, next_pos, queries if score else None,
                   query_rows if score else None, times["vision"], times["prefill"],
                   {} if quantized is None else quantized)


def decode(p: Prefill, max_new_tokens: int, k: int | None = None, gamma: int = 6, draft: str | None = None,
           exit_layer: int | None = None, compiled: bool | None = None, draft_model=None) -> list[Result]:
    """Decode every prompt of `p` greedily: densely, or drafting with `draft` (see generate)."""
    model = p.model
    positive_int("max_new_tokens", max_new_tokens)
    draft, exit_layer = check_draft(model, k, gamma, draft, exit_layer, draft_model)
    if draft in SCORED and p.queries is None:
        raise ValueError("this prefill kept no text queries (score=False): top-k selection needs them")
    room = cache_room(max_new_tokens, gamma if draft else None)
    if max(p.lengths) + room > p.dense.capacity:
        raise ValueError(f"the prefill left room for {p.dense.capacity - max(p.lengths)} tokens, this decode needs "
                         f"{room}")
    if draft not in (None, "layerskip") and not all(mask.any() for mask in p.prunable):
        raise ValueError(f"draft={draft!r} prunes, and a prompt has no prunable positions: pass prunable=, or k=None")
    if draft == "sibling" and k is not None:
        for row, mask in enumerate(p.prunable):
            if k > int(mask.sum()):
                raise ValueError(f"k={k} is more than the {int(mask.sum())} prunable positions of prompt {row}: the "
                                 "sibling draft keeps k of them (k=None keeps a tenth)")
    compiled = model.device.type == "cuda" if compiled is None else compiled
    if compiled and model.device.type != "cuda":
        raise ValueError("compiled=True captures CUDA graphs and needs the model on a GPU")
    with torch.inference_mode():
        return decode_rounds(p, max_new_tokens, k, gamma, draft, exit_layer, compiled, draft_model)


def decode_rounds(p: Prefill, max_new_tokens, k, gamma, draft, exit_layer, compiled, draft_model) -> list[Result]:
    """The decode loop: a dense step per token, or a round of drafts and one verification, until every sequence
    has stopped. One small tensor is read back to the host per round: the tokens it emitted."""
    model, dense, device = p.model, p.dense, p.model.device
    stops = set(model.config.stop_token_ids)
    dense.lengths.copy_(torch.tensor(p.lengths))  # start from the prompts, whatever an earlier decode wrote
    clock = Clock(device)
    drafter = None
    if draft in QUANTIZED_BITS and QUANTIZED_BITS[draft] not in p.quantized:
        import quant  # only quantized drafts need it

        p.quantized[QUANTIZED_BITS[draft]] = quant.quantized_copy(model, QUANTIZED_BITS[draft])
    if draft is not None:
        t0 = clock.mark()
        drafter = build_drafter(p, draft, k, exit_layer, cache_room(max_new_tokens, gamma), draft_model)
        clock.add("select", t0, clock.mark())

    results = [Result([token], Stats(vision_s=p.vision_s, prefill_s=p.prefill_s)) for token in p.first]
    state = DecodeState(p.first, [int(x.input_ids[-1]) for x in p.inputs], p.next_pos, gamma, device)
    for row, token in enumerate(p.first):
        if token in stops or max_new_tokens == 1:
            state.active[row] = False
    active = [bool(a) for a in state.active.tolist()]

    start = time.perf_counter()
    steps = make_steps(model, dense, drafter, state, gamma, compiled and any(active))
    capture_s = time.perf_counter() - start if compiled else 0.0

    while any(active):
        if drafter is None:
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
            if drafter is not None:
                # Output cut inside the accepted drafts: its last token counts as the round's own (it equals the
                # dense argmax), so only the drafts before it were judged. Then tokens == 1 + accepted + rounds.
                judged = gamma if kept == len(tokens) else kept - 1
                stats.drafted += judged
                stats.accepted += min(judged, len(tokens) - 1)

    times = clock.totals()
    for r in results:
        r.stats.capture_s = capture_s
        for phase, seconds in times.items():
            setattr(r.stats, f"{phase}_s", seconds)
    return results


# ---------------------------------------------------------------------------------------------- building the draft


@dataclass
class Drafter:
    """What drafts: which weights, over which cache, through how many layers."""

    model: object  # the model itself, a copy with quantized linear layers, or a sibling model
    cache: object
    n_layers: int | None = None  # layerskip exits early
    mirror: bool = True  # verify writes its keys/values into `cache` too (not when it is the dense cache's view)
    # A sibling model computes its own keys/values, so the verifier's cannot be mirrored into its cache. Its cache ends
    # one token earlier instead, before the last accepted token, and each round's first draft step runs that token
    # again with the newest: when every draft was accepted, the last of them had never been through the sibling.
    sibling: bool = False


def build_drafter(p: Prefill, draft: str, k, exit_layer, room, draft_model=None) -> Drafter:
    """The drafter of every sequence of `p`; `room` is the space its cache needs past the kept prompt positions."""
    model = p.model
    if draft == "layerskip":
        return Drafter(model, p.dense.first_layers(exit_layer), n_layers=exit_layer, mirror=False)
    if draft == "sibling":
        return sibling_drafter(p, draft_model, k, room)
    kept = [kept_positions(p, row, draft, k) for row in range(len(p.lengths))]
    sizes = [kept_row[0].shape[1] + int((~mask).sum()) for kept_row, mask in zip(kept, p.prunable)]
    cache = model.new_cache(len(p.lengths), max(sizes) + room, invariant=False)  # only drafts read it
    for row, (kept_row, mask) in enumerate(zip(kept, p.prunable)):
        fill_draft_row(cache, p.dense, row, kept_row, (~mask).nonzero().flatten())
    cache.lengths.copy_(torch.tensor(sizes))
    return Drafter(p.quantized[QUANTIZED_BITS[draft]] if draft in QUANTIZED_BITS else model, cache)


def kept_positions(p: Prefill, row: int, draft: str, k: int) -> list[torch.Tensor]:
    """Per layer, [Hkv, min(k, n_prunable)]: the prunable positions of sequence `row` that its draft cache keeps."""
    mask, config = p.prunable[row], p.model.config
    if draft == "streaming":
        return [streaming_positions(mask, k).expand(p.dense.k[0].shape[1], -1)] * config.n_layers  # the cache's heads
    scores = score_prompt(p.queries[row], p.dense, row, p.query_rows[row], p.lengths[row])
    return [top_positions(s, mask, k) for s in scores]


def score_prompt(queries: list[torch.Tensor], cache, row: int, query_rows: torch.Tensor, length: int):
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


def top_positions(scores: torch.Tensor, prunable: torch.Tensor, k: int) -> torch.Tensor:
    """[Hkv, L] scores -> [Hkv, min(k, n_prunable)] prunable positions, best first; ties go to the earlier."""
    n = min(k, int(prunable.sum()))
    ranked = scores.masked_fill(~prunable, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    return ranked[:, :n]


def sibling_drafter(p: Prefill, draft_model, k: int | None, room: int) -> Drafter:
    """The sibling model prefilled on each prompt with only the kept prunable positions (and all the rest).

    Its own vision tower encodes the same pixels; the kept tokens keep the positions the dense model gives them, not
    positions renumbered 0, 1, 2, ... over the shorter prompt. With M-RoPE a video token's position is its (frame,
    row, column), and the text after the video continues from the largest of them: renumbering would show the
    sibling a different video layout and shift the text, and its drafts would follow a model nobody trained.
    """
    prompts = []
    for row, (inputs, mask, pos) in enumerate(zip(p.inputs, p.prunable, p.positions)):
        scores = sum(layer.sum(0) for layer in score_prompt(p.queries[row], p.dense, row, p.query_rows[row],
                                                            p.lengths[row]))
        if p.model.partial_sums is not None:  # tensor parallel: every rank's heads score, every rank keeps the same
            scores = p.model.partial_sums(scores)
        budget = k if k is not None else max(1, int(SIBLING_SHARE * int(mask.sum())))
        last = torch.tensor([len(mask) - 1], device=mask.device)  # always: the first draft step runs it again
        kept = torch.cat([sibling_positions(scores, mask, budget), (~mask).nonzero().flatten(), last]).unique()
        embeds, _ = draft_model.embed(inputs)
        prompts.append((embeds[kept], pos[:, kept]))
    cache = draft_model.new_cache(len(prompts), max(e.shape[0] for e, _ in prompts) + room, invariant=False)
    for row, (embeds, pos) in enumerate(prompts):
        draft_model.prefill(embeds, pos, cache, row)
    cache.lengths.copy_(torch.tensor([e.shape[0] - 1 for e, _ in prompts]))  # before the prompt's last token
    return Drafter(draft_model, cache, mirror=False, sibling=True)


def sibling_positions(scores: torch.Tensor, prunable: torch.Tensor, k: int, mass: float = SIBLING_MASS):
    """SpecVLM's selection of k prunable positions, sorted. scores [L]: the attention each position gets.

    Stage I: the best-scored positions (ties to the earlier), until they hold `mass` of the prunable positions'
    attention; at most k.
    Stage II: the rest of the budget, m picks evenly spaced over the n positions Stage I left, in prompt order (for a
    video, frame by frame in raster order): pick i is the floor(i (n - 1) / (m - 1))-th. SpecVLM computes these
    with torch.linspace in floating point, which truncates to one less now and then; here they are exact.
    """
    candidates = prunable.nonzero().flatten()
    ranked = scores[candidates].sort(descending=True, stable=True)
    held = ranked.values.cumsum(0)
    n_attended = min(k, int((held < mass * held[-1]).sum()) + 1)
    attended = candidates[ranked.indices[:n_attended]]
    rest = candidates[~torch.isin(candidates, attended)]
    m = k - n_attended
    spaced = rest[torch.arange(m, device=rest.device) * (len(rest) - 1) // max(m - 1, 1)]
    return torch.cat([attended, spaced]).sort().values


def streaming_positions(prunable: torch.Tensor, k: int) -> torch.Tensor:
    """The first few prunable positions (attention sinks) and the most recent rest of the budget."""
    positions = prunable.nonzero().flatten()
    if k >= len(positions):
        return positions
    sinks = min(STREAMING_SINKS, k)
    return torch.cat([positions[:sinks], positions[len(positions) - (k - sinks) :]])


def fill_draft_row(draft_cache, dense, row: int, kept: list[torch.Tensor], always: torch.Tensor):
    """Copy the kept positions (per layer, [Hkv, K]) and the always-kept ones into `draft_cache` row `row`, in prompt
    order. Keys keep the rotation of their original positions: a kept token is where the dense model saw it."""
    for i, positions in enumerate(kept):
        positions = torch.cat([positions, always.expand(positions.shape[0], -1)], dim=1).sort(dim=1).values
        index = positions[..., None].expand(-1, -1, draft_cache.k[i].shape[-1])
        n = positions.shape[1]
        draft_cache.k[i][row, :, :n] = dense.k[i][row].gather(1, index)
        draft_cache.v[i][row, :, :n] = dense.v[i][row].gather(1, index)


# ---------------------------------------------------------------------------------------------- the three steps


class DecodeState:
    """What decoding carries between steps, in persistent tensors so that each step can be one CUDA graph."""

    def __init__(self, first: list[int], prompt_last: list[int], next_pos: list[int], gamma: int, device):
        B = len(first)
        self.last = torch.tensor(first, device=device)  # [B] newest token, not yet in any cache
        self.prev = torch.tensor(prompt_last, device=device)  # [B] the token before it (see Drafter.sibling)
        self.pos = torch.tensor(next_pos, device=device)  # [B] its M-RoPE position (text: same on all axes)
        self.active = torch.ones(B, dtype=torch.bool, device=device)  # finished sequences stop moving
        self.drafts = torch.zeros(B, gamma, dtype=torch.long, device=device)
        self.report = torch.zeros(B, gamma + 2, dtype=torch.long, device=device)  # drafts, accepted, next token


def dense_step(model, dense, s: DecodeState, layer_fn) -> torch.Tensor:
    token = model.step(s.last[:, None], s.pos[:, None], dense, layer_fn=layer_fn)[:, 0].argmax(-1)
    dense.lengths += s.active
    s.pos += s.active
    s.last.copy_(torch.where(s.active, token, s.last))
    return s.last


def draft_steps(drafter: Drafter, s: DecodeState, gamma: int, layer_fn) -> None:
    tokens, positions = s.last[:, None], s.pos[:, None]
    if drafter.sibling:  # the token before too (see Drafter); a token the sibling's vocabulary lacks becomes its last
        tokens = torch.stack([s.prev, s.last], dim=1).clamp(max=drafter.model.config.vocab_size - 1)
        positions = s.pos[:, None] + torch.arange(-1, 1, device=s.pos.device)
    for i in range(gamma):
        logits = drafter.model.step(tokens, positions, drafter.cache, drafter.n_layers, layer_fn=layer_fn)
        token = logits[:, -1].argmax(-1)
        drafter.cache.lengths += tokens.shape[1]
        s.drafts[:, i] = token
        tokens, positions = token[:, None], positions[:, -1:] + 1
    # Back to where the round began: the verify step keeps what it accepts (and rewrites these slots with the dense
    # model's keys/values, unless the drafter is a sibling).
    drafter.cache.lengths -= gamma + drafter.sibling


def verify_step(model, dense, drafter: Drafter, s: DecodeState, gamma: int, layer_fn) -> torch.Tensor:
    tokens = torch.cat([s.last[:, None], s.drafts], dim=1)  # [B, gamma + 1]
    positions = s.pos[:, None] + torch.arange(gamma + 1, device=tokens.device)
    mirror = drafter.cache if drafter.mirror else None
    target = model.step(tokens, positions, dense, mirror=mirror, layer_fn=layer_fn).argmax(-1)
    accepted = (s.drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    following = target.gather(1, accepted[:, None])[:, 0]
    step = (accepted + 1) * s.active
    dense.lengths += step
    drafter.cache.lengths += step
    s.pos += step
    if drafter.sibling:  # the last accepted token, which the sibling's next round runs again (see Drafter)
        s.prev.copy_(torch.where(s.active, tokens.gather(1, accepted[:, None])[:, 0], s.prev))
    s.last.copy_(torch.where(s.active, following, s.last))
    s.report[:, :gamma] = s.drafts
    s.report[:, gamma] = accepted
    s.report[:, gamma + 1] = following
    return s.report


# ---------------------------------------------------------------------------------------------- plumbing


def make_steps(model, dense, drafter: Drafter | None, state: DecodeState, gamma: int, compiled: bool) -> dict:
    """The step functions of a decode; `compiled`: each is one CUDA graph of torch.compile'd layers."""
    layer_fn = compiled_layer(type(model.layers[0])) if compiled else type(model.layers[0]).forward
    if drafter is None:
        steps = {"dense": lambda: dense_step(model, dense, state, layer_fn)}
    else:
        steps = {"draft": lambda: draft_steps(drafter, state, gamma, layer_fn),
                 "verify": lambda: verify_step(model, dense, drafter, state, gamma, layer_fn)}
    if not compiled:
        return steps
    caches = [dense] + ([drafter.cache] if drafter is not None and drafter.mirror else [])
    for cache in caches:
        for t in cache.k + cache.v:
            torch._dynamo.mark_dynamic(t, 2)  # one compiled layer serves every cache capacity
    persistent = [dense.lengths, state.last, state.prev, state.pos] + (
        [drafter.cache.lengths] if drafter is not None else [])
    pool = torch.cuda.graph_pool_handle()
    # One compiled entry per (rows, batch, layer kind, first layer or not: the embeddings' squares come in one
    # piece): sweeps over gamma and batch need more than the default 8.
    with torch._dynamo.config.patch(recompile_limit=64):
        return {name: cuda_graph(fn, persistent, pool) for name, fn in steps.items()}


@functools.cache
def compiled_layer(layer_class):
    """layer_class.forward compiled once for the process: every layer and every quantized copy reuses it (weights
    are inputs). Dynamo caches compiled code per function and per compile call, so compiling anew for each decode
    would compile again each time."""
    return torch.compile(layer_class.forward, fullgraph=True, dynamic=False)


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


def cache_room(max_new_tokens: int, gamma: int | None) -> int:
    """Free slots a decode needs past the prompt: a verify writes gamma + 1 slots past a length that may already be
    gamma past the last accepted token; dense decoding writes one slot past its last token."""
    return max_new_tokens + (2 * (gamma + 1) if gamma else 1)


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_draft(model, k, gamma, draft, exit_layer, draft_model=None):
    """Check the decoding arguments; -> (draft kind, or None for dense decoding; exit_layer)."""
    positive_int("gamma", gamma)
    if draft is None:
        draft = "topk" if k is not None else None
    if draft_model is not None and draft != "sibling":
        raise ValueError(f"draft_model is for draft='sibling', not draft={draft!r}")
    if draft is None:
        if exit_layer is not None:
            raise ValueError("exit_layer is for draft='layerskip'")
        return None, None
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {', '.join(DRAFTS)}; got {draft!r}")
    if draft == "sibling":
        if exit_layer is not None:
            raise ValueError("exit_layer is for draft='layerskip'")
        if k is not None:
            positive_int("k", k)
        if draft_model is None:
            raise ValueError("draft='sibling' drafts with a smaller model of the same family: pass draft_model=")
        check_sibling(model.config, draft_model.config)
        if draft_model.device != model.device or draft_model.dtype != model.dtype:
            raise ValueError(f"the draft model is on {draft_model.device} in {draft_model.dtype}, the model on "
                             f"{model.device} in {model.dtype}")
        return draft, None
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


def check_sibling(config, draft_config) -> None:
    """A sibling drafts for a model only if it reads the same prompts: same family, same special tokens, a vocabulary
    that is a prefix of the model's (Qwen2-VL-2B has 151,936 logits, 7B 152,064: the ids past 2B's are padding)."""
    if config.vision.model_type != draft_config.vision.model_type:
        raise ValueError(f"the draft model is {draft_config.vision.model_type}, the model {config.vision.model_type}: "
                         "a sibling must be of the same family")
    special = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "stop_token_ids")
    differ = [f"{name} {getattr(draft_config, name)} != {getattr(config, name)}" for name in special
              if getattr(draft_config, name) != getattr(config, name)]
    if differ:
        raise ValueError("the draft model's special tokens differ from the model's: " + ", ".join(differ))
    if draft_config.vocab_size > config.vocab_size:
        raise ValueError(f"the draft model has {draft_config.vocab_size} logits, the model {config.vocab_size}: its "
                         "drafts could be ids the model lacks")


def prunable_masks(model, batch, prunable, need_text_after: bool) -> list[torch.Tensor]:
    """One bool mask [L] per prompt: `prunable` (one mask, or one per prompt), by default the visual tokens."""
    masks = prunable if isinstance(prunable, (list, tuple)) else [prunable] * len(batch)
    if len(masks) != len(batch):
        raise ValueError(f"{len(masks)} prunable masks for {len(batch)} inputs")
    out = []
    for inputs, mask in zip(batch, masks):
        L = inputs.input_ids.shape[0]
        if mask is None:
            mask = model.visual_mask(inputs.input_ids)
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (L,):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"prunable must be a bool tensor of the prompt's shape ({L},), got {got}")
        mask = mask.to(model.device)
        if need_text_after:
            if not mask.any():
                raise ValueError("the prompt has no visual tokens to prune: pass prunable= to mark prunable positions "
                                 "(a long document, say), or k=None for dense decoding")
            if mask[int(mask.nonzero()[0]) :].all():
                raise ValueError("no text follows the prunable positions, so nothing scores them")
        out.append(mask)
    return out
