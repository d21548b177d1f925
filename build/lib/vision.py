"""Qwen2-VL vision: the vision transformer, and the video path from a file to `pixel_values` + `grid_thw`.

Video path (the rules of the official Qwen2-VL processing, qwen-vl-utils):
    file --PyAV--> sampled RGB frames (2 fps, even count) --smart_resize--> bicubic resize
         --CLIP mean/std--> patches [n_patches, 3 * 2 * 14 * 14], one row per 14x14x2 patch,
    rows ordered frame pair, then 2x2 merge window, then patch inside the window, so that
    the encoder's patch merger can fold four consecutive rows into one language-model token.
"""
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Video budgets of the official processing (qwen-vl-utils): pixels per frame, and for all frames together.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FRAME_PAIRS_PER_CHUNK = 16  # vision encoder activations of a long video stay bounded


@dataclass
class VisionConfig:
    model_type: str = "qwen2_vl"  # or "qwen2_5_vl": RMSNorm, a SwiGLU MLP and window attention in the blocks
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0  # Qwen2-VL: its quick_gelu MLP is embed_dim * mlp_ratio wide
    intermediate_size: int = 3420  # Qwen2.5-VL: its SwiGLU MLP's width
    hidden_size: int = 3584  # width of the language model the merger projects into
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2.5-VL only: attention within windows of window_size pixels, except in the full-attention blocks; a video
    # token's temporal M-RoPE position advances tokens_per_second per second of video.
    window_size: int = 112
    full_attention_blocks: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0

    def __post_init__(self):
        if self.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"model_type must be 'qwen2_vl' or 'qwen2_5_vl', got {self.model_type!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# ---------------------------------------------------------------------------------------------- encoder


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A convolution whose stride equals its kernel, applied to one kernel-sized patch, is a matrix product.
        return patches @ self.proj.weight.flatten(1).T


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        frames, n, dim = x.shape  # attention stays inside each frame pair (and inside `mask`'s windows)
        q, k, v = self.qkv(x).view(frames, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(frames, n, dim))


class QuickGeluMLP(nn.Module):  # Qwen2-VL
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(config.embed_dim, hidden), nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class SwiGLU(nn.Module):  # Qwen2.5-VL
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.up_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def norm(config: VisionConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6) if config.model_type == "qwen2_vl" else RMSNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = norm(config, config.embed_dim), norm(config, config.embed_dim)
        self.attn = VisionAttention(config)
        self.mlp = QuickGeluMLP(config) if config.model_type == "qwen2_vl" else SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = norm(config, config.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    """pixel_values [n_patches, patch_dim] + grid_thw [n_videos, 3] -> one embedding per merged 2x2 window."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def rope(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary angles for one frame's patches, in the processor's window-major row order."""
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        dim = self.config.head_dim // 2  # half the head rotates with the row, half with the column
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
        angles = torch.cat([self.merge_order(rows)[:, None] * inv_freq, self.merge_order(cols)[:, None] * inv_freq],
                           dim=-1)
        angles = torch.cat([angles, angles], dim=-1)  # [h * w, head_dim]
        return angles.cos(), angles.sin()

    def merge_order(self, grid: torch.Tensor) -> torch.Tensor:
        """A per-patch [h, w] grid -> [h * w] in the processor's row order: 2x2 merge window by window."""
        m, (h, w) = self.config.spatial_merge_size, grid.shape
        return grid.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()

    def windows(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """Qwen2.5-VL: bool [h * w, h * w], whether two patches of a frame share an attention window.

        Windows tile the frame from its top-left corner, window_size pixels a side (the last row and column of
        windows may be smaller). Attention is the same whatever the order of its tokens, so the patches stay in the
        processor's order: transformers permutes them into window order and back, to the same effect.
        """
        if self.config.model_type == "qwen2_vl":
            return None
        side = self.config.window_size // self.config.patch_size  # patches
        rows = torch.arange(h, device=device)[:, None].expand(h, w) // side
        cols = torch.arange(w, device=device)[None, :].expand(h, w) // side
        window = self.merge_order(rows * w + cols)
        return window[:, None] == window[None, :]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        n_patches = int(grid_thw.prod(-1).sum())
        if n_patches != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grid_thw.tolist()} covers {n_patches} patches, "
                             f"pixel_values has {pixel_values.shape[0]}")
        dtype = self.patch_embed.proj.weight.dtype
        full = set(self.config.full_attention_blocks)
        out, start = [], 0
        for t, h, w in grid_thw.tolist():
            cos, sin = self.rope(h, w, pixel_values.device)
            windows = self.windows(h, w, pixel_values.device)
            # Frame pairs never attend to each other, so a long video runs a few pairs at a time.
            for t0 in range(0, t, FRAME_PAIRS_PER_CHUNK):
                pairs = min(FRAME_PAIRS_PER_CHUNK, t - t0)
                x = pixel_values[start : start + pairs * h * w].to(dtype)
                x = self.patch_embed(x).view(pairs, h * w, -1)
                for i, block in enumerate(self.blocks):
                    x = block(x, cos, sin, None if i in full else windows)
                out.append(self.merger(x))
                start += pairs * h * w
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------- video input


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The Qwen2-VL resize rule: both sides multiples of `factor`, area within budget, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of a {width}x{height} frame is over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_sampling(fps: float, max_frames: int) -> None:
    """The sampling arguments, checked before any video is opened."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_frames < 2:
        raise ValueError(f"max_frames must be at least 2 (one frame pair), got {max_frames}")


def sample_count(total_frames: int, video_fps: float, fps: float = FPS, max_frames: int = MAX_FRAMES) -> int:
    """How many frames the official processing samples: `fps` per second, at least 4, an even number."""
    check_sampling(fps, max_frames)
    n = total_frames / video_fps * fps
    n = min(max(n, MIN_FRAMES), max_frames - max_frames % 2, total_frames)
    n = int(n // 2 * 2)
    if n < 2:
        raise ValueError(f"a video needs at least 2 frames, this one has {total_frames}")
    return n


def sample_indices(total_frames: int, count: int) -> list[int]:
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def read_video(path: str, fps: float = FPS, max_frames: int = MAX_FRAMES) -> tuple[np.ndarray, float]:
    """Decode a video file with PyAV and keep the sampled frames: uint8 [n, height, width, 3], and the rate they were
    sampled at (frames per second of video: `fps`, unless the frame cap or the video's length changed it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file at {path}")
    check_sampling(fps, max_frames)
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot decode video {path}: the file is empty")
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video files needs PyAV: pip install av (the 'video' extra)") from e
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            total = stream.frames
            if not total and stream.duration and rate:  # some containers do not store a frame count
                total = int(stream.duration * stream.time_base * rate)
            if not total or not rate:
                raise ValueError("it reports neither a frame count nor a frame rate")
            seconds = total / float(Fraction(rate))
            count = sample_count(total, float(Fraction(rate)), fps, max_frames)
            if count < min(seconds * fps, total) - 1:
                warnings.warn(f"{path}: {seconds:.0f} s at {fps:g} fps would be {seconds * fps:.0f} frames; sampling "
                              f"{count} (max_frames) evenly over the whole video, {count / seconds:.2f} fps")
            wanted = sample_indices(total, count)
            picked, last = {}, None
            for i, frame in enumerate(container.decode(stream)):
                if i > wanted[-1]:
                    break
                last = frame
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24")
            # A stored frame count can overstate what decodes; the last frames then repeat the last decoded one.
            missing = [i for i in wanted if i not in picked]
            if missing and last is None:
                raise ValueError("no frame could be decoded")
            tail = last.to_ndarray(format="rgb24") if missing else None
            return np.stack([picked.get(i, tail) for i in wanted]), count / seconds
    except av.error.InvalidDataError:
        raise ValueError(f"cannot decode video {path}: not a video file, or a corrupt one") from None
    except (av.error.FFmpegError, ValueError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None


def read_image_folder(path: str, fps: float = FPS, max_frames: int = MAX_FRAMES) -> tuple[np.ndarray, float]:
    """A folder of images, in name order, as the frames of a video sampled at `fps`; and that rate (lower if
    max_frames thinned them)."""
    from PIL import Image

    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(names) > max_frames:
        warnings.warn(f"{path}: {len(names)} images; taking {max_frames - max_frames % 2} (max_frames) evenly")
        fps *= (max_frames - max_frames % 2) / len(names)
        names = [names[i] for i in sample_indices(len(names), max_frames - max_frames % 2)]
    frames = [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"images in {path} differ in size (height, width): {sorted({f.shape[:2] for f in frames})}")
    return np.stack(frames), fps


def load_frames(video, fps: float = FPS, max_frames: int = MAX_FRAMES) -> tuple[np.ndarray, float]:
    """A video file, a folder of images, a list of images/arrays, or an array [n, h, w, 3] -> uint8 frames and the
    rate they were sampled at (Qwen2.5-VL's temporal positions follow it; frames given directly are taken to be
    at `fps`)."""
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            return read_image_folder(path, fps, max_frames)
        return read_video(path, fps, max_frames)
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in video])
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, height, width, 3], got shape {list(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got {frames.dtype}")
    return frames, fps


def preprocess(
    frames: np.ndarray,
    config: VisionConfig = VisionConfig(),
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [n, h, w, 3] -> pixel_values [n_patches, patch_dim] (float32) and grid_thw [1, 3]."""
    tp, ps, m = config.temporal_patch_size, config.patch_size, config.spatial_merge_size
    if len(frames) % tp:  # the last frame repeats to complete the last frame pair
        frames = np.concatenate([frames, frames[-1:].repeat(tp - len(frames) % tp, axis=0)])
    n, height, width, _ = frames.shape
    # Frames share the total budget: a long video gets smaller frames, never below 1.05x the minimum.
    max_pixels = max(min(max_pixels, total_pixels / n * tp), int(min_pixels * 1.05))
    h, w = smart_resize(height, width, ps * m, min_pixels, max_pixels)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = []
    for chunk in np.array_split(frames, max(1, n // 32)):  # bounded memory for long videos
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float()
        if (h, w) != (height, width):  # bicubic with antialiasing, rounded to uint8 like a resized uint8 image
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
        out.append((x / 255 - mean) / std)
    x = torch.cat(out)  # [n, 3, h, w]
    gt, gh, gw = n // tp, h // ps, w // ps
    x = x.view(gt, tp, 3, gh // m, m, ps, gw // m, m, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # pair, window row, window col, row in window, col in window, c, t, y, x
    return x.reshape(gt * gh * gw, config.patch_dim).contiguous(), torch.tensor([[gt, gh, gw]])
