"""Benchmark dense greedy decoding against Sparse-to-Dense, on a GPU (or, small, on the CPU).

    python bench.py --video clip.mp4 --model Qwen2-VL-7B-Instruct/   # one video through both decoders, one table
    python bench.py                                                   # a clip of its own, random weights
    python bench.py --steps 16384,65536,131072                        # decode-step times against the memory floor
    python bench.py --model smollm2 --documents README.md             # real acceptance on a text file (real weights)
    python bench.py --kernels --batch 4                               # the weight-only int8/int4 matmul kernels

Time does not depend on the weights' values, acceptance does: with random weights the tables say so, and next to
the measured acceptance print what the measured step times would give at a per-token acceptance of 0.5, 0.7, 0.9.

The file reads top-down: arguments; the main job (video mode, then --steps); measurements shared by the modes; the
research modes (--documents with its oracle and --reselect, --kernels); main.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import load
import std
import tp
import vision
from load import Inputs

ACCEPTANCES = (0.5, 0.7, 0.9)
QUESTIONS = (
    "Summarize the document above in a few sentences.",
    "What is the main purpose of this document?",
    "List three important points the document makes.",
    "Who would need to read this document, and why?",
)


# ---------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" only where there is one worth showing
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\nThe file")[0], formatter_class=HelpFormatter)
    p.add_argument("--video", nargs="+", help="video files or image folders (default: a clip of its own)")
    p.add_argument("--model", help="checkpoint directory or preset: " + ", ".join([*load.PRESETS, load.DEMO_PRESET])
                   + " (default: qwen2-vl-7b on a GPU of over 40 GB, qwen2-vl-2b on a smaller one, tiny on the CPU)")
    p.add_argument("--question", default="Describe what happens in this video.", help="asked about the video")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens each decode may emit")
    p.add_argument("--k", type=int, default=1024, help="prunable positions kept per layer and KV head (sibling: "
                   "per prompt)")
    p.add_argument("--gamma", type=int, default=6, help="tokens drafted per verification")
    p.add_argument("--draft", choices=std.DRAFTS, help="draft kind (default: topk); with --documents, measure only "
                   "this kind's configurations")
    p.add_argument("--draft-model", help="checkpoint directory or preset of a smaller model of the same family: "
                   "drafts for --draft sibling (implied), and is timed by --steps")
    p.add_argument("--fps", type=float, default=vision.FPS, help="frames sampled per second of video")
    p.add_argument("--max-frames", type=int, default=vision.MAX_FRAMES, help="at most this many frames per video: "
                   "a longer video is sampled more sparsely")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of the clip made without --video")
    p.add_argument("--batch", type=int, default=1, help="decode this many prompts together (videos are cycled)")
    p.add_argument("--sweep", action="store_true", help="also run a grid of k and gamma")
    p.add_argument("--transformers", action="store_true", help="also time transformers' generate on the prompt")
    p.add_argument("--show-selection", metavar="FILE.png", help="draw the sampled frames of the first video with the "
                   "visual tokens its draft keeps")
    p.add_argument("--steps", help="comma-separated contexts: time decode steps on synthetic caches of these lengths")
    p.add_argument("--documents", nargs="+", help="text files: measure acceptance with each as the prunable context")
    p.add_argument("--step-times", nargs="+", help="--steps JSON files to project the --documents acceptance onto "
                   "a GPU")
    p.add_argument("--resume", metavar="REPORT.json", help="with --documents: go on from the --json report of an "
                   "interrupted run, whose documents begin this run's")
    p.add_argument("--reselect", type=int, metavar="N", help="with --documents: compare top-k against re-choosing "
                   "the kept set every N tokens from the newest tokens' attention (k and gamma from --k, --gamma)")
    p.add_argument("--kernels", action="store_true", help="time weight-only int8/int4 matrix-vector kernels on the "
                   "model's decoder matrices, for 1 and --batch rows (GPU)")
    p.add_argument("--all-reduce", choices=("one-shot", "nccl"), help="under torchrun on GPUs: the decode steps' "
                   "all-reduces read the other GPU's memory in one kernel (one-shot, the default) or go through NCCL")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--json", help="write every number measured here to this file")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)

    for name in ("max_new_tokens", "k", "gamma", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.fps > 0:
        p.error(f"--fps must be positive, got {args.fps:g}")
    if args.max_frames < 2:
        p.error(f"--max-frames must be at least 2 (one frame pair), got {args.max_frames}")
    if not args.clip_seconds > 0:
        p.error(f"--clip-seconds must be positive, got {args.clip_seconds:g}")
    if sum(map(bool, (args.steps, args.kernels, args.documents))) > 1:
        p.error("--steps, --kernels and --documents are separate modes: give one")
    other_mode = "--steps" if args.steps else "--kernels" if args.kernels else "--documents" if args.documents else None
    video_only = [flag for flag, given in (("--video", args.video), ("--sweep", args.sweep),
                                           ("--transformers", args.transformers),
                                           ("--show-selection", args.show_selection)) if given]
    if other_mode and video_only:
        p.error(f"{' and '.join(video_only)} belong to the video mode, not {other_mode}")
    if args.steps:
        try:
            args.steps = [int(c) for c in args.steps.split(",")]
        except ValueError:
            p.error(f"--steps takes comma-separated context lengths, got {args.steps!r}")
        if min(args.steps) < 1:
            p.error("--steps contexts must be positive")
    if args.model == load.DEMO_PRESET and not other_mode:
        p.error(f"{args.model} takes text, not video (its tokenizer has no vision tokens): measure it with "
                "--documents FILE")
    if (args.reselect is not None or args.step_times or args.resume) and not args.documents:
        p.error("--reselect, --step-times and --resume go with --documents")
    if args.reselect is not None and args.reselect < 1:
        p.error("--reselect must be at least 1")
    if args.reselect is not None and args.draft is not None:
        p.error("--reselect compares top-k drafts: leave out --draft")
    if args.show_selection and args.draft == "layerskip":
        p.error("--show-selection draws what a pruning draft keeps; draft 'layerskip' keeps every token")
    if args.draft_model and args.draft not in (None, "sibling"):
        p.error(f"--draft-model drafts for --draft sibling, not --draft {args.draft}")
    if args.draft_model and (args.documents or args.kernels):
        p.error("--draft-model goes with the video mode and --steps")
    if args.draft == "sibling" and not args.draft_model:
        p.error("--draft sibling drafts with a smaller model of the same family: give --draft-model")
    if args.draft_model and args.show_selection:
        p.error("--show-selection draws the per-layer choice of a top-k draft, not the sibling's")
    if args.all_reduce and not tp.launched():
        p.error("--all-reduce chooses how tensor-parallel ranks add: run under torchrun")
    if args.all_reduce == "one-shot" and (os.environ.get("WORLD_SIZE") != "2" or not torch.cuda.is_available()):
        p.error("--all-reduce one-shot needs two ranks, one GPU each")
    if tp.launched():
        one_process = [flag for flag, given in (("--kernels", args.kernels), ("--documents", args.documents),
                                                ("--transformers", args.transformers),
                                                ("--show-selection", args.show_selection)) if given]
        if one_process:
            p.error(f"{' and '.join(one_process)} run in one process, not under torchrun")
    if args.show_selection and not args.show_selection.lower().endswith(".png"):
        p.error(f"--show-selection writes a PNG file, got {args.show_selection!r}")
    for path in [*(args.video or ()), *(args.documents or ()), *(args.step_times or ()),
                 *([args.resume] if args.resume else [])]:
        if not os.path.exists(path):
            p.error(f"no such file or folder: {path}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json: no folder {Path(args.json).parent} to write into")
    if args.draft is None and not args.documents:
        args.draft = "sibling" if args.draft_model else "topk"
    return args


# ---------------------------------------------------------------------------------------------- video mode


def video_mode(args, config, device, dtype):
    """One prompt per video (or a batch of them): dense decoding, then StD, on the same prefill."""
    with tempfile.TemporaryDirectory() as scratch:
        videos = args.video
        if not videos:
            videos = [os.path.join(scratch, "clip.mp4")]
            make_clip(videos[0], args.clip_seconds)
            print(f"no --video: made a {args.clip_seconds:g} s clip of 640x360 frames", file=sys.stderr)
        # Every video is decoded before the model loads: a bad one fails in seconds, not after the weights.
        clips = {}
        for path in dict.fromkeys(videos[b % len(videos)] for b in range(args.batch)):
            print(f"decoding {path} ...", file=sys.stderr)
            start = time.perf_counter()
            frames, sampled_fps = vision.load_frames(path, args.fps, args.max_frames)
            pixel_values, grid = vision.preprocess(frames, config.vision)
            clips[path] = (frames, pixel_values, grid, config.vision.temporal_patch_size / sampled_fps,
                           time.perf_counter() - start)
            print(f"  {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, {grid[0, 0]} frame pairs of "
                  f"{grid[0, 1]}x{grid[0, 2]} patches ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        if args.draft == "sibling":
            merge = config.vision.spatial_merge_size ** 2
            for path, clip in clips.items():
                visual = int(clip[2].prod()) // merge
                if args.k > visual:
                    raise ValueError(f"--k {args.k} is more than the {visual} visual tokens of {path}: the sibling "
                                     "keeps k of them")
        model, processor = load_model(args, device, dtype)
        draft_model = load_draft_model(args, device, dtype)
        if processor is None:
            print(f"{args.model} has no tokenizer: --question is ignored, the prompt's text is random token ids, and "
                  "outputs are shown as token ids", file=sys.stderr)
        prompts = [video_prompt(clips[videos[b % len(videos)]], processor, model.config, args.question, seed=b)
                   for b in range(args.batch)]
        return run_video(args, model, processor, device, videos, clips, prompts, draft_model)


def run_video(args, model, processor, device, videos, clips, prompts, draft_model=None):
    batch = [inputs for inputs, _ in prompts]
    bandwidth = read_bandwidth(device)
    report = dict(device=describe(device), model=args.model, random_weights=args.model in load.PRESETS, runs=[],
                  read_bandwidth=bandwidth)
    if draft_model is not None:
        report.update(draft_model=args.draft_model, draft_model_bytes=sum(t.nbytes for t in draft_model.parameters()),
                      draft_model_step_bytes=weight_bytes(draft_model))
    k = None if args.draft == "layerskip" else args.k  # an early exit keeps the whole cache
    configs = [(k, args.gamma)]
    if args.sweep and k is not None:
        most = min(int(model.visual_mask(x.input_ids).sum()) for x in batch) if args.draft == "sibling" else None
        configs += [(k, g) for k in (256, 512, 1024, 2048, 4096) for g in (2, 4, 6, 9)
                    if (k, g) != configs[0] and (most is None or k <= most)]
    room = std.cache_room(args.max_new_tokens, max(g for _, g in configs))

    print(f"vision encoder and prefill of {sum(len(x.input_ids) for x in batch)} prompt tokens ...", file=sys.stderr)
    p = std.prefill(model, batch, room, score=args.draft in std.SCORED)
    print(f"  vision {p.vision_s:.2f} s, prefill {p.prefill_s:.2f} s", file=sys.stderr)
    if device.type == "cuda":
        print("compiling the decode steps and capturing their CUDA graphs (a warm-up decode) ...", file=sys.stderr)
        std.decode(p, min(4, args.max_new_tokens))
        std.decode(p, min(2 * args.gamma + 2, args.max_new_tokens), k=k, gamma=args.gamma, draft=args.draft,
                   draft_model=draft_model)

    alone = None
    if args.batch > 1:  # the reference: each prompt decoded on its own
        print(f"dense decoding of each of the {args.batch} prompts alone ...", file=sys.stderr)
        alone = [std.generate(model, inputs, args.max_new_tokens) for inputs in batch]
    print("dense decoding ...", file=sys.stderr)
    dense, dense_peak = timed_decode(p, device, args.max_new_tokens)
    for k, gamma in configs:
        print(f"Sparse-to-Dense, draft {args.draft}, k={k}, gamma={gamma} ...", file=sys.stderr)
        sparse, sparse_peak = timed_decode(p, device, args.max_new_tokens, k=k, gamma=gamma, draft=args.draft,
                                           draft_model=draft_model)
        for b, (inputs, video) in enumerate(prompts):
            reference = alone[b] if alone else dense[b]
            verdict, index, margin = first_difference(model, inputs, reference.tokens, sparse[b].tokens)
            entry = describe_run(model, inputs, video, reference, dense[b], sparse[b], k, gamma, bandwidth,
                                 batch_context=sum(len(x.input_ids) for x in batch))
            entry.update(sequence=b, batch=args.batch, draft=args.draft, match=index is None, verdict=verdict,
                         first_difference=index, margin=margin, dense_peak_bytes=dense_peak,
                         std_peak_bytes=sparse_peak, keeps_all=k is not None and k >= entry["visual_tokens"],
                         dense_text=output_text(processor, dense[b].tokens), dense_token_ids=reference.tokens,
                         std_token_ids=sparse[b].tokens)
            report["runs"].append(entry)
    if args.transformers:
        report["transformers"] = transformers_times(args, model, batch[0], device)
    if device.type == "cuda":  # nothing compiles on the CPU
        # Compilation happens only while the CUDA graphs are captured (decoding replays them): these count it all.
        from torch._dynamo.utils import counters  # imported here: importing dynamo takes seconds

        report["compiled_graphs"] = counters["stats"]["unique_graphs"]
        report["graph_breaks"] = sum(counters["graph_break"].values())
    print_video_report(report, args)
    if args.show_selection:
        frames, _, grid, _, _ = clips[videos[0]]
        show_selection(p, 0, args.draft, args.k, frames, grid[0].tolist(), args.show_selection,
                       title=f"{os.path.basename(videos[0])}: draft {args.draft} keeps k={args.k} of "
                             f"{int(p.prunable[0].sum())} visual tokens per layer and KV head")
        print(f"wrote {args.show_selection}: the visual tokens the draft keeps, on the sampled frames")
    return report


def load_model(args, device, dtype):
    """The model (under torchrun, this rank's part of it: tp.py) and its processor."""
    print(f"loading {args.model} on {device} ({str(dtype).removeprefix('torch.')}) ...", file=sys.stderr)
    start = time.perf_counter()
    model, processor = load.load(args.model, device=device, dtype=dtype, shard=getattr(args, "tp", None))
    print(f"  {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, processor


def load_draft_model(args, device, dtype):
    """The --draft-model, whole on every tensor-parallel rank (its steps need no all-reduce), or None."""
    if not args.draft_model:
        return None
    return load_model(argparse.Namespace(model=args.draft_model), device, dtype)[0]


def video_prompt(clip, processor, config, question, seed=0):
    """-> (inputs, the clip's video description)."""
    frames, pixel_values, grid, second_per_grid_t, decode_s = clip
    video = dict(frames=len(frames), video_decode_s=decode_s)
    if processor is not None:
        return processor.prompt(question, pixel_values, grid, second_per_grid_t), video
    # No tokenizer: the system prompt and question become random token ids, none of them a vision or stop token.
    rng = np.random.default_rng(seed)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id, *config.stop_token_ids}
    ordinary = np.setdiff1d(np.arange(config.vocab_size), list(special))
    text = lambda n: rng.choice(ordinary, n).tolist()
    n_visual = int(grid.prod()) // config.vision.spatial_merge_size**2
    ids = (text(20) + [config.vision_start_token_id] + [config.video_token_id] * n_visual
           + [config.vision_end_token_id] + text(24))
    return Inputs(torch.tensor(ids), pixel_values, grid, torch.tensor([second_per_grid_t])), video


def make_clip(path: str, seconds: float, fps: int = 4, width: int = 640, height: int = 360) -> None:
    """A synthetic mp4: moving rectangles on a drifting background, so frames differ."""
    try:
        import av
    except ImportError:
        sys.exit("bench.py: making a clip needs PyAV (pip install av), or pass --video with your own file or folder")
    rng = np.random.default_rng(0)
    boxes = rng.integers(0, 255, (6, 5))
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(max(2, int(seconds * fps))):
            frame = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1).astype(np.uint8)
            for x, y, r, g, b in boxes:
                x0, y0 = int(x + 9 * i) % (width - 60), int(y + 5 * i) % (height - 60)
                frame[y0 : y0 + 60, x0 : x0 + 60] = (r, g, b)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def timed_decode(p, device, max_new_tokens, **kw):
    """std.decode and the peak memory of the decode alone (weights and caches included, the prefill's peak not)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = std.decode(p, max_new_tokens, **kw)
    return results, peak_memory(device)


def per_token_ms(result) -> float | None:
    """Decode time per token after the first (which comes from prefill); None if decoding never ran."""
    s = result.stats
    return 1e3 * (s.draft_s + s.verify_s) / (len(result.tokens) - 1) if len(result.tokens) > 1 else None


def step_ms(result, gamma):
    """Per-step times of a speculative run: one draft step, one verify step."""
    s, rounds = result.stats, max(1, result.stats.rounds)
    return 1e3 * s.draft_s / (gamma * rounds), 1e3 * s.verify_s / rounds


def first_difference(model, inputs, dense, sparse):
    """MATCH, or the first index where the outputs differ and the dense model's top-2 logit margin there."""
    if dense == sparse:
        return "MATCH", None, None
    i = next((j for j, (a, b) in enumerate(zip(dense, sparse)) if a != b), min(len(dense), len(sparse)))
    with torch.inference_mode():
        ids = torch.cat([inputs.input_ids, torch.tensor(dense[:i], dtype=torch.long)])
        top = model(dataclasses.replace(inputs, input_ids=ids))[-1].float().topk(2).values
    margin = float(top[0] - top[1])
    return f"DIFFER at token {i} (dense top-2 margin {margin:.3g})", i, margin


def output_text(processor, tokens) -> str:
    """The first line of the generated text, or the first token ids without a tokenizer."""
    if processor is None:
        return "ids " + " ".join(map(str, tokens[:12])) + (" ..." if len(tokens) > 12 else "")
    lines = processor.to_text(tokens).strip().splitlines()
    return lines[0][:100] if lines else ""


def describe_run(model, inputs, video, reference, dense, sparse, k, gamma, bandwidth, batch_context):
    """One sequence's figures. Times are the batch's: a step of a batch of B reads the caches of all B."""
    context = len(inputs.input_ids)
    n_visual = int(model.visual_mask(inputs.input_ids).sum())
    dense_ms, sparse_ms = per_token_ms(dense), per_token_ms(sparse)
    timed = dense_ms is not None and sparse_ms is not None
    draft_ms, verify_ms = step_ms(sparse, gamma)
    floor_ms = 1e3 * (weight_bytes(model) + kv_bytes_per_token(model) * batch_context) / bandwidth
    s, d = sparse.stats, dense.stats
    decode_s = video["video_decode_s"]
    end_to_end = lambda st: decode_s + st.vision_s + st.prefill_s + st.select_s + st.draft_s + st.verify_s
    return dict(
        k=k, gamma=gamma, frames=video["frames"], visual_tokens=n_visual, context=context, video_decode_s=decode_s,
        vision_s=d.vision_s, prefill_s=d.prefill_s, select_s=s.select_s, capture_s=s.capture_s,
        dense_tokens=len(reference.tokens), std_tokens=len(sparse.tokens), dense_ms_per_token=dense_ms,
        std_ms_per_token=sparse_ms, draft_step_ms=draft_ms, verify_step_ms=verify_ms,
        acceptance=s.acceptance_rate, tokens_per_round=s.tokens_per_round,
        speedup=dense_ms / sparse_ms if timed else None,
        dense_decode_s=d.draft_s + d.verify_s, std_decode_s=s.draft_s + s.verify_s,
        dense_end_to_end_s=end_to_end(d), std_end_to_end_s=end_to_end(s), floor_ms=floor_ms,
        fraction_of_floor=floor_ms / dense_ms if timed else None, dense_ids=reference.tokens, std_ids=sparse.tokens,
        projected={str(a): projected_speedup(a, gamma, dense_ms, draft_ms, verify_ms) if timed else None
                   for a in ACCEPTANCES},
    )


def print_video_report(report, args):
    if report["random_weights"]:
        print("\n" + "!" * 100 + "\n!! RANDOM WEIGHTS: times are real, acceptance and outputs are not a property of the"
              " method.\n!! The projection rows show what these step times give at a per-token acceptance.\n"
              + "!" * 100)
    print(f"\n{report['device']}, model {report['model']}, read bandwidth {report['read_bandwidth'] / 1e12:.2f} TB/s"
          + (f", tensor parallel over {args.tp[1]} processes (this table: rank 0's times)" if args.tp else ""))
    if "draft_model" in report:
        print(f"draft model {report['draft_model']}: {fmt_gb(report['draft_model_bytes'])} of weights beside the "
              f"model's (a draft step reads {fmt_gb(report['draft_model_step_bytes'])})")
    rows = [("frames", "frames", "{}"), ("visual tokens", "visual_tokens", "{}"), ("context", "context", "{}"),
            ("video decode s", "video_decode_s", "{:.2f}"), ("vision encoder s", "vision_s", "{:.2f}"),
            ("prefill s", "prefill_s", "{:.2f}"), ("selection s", "select_s", "{:.3f}"),
            ("compile+capture s", "capture_s", "{:.1f}"), ("dense tokens", "dense_tokens", "{}"),
            ("StD tokens", "std_tokens", "{}"), ("dense ms/token", "dense_ms_per_token", "{:.2f}"),
            ("StD ms/token", "std_ms_per_token", "{:.2f}"), ("draft step ms", "draft_step_ms", "{:.2f}"),
            ("verify step ms", "verify_step_ms", "{:.2f}"), ("acceptance", "acceptance", "{:.1%}"),
            ("tokens/round", "tokens_per_round", "{:.2f}"), ("speedup", "speedup", "{:.2f}x"),
            ("dense / floor", "fraction_of_floor", "{:.0%}")]
    runs = report["runs"]
    print(f"{'':22}" + "".join(f"{'seq ' + str(r['sequence']) + ' k=' + str(r['k']) + ' g=' + str(r['gamma']):>22}"
                               for r in runs))
    for label, key, f in rows:
        print(f"{label:22}" + "".join(f"{f.format(r[key]) if r[key] is not None else '-':>22}" for r in runs))
    print(f"{'dense decode peak':22}" + "".join(f"{fmt_gb(r['dense_peak_bytes']):>22}" for r in runs))
    print(f"{'StD decode peak':22}" + "".join(f"{fmt_gb(r['std_peak_bytes']):>22}" for r in runs))
    for a in ACCEPTANCES:
        print(f"{'projected @ ' + str(a):22}" + "".join(f"{r['projected'][str(a)]:>21.2f}x"
                                                        if r["projected"][str(a)] is not None else f"{'-':>22}"
                                                        for r in runs))
    print(f"{'output':22}" + "".join(f"{'MATCH' if r['match'] else 'DIFFER @' + str(r['first_difference']):>22}"
                                     for r in runs))
    print("speedup: dense ms/token over StD ms/token, decode only. dense / floor: the floor (weights + caches read "
          "once, at\nthe read bandwidth) over the dense step. projected @ a: the speedup these step times give if "
          "each draft\nis accepted with probability a. Peaks: GPU memory during the decode, weights and caches "
          "included.")
    for r in runs:
        if r["keeps_all"]:
            print(f"sequence {r['sequence']}: k={r['k']} keeps all {r['visual_tokens']} visual tokens, so the draft "
                  "sees what the verifier sees and acceptance is 100% by construction")
        if not r["match"]:
            print(f"sequence {r['sequence']} k={r['k']} gamma={r['gamma']}: {r['verdict']}")
    for r in runs[: args.batch]:
        print(f"sequence {r['sequence']}, dense output: {r['dense_text']}")
    first = runs[: args.batch]  # the first configuration, every sequence
    if args.batch > 1 and first[0]["dense_decode_s"] > 0 and first[0]["std_decode_s"] > 0:
        # Decode only: the tokens after each sequence's first (which comes from prefill) over the batch's decode time.
        tokens_d, tokens_s = sum(r["dense_tokens"] - 1 for r in first), sum(r["std_tokens"] - 1 for r in first)
        print(f"batch of {args.batch}: dense {tokens_d / first[0]['dense_decode_s']:.1f} tokens/s, "
              f"StD {tokens_s / first[0]['std_decode_s']:.1f} tokens/s (decode only, all sequences)")
    if "compiled_graphs" in report:
        print(f"torch.compile: {report['compiled_graphs']} graphs compiled (at capture), "
              f"{report['graph_breaks']} graph breaks")
    hf = report.get("transformers")
    if hf:
        print(f"transformers generate: {hf['ms_per_token']:.2f} ms/token decode ({hf['attn']}), "
              f"{hf['prefill_s']:.2f} s to the first token")


def show_selection(p, row, draft, k, frames, grid_thw, path, title):
    """The picture of --show-selection: how many (layer, KV head) pairs keep each visual token of sequence `row`."""
    config = p.model.config
    prunable = p.prunable[row]
    counts = torch.zeros(len(prunable), device=prunable.device)
    for positions in std.kept_positions(p, row, draft, k):
        counts += torch.bincount(positions.flatten(), minlength=len(prunable))
    share = (counts[prunable] / (config.n_layers * config.n_kv_heads)).cpu().numpy()
    legend = f"share of the {config.n_layers} layers x {config.n_kv_heads} KV heads that keep the token"
    draw_selection(frames, grid_thw, [(legend, share, (255, 170, 0))], path, title, config.vision.patch_size,
                   config.vision.spatial_merge_size)


def draw_selection(frames, grid_thw, layers, path, title="", patch=14, merge=2, max_pairs=16, width=1600, cols=4):
    """Thumbnails of the frame pairs, each merged-patch cell tinted by the weight each layer gives its visual token.

    frames: uint8 [n, H, W, 3]; grid_thw: (t, gh, gw) from the processor; layers: (legend, weight, rgb) with weights
    [t * gh/merge * gw/merge] in [0, 1], painted in order (a count heat map is one layer, two kinds of pick are two).
    """
    from PIL import Image, ImageDraw, ImageFont

    t, gh, gw = grid_thw
    h, w, mh, mw = gh * patch, gw * patch, gh // merge, gw // merge
    weights = [np.asarray(weight, dtype=np.float32).reshape(t, mh, mw) for _, weight, _ in layers]
    pairs = np.unique(np.linspace(0, t - 1, min(t, max_pairs)).round().astype(int))
    cols = min(cols, len(pairs))
    pad, caption, head = 10, 24, 66
    thumb_w = (width - pad * (cols + 1)) // cols
    thumb_h = round(h * thumb_w / w)
    big, small = ImageFont.load_default(size=20), ImageFont.load_default(size=16)
    rows = -(-len(pairs) // cols)
    canvas = Image.new("RGB", (pad + cols * (thumb_w + pad), head + rows * (thumb_h + caption + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    shown = f"  (showing {len(pairs)} of {t} frame pairs, evenly spaced)" if len(pairs) < t else ""
    draw.text((pad, 8), title + shown, fill=(240, 240, 240), font=big)
    tint = lambda image, rgb: image * 0.4 + np.asarray(rgb, np.float32) * 0.6  # the picture shows through
    x = pad
    for legend, _, rgb in layers:
        for i in range(40):  # a ramp from dark to the colour: the legend's scale
            a, grey = (i + 1) / 40, np.full(3, 128.0)
            draw.line((x + i, 40, x + i, 56), fill=tuple(int(v) for v in grey * 0.3 * (1 - a) + tint(grey, rgb) * a))
        draw.text((x + 48, 40), legend, fill=(220, 220, 220), font=small)
        x += 48 + draw.textlength(legend, font=small) + 30
    for n, pair in enumerate(pairs):
        # A frame pair is one temporal patch: its first frame stands for it.
        image = np.asarray(Image.fromarray(frames[min(2 * pair, len(frames) - 1)]).resize((w, h), Image.BICUBIC),
                           dtype=np.float32)
        out = image * 0.3  # dimmed, so that cells nobody keeps stay dark
        for weight, (_, _, rgb) in zip(weights, layers):
            a = np.kron(weight[pair], np.ones((merge * patch, merge * patch), np.float32))[..., None]
            out = out * (1 - a) + tint(image, rgb) * a
        thumb = Image.fromarray(out.clip(0, 255).astype(np.uint8)).resize((thumb_w, thumb_h), Image.LANCZOS)
        x, y = pad + (n % cols) * (thumb_w + pad), head + (n // cols) * (thumb_h + caption + pad)
        canvas.paste(thumb, (x, y))
        label = f"pair {pair}:"
        draw.text((x, y + thumb_h + 4), label, fill=(220, 220, 220), font=small)
        x += draw.textlength(label, font=small) + 6
        for weight, (_, _, rgb) in zip(weights, layers):
            share = f"{100 * (weight[pair] > 0).mean():.0f}%"
            draw.text((x, y + thumb_h + 4), share, fill=tuple(rgb), font=small)
            x += draw.textlength(share, font=small) + 8
        draw.text((x, y + thumb_h + 4), "of cells kept", fill=(220, 220, 220), font=small)
    canvas.save(path)


def transformers_times(args, model, inputs, device):
    """Decode ms/token of transformers' generate on the same prompt: (time for 1 + n tokens - time for 1) / n."""
    import transformers

    print("transformers generate ...", file=sys.stderr)
    qwen2_5 = model.config.vision.model_type == "qwen2_5_vl"
    cls = transformers.Qwen2_5_VLForConditionalGeneration if qwen2_5 else transformers.Qwen2VLForConditionalGeneration
    if os.path.isdir(str(args.model)):
        hf = cls.from_pretrained(args.model, dtype=model.dtype, attn_implementation="sdpa").to(device)
    else:  # the same shape with its own random weights: time does not depend on the values
        with torch.device(device):
            hf = cls._from_config(transformers_config(model.config), dtype=model.dtype, attn_implementation="sdpa")
    hf.eval()
    ids = inputs.input_ids[None].to(device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  pixel_values_videos=inputs.pixel_values.to(device), video_grid_thw=inputs.grid_thw.to(device),
                  mm_token_type_ids=(ids == model.config.video_token_id).int() * 2)
    if qwen2_5:
        kwargs["second_per_grid_ts"] = inputs.second_per_grid_ts
    n = args.max_new_tokens

    def timed(tokens):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(**kwargs, max_new_tokens=tokens, min_new_tokens=tokens)
        sync()
        return time.perf_counter() - start

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    timed(2)  # warm-up
    one, many = timed(1), timed(1 + n)
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(ms_per_token=1e3 * (many - one) / n, prefill_s=one, attn="sdpa", tokens=n)


def transformers_config(c):
    """Our config as transformers' Qwen2VLConfig or Qwen2_5_VLConfig."""
    import transformers

    v = c.vision
    if v.model_type == "qwen2_vl":
        config_class = transformers.Qwen2VLConfig
        vision = dict(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, num_heads=v.num_heads,
                      mlp_ratio=int(v.mlp_ratio) if v.mlp_ratio == int(v.mlp_ratio) else v.mlp_ratio)
    else:
        config_class = transformers.Qwen2_5_VLConfig
        vision = dict(depth=v.depth, hidden_size=v.embed_dim, out_hidden_size=v.hidden_size, num_heads=v.num_heads,
                      intermediate_size=v.intermediate_size, window_size=v.window_size,
                      fullatt_block_indexes=list(v.full_attention_blocks), tokens_per_second=v.tokens_per_second)
    return config_class(
        text_config=dict(hidden_size=c.dim, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layers,
                         num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                         rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                         rope_scaling={"type": "mrope", "mrope_section": list(c.mrope_section)}),
        vision_config=vision, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        tie_word_embeddings=c.tie_embeddings, vision_start_token_id=c.vision_start_token_id,
        vision_end_token_id=c.vision_end_token_id,
    )


# ---------------------------------------------------------------------------------------------- steps mode


def steps_mode(args, model, device, contexts, draft_model=None):
    """Time one dense step, one draft step of each kind and one verify step per gamma on synthetic caches.

    Each step is what decoding runs (a CUDA graph of compiled layers on a GPU). The verify step is the same for every
    draft kind (the dense model over gamma + 1 tokens), so it is timed once per gamma.
    """
    compiled = device.type == "cuda"
    bandwidth = read_bandwidth(device)
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    B, text, reps = args.batch, 64, 30 if compiled else 3  # the draft keeps k prunable positions + 64 text tokens
    gammas = sorted({2, 4, 6, 8, args.gamma})
    report = dict(device=describe(device), model=args.model, read_bandwidth=bandwidth, weight_bytes=weights,
                  kv_bytes_per_token=per_token, batch=B, k=args.k, draft_text_tokens=text, rows=[],
                  draft_model=args.draft_model)
    for context in contexts:
        print(f"context {context}: {'capturing and ' if compiled else ''}timing the steps ...", file=sys.stderr)
        room = std.cache_room(0, max(gammas))
        dense = model.new_cache(B, context + room)
        topk_cache = model.new_cache(B, args.k + text + room, invariant=False)  # as std.py makes a draft's
        for t in dense.k + dense.v + topk_cache.k + topk_cache.v:
            t.normal_()

        def reset_to(*caches_and_lengths):
            def reset():  # every replay starts from the same lengths
                for cache, length in caches_and_lengths:
                    cache.lengths.fill_(length)
            return reset

        def timed(fn, *caches_and_lengths):
            return median_ms(fn, reps, before=reset_to(*caches_and_lengths))

        state = std.DecodeState([0] * B, [0] * B, [context] * B, max(gammas), device)
        dense_step = std.make_steps(model, dense, None, state, 1, compiled)["dense"]
        dense_ms = timed(dense_step, (dense, context))
        floor_ms = 1e3 * (weights + per_token * context * B) / bandwidth
        row = dict(context=context, dense_ms=dense_ms, dense_floor_ms=floor_ms, fraction_of_floor=floor_ms / dense_ms,
                   dense_cache_bytes=dense.nbytes(), draft_cache_bytes=topk_cache.nbytes(), verify_ms={}, drafts={},
                   profiles={})
        if compiled:
            row["profiles"]["dense"] = kernel_profile(dense_step, 1, dense_ms, reset_to((dense, context)))
        topk = std.Drafter(model, topk_cache)
        for gamma in gammas:
            s = std.DecodeState([0] * B, [0] * B, [context] * B, gamma, device)
            verify = std.make_steps(model, dense, topk, s, gamma, compiled)["verify"]
            row["verify_ms"][gamma] = timed(verify, (dense, context), (topk_cache, args.k + text))
            if compiled and gamma == args.gamma:
                row["profiles"]["verify"] = kernel_profile(verify, 1, row["verify_ms"][gamma], reset_to(
                    (dense, context), (topk_cache, args.k + text)))
        for kind in ("topk", "topk-int8", "topk-int4", "layerskip") + (("sibling",) if draft_model else ()):
            try:
                drafter, floor_bytes, extra = draft_setup(kind, model, dense, topk, draft_model, context, B, room, text,
                                                          args.k)
            except torch.OutOfMemoryError:
                drafter = None
            if not everywhere(drafter is not None):
                row["drafts"][kind] = dict(skipped="its weights or cache do not fit beside the dense model's")
                print(f"  {kind}: skipped, out of GPU memory", file=sys.stderr)
                del drafter
                torch.cuda.empty_cache()
                continue
            s = std.DecodeState([0] * B, [0] * B, [context] * B, args.gamma, device)
            step = std.make_steps(model, dense, drafter, s, args.gamma, compiled)["draft"]
            length = context if kind == "layerskip" else args.k + text
            draft_ms = timed(step, (drafter.cache, length), (dense, context)) / args.gamma
            if compiled:
                row["profiles"][kind] = kernel_profile(step, args.gamma, draft_ms,
                                                       reset_to((drafter.cache, length), (dense, context)))
            row["drafts"][kind] = dict(draft_ms=draft_ms, floor_ms=1e3 * floor_bytes / bandwidth, extra_bytes=extra,
                                       projected={str(a): {g: projected_speedup(a, g, dense_ms, draft_ms, v)
                                                           for g, v in row["verify_ms"].items()} for a in ACCEPTANCES})
            del drafter, step
            if compiled:
                torch.cuda.empty_cache()
        report["rows"].append(row)
        del dense, topk_cache, topk, state
        if compiled:
            torch.cuda.empty_cache()
    print_steps_report(report, args)
    return report


def draft_setup(kind, model, dense, topk, draft_model, context, B, room, text, k):
    """-> (drafter of this kind, bytes its step must read, the extra memory it holds) for steps_mode."""
    import quant

    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    if kind == "layerskip":
        half = model.config.n_layers // 2
        drafter = std.Drafter(model, dense.first_layers(half), n_layers=half, mirror=False)
        return drafter, (weights + per_token * context * B) * half / model.config.n_layers, 0
    if kind == "sibling":  # over k video tokens and the text, as the top-k drafts
        cache = draft_model.new_cache(B, k + text + room, invariant=False)
        for t in cache.k + cache.v:
            t.normal_()
        extra = sum(t.nbytes for t in draft_model.parameters()) + cache.nbytes()
        return std.Drafter(draft_model, cache, mirror=False, sibling=True), weight_bytes(draft_model), extra
    if kind == "topk":
        return topk, weights, 0
    # one quantized copy at a time: a large model has no room for both beside its caches
    drafter = std.Drafter(quant.quantized_copy(model, std.QUANTIZED_BITS[kind]), topk.cache)
    return drafter, weight_bytes(drafter.model), sum(b.nbytes for b in drafter.model.buffers())


def everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every tensor-parallel rank (so that all ranks go on to the same collectives)."""
    if not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device=tp.device())
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def print_steps_report(report, args):
    print(f"\n{report['device']}, model {report['model']} (random weights), batch {report['batch']}, "
          + (f"tensor parallel over {args.tp[1]} processes ({tp.all_reduce_kind()} all-reduces, per-rank floors), "
             if args.tp else "")
          + f"read bandwidth {report['read_bandwidth'] / 1e12:.2f} TB/s, "
          f"weights {report['weight_bytes'] / 1e9:.2f} GB, "
          f"draft cache k={report['k']} + {report['draft_text_tokens']} text")
    g = args.gamma
    print(f"{'context':>8} {'dense ms':>9} {'floor ms':>9} {'floor %':>8} {f'verify(g={g})':>12} {'/dense':>7} | "
          f"{'draft':>10} {'step ms':>8} {'floor ms':>9} {'/floor':>7} | projected speedup at gamma={g}, acceptance "
          + " ".join(str(a) for a in ACCEPTANCES))
    for row in report["rows"]:
        for i, (kind, d) in enumerate(row["drafts"].items()):
            verify = row["verify_ms"][g]
            head = (f"{row['context']:>8} {row['dense_ms']:>9.2f} {row['dense_floor_ms']:>9.2f} "
                    f"{row['fraction_of_floor']:>8.0%} {verify:>12.2f} {verify / row['dense_ms']:>7.2f}") if i == 0 \
                else " " * 57
            if "skipped" in d:
                print(f"{head} | {kind:>10} skipped: {d['skipped']}")
                continue
            ratio = d["draft_ms"] / d["floor_ms"]
            print(f"{head} | {kind:>10} {d['draft_ms']:>8.2f} {d['floor_ms']:>9.2f} {ratio:>7.2f} | "
                  + " ".join(f"{d['projected'][str(a)][g]:>5.2f}x" for a in ACCEPTANCES))
    print("floors: bytes a step must read / read bandwidth. dense: weights + cache; top-k drafts: their weights "
          "(the small cache aside); layerskip: half the weights and half the cache"
          + (f"; sibling ({report['draft_model']}): its weights" if report["draft_model"] else ""))
    for row in report["rows"]:
        for step, p in row["profiles"].items():
            print(f"{row['context']:>8} {step:>10}: {p['kernels']:>4} kernels a step, matrix-vector products "
                  f"{p['matvec_ms']:.2f} ms, other kernels {p['other_ms']:.2f} ms"
                  + (f" (all-reduces {p['all_reduce_ms']:.2f} ms)" if args.tp else "")
                  + (f", overlapping {p['overlap_ms']:.2f} ms" if p["overlap_ms"] >= 0.005 else "")
                  + f", between kernels {p['gaps_ms']:.2f} ms: {1 - p['matvec_ms'] / p['step_ms']:.0%} of the step "
                  "outside the products")


# ---------------------------------------------------------------------------------------------- measurements


MATVEC_KERNELS = ("_linear_kernel", "_qkv_rotary_kernel")  # kernels.py's products
ALL_REDUCE_KERNELS = ("nccl", "one_shot_all_reduce_kernel")  # NCCL's, symmetric memory's (tp.py)


def kernel_profile(step, steps_per_call: int, step_ms: float, before) -> dict:
    """The GPU kernels of one replay of `step` (a CUDA graph of `steps_per_call` decode steps), per decode step:
    how many, the time in matrix-vector products, in other kernels and between kernels; and each kernel's count and
    time. With dependent launches (kernels.py, Hopper) a kernel starts while the one before it finishes and waits for
    it: its time includes that wait, so kernels overlap (overlap_ms: the time counted twice), and the products' time
    includes their waits."""
    from torch.profiler import ProfilerActivity, profile

    before()
    step()
    torch.cuda.synchronize()
    before()
    if torch.distributed.is_initialized():
        # Else one rank's all-reduces count the time it waits for the other. (Not always enough: a run's first
        # profile has still read such a wait, BENCHMARKS.md section 10.)
        torch.distributed.barrier()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name, spans = {}, []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count, us = by_name.get(event.name, (0, 0.0))
            by_name[event.name] = (count + 1, us + event.time_range.elapsed_us())
            spans.append((event.time_range.start, event.time_range.end))
    per_step = {name: dict(count=count / steps_per_call, ms=us / 1e3 / steps_per_call)
                for name, (count, us) in sorted(by_name.items(), key=lambda item: -item[1][1])}
    matvec = sum(k["ms"] for name, k in per_step.items() if any(m in name for m in MATVEC_KERNELS))
    all_reduce = sum(k["ms"] for name, k in per_step.items() if any(m in name for m in ALL_REDUCE_KERNELS))
    busy = sum(k["ms"] for k in per_step.values())
    covered_ms = covered(spans) / 1e3 / steps_per_call
    return dict(kernels=round(sum(k["count"] for k in per_step.values())), step_ms=step_ms, matvec_ms=matvec,
                all_reduce_ms=all_reduce, other_ms=busy - matvec, gaps_ms=max(0.0, step_ms - covered_ms),
                overlap_ms=busy - covered_ms,
                by_kernel=per_step)


def covered(spans: list[tuple[float, float]]) -> float:
    """The time in which at least one of the (start, end) spans runs: their union's length."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def read_bandwidth(device) -> float:
    """Bytes per second one kernel reads from memory (a sum over 4 GiB on a GPU, 512 MiB on the CPU): the ceiling."""
    if device.type != "cuda":
        x = torch.ones(2**27, dtype=torch.float32)
        return x.nbytes / (median_ms(lambda: x.sum(), reps=5) / 1e3)
    x = torch.ones(2**31, dtype=torch.bfloat16, device=device)
    return x.nbytes / (median_ms(lambda: x.sum(), reps=20) / 1e3)


def median_ms(fn, reps: int = 50, before=None) -> float:
    """Median time of fn() in milliseconds, by CUDA events on a GPU (before() runs untimed ahead of each call)."""
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(reps + 3):
        if before:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[3:])


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every decoder layer and the head (one embedding row aside). Scratch
    buffers (an int4 product's split counters and sums) are not saved with a model, and not counted."""
    tensors = {t.data_ptr(): t for m in (model.layers, model.norm, model.lm_head) for t in m.state_dict().values()}
    return sum(t.nbytes for t in tensors.values())


def kv_bytes_per_token(model) -> int:
    """Of this process's cache: under torchrun, a rank's KV heads."""
    c = model.config
    return 2 * c.n_layers * model.layers[0].attn.n_kv_heads * c.head_dim * model.dtype.itemsize


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a round emits when each draft is accepted with probability alpha, independently."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def projected_speedup(alpha, gamma, dense_ms, draft_ms, verify_ms) -> float:
    return expected_tokens(alpha, gamma) * dense_ms / (gamma * draft_ms + verify_ms)


def peak_memory(device) -> int | None:
    """Peak bytes allocated on this GPU; under torchrun, on the fullest rank's GPU."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated()], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX)
    return int(peak.item())


def fmt_gb(n) -> str:
    return "n/a on the CPU" if n is None else f"{n / 2**30:.2f} GiB"


def describe(device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------- research: documents


def documents_mode(args, model, processor, device):
    """Acceptance with real weights: each document is the prunable context of a question about it.

    One prefill per prompt serves every configuration. "oracle" is the top-k draft with its positions chosen by the
    attention of the dense answer's own tokens (known only afterwards): an upper bound for re-selecting the kept
    set from the newest tokens during decoding.
    """
    # K sweep at gamma 4, gamma sweep at K 1024, every draft kind at (1024, 4), the paper's Table 1 setting (9)
    configs = ([("topk", k, 4) for k in (256, 512, 1024, 2048)] + [("topk", 1024, g) for g in (2, 6, 9)]
               + [(kind, 1024, 4) for kind in ("topk-int8", "topk-int4", "oracle")]
               + [("streaming", 1024, g) for g in (4, 9)] + [("layerskip", None, g) for g in (4, 9)])
    if args.draft:
        configs = [c for c in configs if c[0] == args.draft]
    if args.reselect:
        configs = [(kind, args.k, args.gamma) for kind in ("topk", "oracle", "reselect")]
    room = std.cache_room(args.max_new_tokens, max(gamma for _, _, gamma in configs))
    # Each (batch, context) row of the --steps files becomes a projection column.
    step_files = [load.read_json(Path(path)) for path in args.step_times or ()]
    step_rows = [(f"{s['batch']}x{row['context']}", row) for s in step_files for row in s["rows"]]
    step_models = {s["model"] for s in step_files}
    totals = {c: dict(accepted=0, drafted=0, tokens=0, rounds=0, prompts=0, prefills=0, matches=0, keeps_all=0)
              for c in configs}
    prompts = document_prompts(args.documents, processor)
    if not prompts:
        sys.exit("bench.py: no document holds any text")
    done, setting = 0, dict(model=args.model, dtype=str(model.dtype), max_new_tokens=args.max_new_tokens)
    if args.resume:
        earlier = load.read_json(Path(args.resume))
        saved = {(c["draft"], c["k"], c["gamma"]): c for c in earlier.get("totals", ())}
        if (set(saved) != set(configs) or earlier.get("setting") != setting
                or earlier.get("documents") != args.documents[: len(earlier.get("documents", ()))]):
            sys.exit(f"bench.py: {args.resume} is not a report of this study (the same model, dtype, "
                     "--max-new-tokens and configurations) on the first of these documents")
        done = earlier["prompts_done"]
        totals = {c: {name: saved[c][name] for name in totals[c]} for c in configs}
        print(f"resuming after {done} of {len(prompts)} prompts", file=sys.stderr)
    start, quantized = time.perf_counter(), {}  # the quantized drafters, made once for all prompts
    for n, (path, question, inputs, prunable) in enumerate(prompts[done:], done + 1):
        print(f"[{n}/{len(prompts)}, {time.perf_counter() - start:.0f}s] {os.path.basename(path)} "
              f"({len(inputs.input_ids)} tokens): {question}", file=sys.stderr)
        prefilled = std.prefill(model, inputs, room, prunable, quantized=quantized)
        dense = std.decode(prefilled, args.max_new_tokens)[0].tokens
        oracle = answer_attention(model, prefilled, inputs, dense) if any(c[0] == "oracle" for c in configs) else None
        for c in configs:
            kind, k, gamma = c
            if kind == "reselect":
                r, prefills = reselecting_decode(model, inputs, prunable, args.max_new_tokens, k, gamma,
                                                 args.reselect)
            else:
                source = oracle if kind == "oracle" else prefilled
                r = std.decode(source, args.max_new_tokens, k=k, gamma=gamma,
                               draft="topk" if kind == "oracle" else kind)[0]
                prefills = 1
            t = totals[c]
            t["accepted"] += r.stats.accepted
            t["drafted"] += r.stats.drafted
            t["tokens"] += len(r.tokens)
            t["rounds"] += r.stats.rounds
            t["prompts"] += 1
            t["prefills"] += prefills
            t["matches"] += r.tokens == dense
            t["keeps_all"] += k is not None and k >= int(prunable.sum())
        if args.json:  # an interrupted study keeps what it measured (--resume goes on from it)
            report = dict(partial=n < len(prompts), setting=setting, **progress(args.documents, n, totals))
            Path(args.json).write_text(json.dumps(report, indent=1))
    report = dict(device=describe(device), model=args.model, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                  questions=QUESTIONS, step_times=args.step_times, setting=setting,
                  **progress(args.documents, len(prompts), totals))
    print(f"\n{len(prompts)} prompts, at most {args.max_new_tokens} new tokens; acceptance and tokens per round are "
          "ratios of sums over the prompts")
    report["configs"] = documents_table(totals, step_rows, step_models)
    return report


def progress(documents, done: int, totals: dict) -> dict:
    """What --resume needs: the documents, how many prompts are done, and the sums over them."""
    return dict(documents=documents, prompts_done=done,
                totals=[dict(draft=c[0], k=c[1], gamma=c[2], **t) for c, t in totals.items()])


def document_prompts(paths, processor, max_tokens: int = 8192) -> list:
    """(path, question, inputs, prunable) for each document and question, the document being the prunable part."""
    head = processor.encode(f"<|im_start|>system\n{processor.system}<|im_end|>\n<|im_start|>user\n"
                            "Read this document.\n\n")
    prompts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            document = processor.encode(f.read())
        if not document:
            print(f"skipping {path}: no text", file=sys.stderr)
            continue
        if len(document) > max_tokens:
            print(f"{path}: {len(document)} tokens, keeping the first {max_tokens}", file=sys.stderr)
            document = document[:max_tokens]
        for question in QUESTIONS:
            tail = processor.encode(f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n")
            prunable = torch.zeros(len(head) + len(document) + len(tail), dtype=torch.bool)
            prunable[len(head) : len(head) + len(document)] = True
            prompts.append((path, question, Inputs(torch.tensor(head + document + tail)), prunable))
    return prompts


def documents_table(totals, step_rows, step_models) -> list[dict]:
    """Print one line per configuration (ratios of sums), with projections from the --steps rows; -> the lines."""
    header = f"{'draft':>10} {'k':>5} {'gamma':>5} {'acceptance':>10} {'tok/round':>9} {'match':>6} {'keeps all':>9}"
    if step_rows:
        header += (" | projected speedup on " + ", ".join(sorted(step_models)) + " at batch x context "
                   + ", ".join(name for name, _ in step_rows))
    print(header)
    entries = []
    for (kind, k, gamma), t in totals.items():
        acceptance = t["accepted"] / max(1, t["drafted"])
        tpr = (t["tokens"] - t["prefills"]) / max(1, t["rounds"])  # per verification: each prefill emits one token
        entry = dict(draft=kind, k=k, gamma=gamma, acceptance=acceptance, tokens_per_verification=tpr,
                     match=t["matches"], prompts=t["prompts"], prefills=t["prefills"], keeps_all=t["keeps_all"],
                     **{n: t[n] for n in ("accepted", "drafted", "tokens", "rounds")}, projected={})
        line = (f"{kind:>10} {str(k):>5} {gamma:>5} {acceptance:>10.1%} {tpr:>9.2f} {t['matches']:>3}/{t['prompts']}"
                f" {t['keeps_all']:>5}/{t['prompts']}")
        for name, row in step_rows:
            # The streaming, oracle and reselect drafts take the top-k draft's step: same cache size and weights
            # (reselect's refreshes are not counted).
            d = row["drafts"][kind if kind in row["drafts"] else "topk"]
            verify = row["verify_ms"].get(str(gamma))
            if verify is not None and "draft_ms" in d:  # a draft skipped for memory has no step time
                entry["projected"][name] = tpr * row["dense_ms"] / (gamma * d["draft_ms"] + verify)
        if step_rows:
            line += " | " + " ".join(f"{entry['projected'][name]:.2f}x" if name in entry["projected"] else "-"
                                     for name, _ in step_rows)
        print(line)
        entries.append(entry)
    if any(t["keeps_all"] for t in totals.values()):
        print("keeps all: prompts whose document has no more tokens than k; there the draft sees everything the "
              "verifier sees, and acceptance is 100% by construction")
    return entries


def reselecting_decode(model, inputs, prunable, max_new_tokens, k, gamma, period):
    """Top-k decoding whose kept set is re-chosen every `period` tokens by the newest `period` tokens' attention.

    An experiment: each refresh prefills prompt + answer so far and decodes on from there (the output stays dense
    greedy decoding, which the caller checks). On a GPU a refresh would instead score the cache with the queries
    the verify steps computed, about one attention pass over the prompt.
    """
    tokens, stats, prefills = [], std.Stats(), 0  # prefills: each starts a segment and emits its first token
    stops = set(model.config.stop_token_ids)
    while len(tokens) < max_new_tokens and not (tokens and tokens[-1] in stops):
        ids = torch.cat([inputs.input_ids, torch.tensor(tokens, dtype=torch.long)])
        mask = torch.cat([prunable, torch.zeros(len(tokens), dtype=torch.bool)])
        p = std.prefill(model, Inputs(ids), std.cache_room(max_new_tokens, gamma), mask)
        if tokens:  # score with the newest tokens only
            newest = p.query_rows[0] >= len(ids) - period
            p = dataclasses.replace(p, queries=[[q[newest] for q in p.queries[0]]],
                                    query_rows=[p.query_rows[0][newest]])
        r = std.decode(p, min(period, max_new_tokens - len(tokens)), k=k, gamma=gamma)[0]
        tokens += r.tokens
        prefills += 1
        for name in ("drafted", "accepted", "rounds"):
            setattr(stats, name, getattr(stats, name) + getattr(r.stats, name))
    return std.Result(tokens, stats), prefills


def answer_attention(model, prefilled, inputs, answer):
    """The prefill with its scoring queries replaced by those of the dense answer's tokens (the oracle's selection).

    Scoring normalises each query's attention over the prompt's keys only: the answer's own keys are not scored.
    """
    ids = torch.cat([inputs.input_ids, torch.tensor(answer[:-1], dtype=torch.long)])
    with torch.inference_mode():
        embeds, pos = model.embed(Inputs(ids))
        rows = torch.arange(len(inputs.input_ids), len(ids), device=model.device)
        _, queries = model.prefill(embeds, pos, model.new_cache(1, len(ids)), 0, rows)
    return dataclasses.replace(prefilled, queries=[queries], query_rows=[rows])


# ---------------------------------------------------------------------------------------------- research: kernels


def kernels_mode(args, model, device):
    """The matrix-vector products of a draft step, by kernel: every layer's qkv, o, gate_up and down in turn, as one
    CUDA graph. Ours (kernels.linear) against cuBLAS, PyTorch's int8 and int4 (tinygemm)
    kernels and gpt-fast's int8."""
    import torch._inductor.config

    import kernels
    import quant

    linears = [m for layer in model.layers for m in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up,
                                                     layer.mlp.down_proj)]
    int8, int4 = [quant.Int8Linear(m) for m in linears], [quant.Int4Linear(m) for m in linears]
    scales = [q.scale.to(torch.bfloat16) for q in int8]  # PyTorch's and gpt-fast's int8 take them in x's dtype
    gpt_fast_int8 = torch.compile(lambda x, w, scale: F.linear(x, w.to(x.dtype)) * scale, dynamic=False)
    bf16_bytes = sum(m.weight.nbytes for m in linears)
    int8_bytes = sum(q.weight.nbytes + q.scale.nbytes for q in int8)
    int4_bytes = sum(q.packed.nbytes + q.scale_and_zero.nbytes for q in int4)
    k_tiles = lambda K: next(t for t in (8, 4, 2) if K % (16 * t) == 0)  # tinygemm's inner K tiles must divide K
    tinygemm = [torch.ops.aten._convert_weight_to_int4pack((v[:, ::2] << 4 | v[:, 1::2]).to(torch.uint8).contiguous(),
                                                           k_tiles(v.shape[1]))
                for v in (q.values() for q in int4)]  # the same q in tinygemm's layout
    ours = lambda modules: (lambda x: [kernels.linear(x[m.in_features], kernels.weights_of(w))
                                       for m, w in zip(linears, modules)])
    runs = {
        "bf16, cuBLAS (F.linear)": (lambda x: [F.linear(x[m.in_features], m.weight) for m in linears], bf16_bytes),
        "bf16, ours (kernels.linear)": (ours(linears), bf16_bytes),
        "int8, ours (kernels.linear)": (ours(int8), int8_bytes),
        "int8, PyTorch _weight_int8pack_mm": (lambda x: [torch.ops.aten._weight_int8pack_mm(
            x[m.in_features], q.weight, scale) for m, q, scale in zip(linears, int8, scales)], int8_bytes),
        "int8, gpt-fast (compiled dequantize + F.linear)": (lambda x: [gpt_fast_int8(
            x[m.in_features], q.weight, scale) for m, q, scale in zip(linears, int8, scales)], int8_bytes),
        "int4, ours (kernels.linear)": (ours(int4), int4_bytes),
        "int4, PyTorch _weight_int4pack_mm (tinygemm)": (lambda x: [torch.ops.aten._weight_int4pack_mm(
            x[m.in_features], t, q.group, q.scale_and_zero_bf16()) for m, q, t in zip(linears, int4, tinygemm)],
            int4_bytes),
    }
    report = dict(device=describe(device), model=args.model, matrices=len(linears), rows={})
    print(f"{describe(device)}, {args.model}: {len(linears)} decoder matrices in turn, one CUDA graph")
    # As gpt-fast sets it (its int8 is slower without); it compiles once per matrix shape and row count.
    with torch._inductor.config.patch(coordinate_descent_tuning=True), torch._dynamo.config.patch(recompile_limit=64):
        for rows in sorted({1, args.batch}):
            x = {n: torch.randn(rows, n, device=device, dtype=torch.bfloat16) for n in {m.in_features for m in linears}}
            report["rows"][rows] = {}
            for name, (run_all, nbytes) in runs.items():
                ms = median_ms(std.cuda_graph(lambda: run_all(x), [], None), reps=10)
                report["rows"][rows][name] = dict(ms=ms, bytes=nbytes, tb_per_s=nbytes / ms / 1e9)
                print(f"{rows:>2} rows  {name:<48} {ms:>8.3f} ms  {nbytes / 1e9:>6.2f} GB  "
                      f"{nbytes / ms / 1e9:>5.2f} TB/s", flush=True)
    return report


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"note: {message}\n"  # a library's notice, shown as one line
    # (rank, world): every rank runs all of this, rank 0 reports
    args.tp = tp.init(one_shot=args.all_reduce != "nccl") if tp.launched() else None
    if args.tp and args.tp[0] != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    device = tp.device() if args.tp else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is None:
        big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory > 40e9
        args.model = "qwen2-vl-7b" if big else "qwen2-vl-2b" if device.type == "cuda" else "tiny"
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.transformers:
        try:
            import transformers  # noqa: F401  (checked now, not after the whole benchmark)
        except ImportError:
            sys.exit("bench.py: --transformers needs transformers (pip install transformers)")
    config = load.read_config(args.model)  # a bad checkpoint fails here, before any weight is read
    if args.draft_model:
        std.check_sibling(config, load.read_config(args.draft_model))
        tokenizers = [load.checkpoint_dir(name) / "tokenizer.json" for name in (args.model, args.draft_model)
                      if name not in load.PRESETS and name != load.DEMO_PRESET]
        if len(tokenizers) == 2 and all(t.exists() for t in tokenizers) and \
                tokenizers[0].read_bytes() != tokenizers[1].read_bytes():
            sys.exit(f"bench.py: {args.model} and {args.draft_model} have different tokenizers: a sibling must share "
                     "the model's")
    if args.kernels and (device.type != "cuda" or dtype != torch.bfloat16):
        sys.exit("bench.py: --kernels times GPU kernels on bfloat16 activations: it needs a GPU and no --dtype")
    if args.documents and (args.model in load.PRESETS
                           or not (load.checkpoint_dir(args.model) / "tokenizer.json").exists()):
        sys.exit(f"bench.py: --documents needs a checkpoint with tokenizer.json; {args.model} has none")
    for path in (*(args.step_times or ()), *([args.resume] if args.resume else ())):
        load.read_json(Path(path))  # a damaged file fails now, not after the model loads
    if args.steps or args.kernels or args.documents:
        model, processor = load_model(args, device, dtype)
        if args.kernels:
            report = kernels_mode(args, model, device)
        elif args.steps:
            report = steps_mode(args, model, device, args.steps, load_draft_model(args, device, dtype))
        else:
            report = documents_mode(args, model, processor, device)
    else:
        report = video_mode(args, config, device, dtype)
    report["dtype"] = str(dtype).removeprefix("torch.")
    report["tp"] = args.tp[1] if args.tp else 1
    if args.tp:
        report["all_reduce"] = tp.all_reduce_kind()
    report["command"] = " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    report["date"] = time.strftime("%Y-%m-%d")
    if args.json and not (args.tp and args.tp[0] != 0):
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.tp:
        tp.close()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad input or a missing package: one line, no traceback
        sys.exit(f"bench.py: {e}")
