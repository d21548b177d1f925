"""Load Qwen2-VL from a Hugging Face checkpoint directory (or a random-weight preset) and build its processor.

    model, processor = load("Qwen2-VL-7B-Instruct/", device="cuda", dtype=torch.bfloat16)
    inputs = processor("What happens in this video?", video="clip.mp4")

A checkpoint directory holds config.json (the flat layout of the original releases or the nested
text_config/vision_config layout of newer transformers), model.safetensors or model-0000N-of-0000M.safetensors
with model.safetensors.index.json, and tokenizer.json. Tensors go from safetensors straight into preallocated
parameters on the target device, one at a time, cast on the way; q/k/v and gate/up land in their fused matrices.
"""
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model import ModelConfig, Qwen2VL, RMSNorm
from vision import (FPS, MAX_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VisionConfig, VisionTransformer,
                    load_frames, preprocess)

PRESETS = {
    "qwen2-vl-2b": ModelConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                               intermediate_size=8960, tie_embeddings=True, vision=VisionConfig(hidden_size=1536)),
    "qwen2-vl-7b": ModelConfig(),
    "qwen2-vl-72b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=29568,
                                vision=VisionConfig(hidden_size=8192)),
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                        mrope_section=(2, 3, 3), image_token_id=500, video_token_id=501, vision_start_token_id=502,
                        vision_end_token_id=503, stop_token_ids=(510, 511),
                        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=64)),
}


# ---------------------------------------------------------------------------------------------- config


def parse_config(raw: dict, generation: dict | None = None) -> ModelConfig:
    """config.json (flat or nested) -> ModelConfig. `generation` is generation_config.json, for its stop tokens."""
    if raw.get("model_type") != "qwen2_vl":
        raise ValueError(f"unsupported model_type {raw.get('model_type')!r}: this loader reads Qwen2-VL ('qwen2_vl')")
    text = {**raw, **raw.get("text_config", {})}  # the nested layout keeps the language model in text_config

    def need(d: dict, key: str, where: str):
        if key not in d:
            raise ValueError(f"config.json has no {key!r} in {where}")
        return d[key]

    if text.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported (Qwen2-VL uses silu)")
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    vis = need(raw, "vision_config", "the top level")
    if vis.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"vision hidden_act {vis['hidden_act']!r} is not supported (Qwen2-VL uses quick_gelu)")
    stops = []
    for source in (text, generation or {}):
        eos = source.get("eos_token_id")
        stops += eos if isinstance(eos, list) else [] if eos is None else [eos]
    dim = need(text, "hidden_size", "the text config")
    n_heads = need(text, "num_attention_heads", "the text config")
    return ModelConfig(
        vocab_size=need(text, "vocab_size", "the text config"),
        dim=dim,
        n_layers=need(text, "num_hidden_layers", "the text config"),
        n_heads=n_heads,
        n_kv_heads=text.get("num_key_value_heads") or n_heads,
        intermediate_size=need(text, "intermediate_size", "the text config"),
        rope_theta=text.get("rope_theta") or rope.get("rope_theta") or 1e6,
        norm_eps=text.get("rms_norm_eps", 1e-6),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_embeddings=bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings")),
        image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        vision_end_token_id=raw.get("vision_end_token_id", 151653),
        stop_token_ids=tuple(dict.fromkeys(stops)) or (151645, 151643),
        vision=VisionConfig(
            depth=need(vis, "depth", "vision_config"),
            embed_dim=need(vis, "embed_dim", "vision_config"),
            num_heads=need(vis, "num_heads", "vision_config"),
            mlp_ratio=vis.get("mlp_ratio", 4.0),
            hidden_size=vis.get("hidden_size", dim),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        ),
    )


# ---------------------------------------------------------------------------------------------- weights


def checkpoint_names(config: ModelConfig) -> dict[str, tuple[str, slice | None]]:
    """Every tensor name of a hub checkpoint -> (our parameter, rows of it), q/k/v and gate/up into fused rows."""
    q, kv, inter = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.intermediate_size
    names = {"model.embed_tokens.weight": ("embed_tokens.weight", None), "model.norm.weight": ("norm.weight", None)}
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", None)
    for i in range(config.n_layers):
        hub, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            names[hub + f"self_attn.q_proj.{kind}"] = (ours + f"attn.qkv.{kind}", slice(0, q))
            names[hub + f"self_attn.k_proj.{kind}"] = (ours + f"attn.qkv.{kind}", slice(q, q + kv))
            names[hub + f"self_attn.v_proj.{kind}"] = (ours + f"attn.qkv.{kind}", slice(q + kv, q + 2 * kv))
        names[hub + "self_attn.o_proj.weight"] = (ours + "attn.o_proj.weight", None)
        names[hub + "mlp.gate_proj.weight"] = (ours + "mlp.gate_up.weight", slice(0, inter))
        names[hub + "mlp.up_proj.weight"] = (ours + "mlp.gate_up.weight", slice(inter, 2 * inter))
        names[hub + "mlp.down_proj.weight"] = (ours + "mlp.down_proj.weight", None)
        names[hub + "input_layernorm.weight"] = (ours + "input_norm.weight", None)
        names[hub + "post_attention_layernorm.weight"] = (ours + "post_attention_norm.weight", None)
    with torch.device("meta"):
        visual = VisionTransformer(config.vision)
    names.update({f"visual.{name}": (f"visual.{name}", None) for name, _ in visual.named_parameters()})
    return names


def hub_name(name: str) -> str:
    """Newer transformers nest the checkpoint names under model.language_model / model.visual."""
    return re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", name))


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def empty_model(config: ModelConfig, device, dtype) -> Qwen2VL:
    """Allocate without initialising: every parameter is about to be overwritten."""
    with torch.device("meta"):
        model = Qwen2VL(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # materialising unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_weights(model: Qwen2VL, path: Path, device, dtype) -> None:
    from safetensors import safe_open

    names = checkpoint_names(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen, files, start = set(), shard_files(path), time.time()
    for n, file in enumerate(files, 1):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for raw_name in f.keys():
                name = hub_name(raw_name)
                if name == "lm_head.weight" and model.config.tie_embeddings:
                    continue  # tied to the embedding, which is loaded instead
                if name not in names:
                    raise ValueError(f"{file.name}: unexpected tensor {raw_name!r} for this config")
                param_name, rows = names[name]
                target = params[param_name] if rows is None else params[param_name][rows]
                tensor = f.get_tensor(raw_name)
                if tensor.shape != target.shape:
                    raise ValueError(f"{file.name}: tensor {raw_name!r} has shape {list(tensor.shape)}, "
                                     f"the config needs {list(target.shape)}")
                target.copy_(tensor.to(dtype))
                seen.add(name)
        if len(files) > 1 and time.time() - start > 2:
            print(f"loaded {n}/{len(files)} shards ({time.time() - start:.0f}s)", file=sys.stderr)
    missing = sorted(set(names) - seen)
    if missing:
        shape = lambda m: list(params[names[m][0]][names[m][1] or slice(None)].shape)
        shown = ", ".join(f"{m} {shape(m)}" for m in missing[:5])
        raise ValueError(f"{path}: {len(missing)} tensors missing from the checkpoint: {shown}"
                         + (" ..." if len(missing) > 5 else ""))


def random_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0, std: float = 0.02) -> Qwen2VL:
    """Random weights generated on `device`: for timing (time does not depend on the values) and for tests."""
    model = empty_model(config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (RMSNorm, nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.normal_(0.0, std, generator=gen)
    return model


# ---------------------------------------------------------------------------------------------- processor


@dataclass
class Inputs:
    input_ids: torch.Tensor  # [L] the whole chat prompt
    pixel_values: torch.Tensor | None = None  # [n_patches, 3 * 2 * 14 * 14], rows as the official processor orders them
    grid_thw: torch.Tensor | None = None  # [n_videos, 3] frame pairs, patch rows, patch columns


class Processor:
    """Question + video -> Qwen2-VL chat prompt, with the video pad expanded to one token per merged patch window."""

    def __init__(self, tokenizer, config: ModelConfig, system: str = "You are a helpful assistant."):
        self.tokenizer, self.config, self.system = tokenizer, config, system

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, question: str, video=None, fps: float = FPS, max_frames: int = MAX_FRAMES,
                 min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> Inputs:
        """video: a file, a folder of images, or frames; fps, max_frames, and pixels per frame as in qwen-vl-utils."""
        if video is None:
            return self.prompt(question)
        frames = load_frames(video, fps, max_frames)
        return self.prompt(question, *preprocess(frames, self.config.vision, min_pixels, max_pixels))

    def prompt(self, question: str, pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None):
        """The chat prompt around an already preprocessed video (or none)."""
        head = self.encode(f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n")
        tail = self.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        if pixel_values is None:
            return Inputs(torch.tensor(head + tail))
        c = self.config
        for token, expected in (("<|vision_start|>", c.vision_start_token_id), ("<|video_pad|>", c.video_token_id),
                                ("<|vision_end|>", c.vision_end_token_id)):
            if self.tokenizer.token_to_id(token) != expected:
                raise ValueError(f"the tokenizer maps {token} to {self.tokenizer.token_to_id(token)}, "
                                 f"the config to {expected}: this checkpoint cannot take video")
        n_visual = int(grid_thw.prod()) // c.vision.spatial_merge_size**2
        ids = head + [c.vision_start_token_id] + [c.video_token_id] * n_visual + [c.vision_end_token_id] + tail
        return Inputs(torch.tensor(ids), pixel_values, grid_thw)

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- entry point


def read_config(path: Path) -> ModelConfig:
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    generation = path / "generation_config.json"
    return parse_config(json.loads((path / "config.json").read_text()),
                        json.loads(generation.read_text()) if generation.exists() else None)


def load(path_or_preset: str, device="cpu", dtype=torch.float32) -> tuple[Qwen2VL, Processor | None]:
    """A checkpoint directory or a preset name -> (model, processor). The processor is None without tokenizer.json."""
    if str(path_or_preset) in PRESETS:
        return random_model(PRESETS[str(path_or_preset)], device, dtype), None
    path = Path(path_or_preset)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    config = read_config(path)
    model = empty_model(config, device, dtype)
    load_weights(model, path, device, dtype)
    if not (path / "tokenizer.json").exists():
        warnings.warn(f"no tokenizer.json in {path}: the processor is None, bring your own token ids")
        return model, None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    end_of_text = tokenizer.token_to_id("<|endoftext|>")  # a stop token even where the config names only <|im_end|>
    if end_of_text is not None and end_of_text not in config.stop_token_ids:
        config.stop_token_ids += (end_of_text,)
    return model, Processor(tokenizer, config)
