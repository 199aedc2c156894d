"""Qwen3-VL / Qwen3.5 video preprocessing in torch (no torchvision).

Same numbers as transformers' `Qwen3VLVideoProcessor` (the video processor of
every Qwen3-VL and Qwen3.5 checkpoint), step by step:

- frame sampling: `fps` frames per second of video, clamped to
  [min_frames, max_frames] and to the frames the video has, at indices
  `linspace(0, total - 1, n).round()`;
- `smart_resize` over the whole clip: t * h * w within [min_pixels, max_pixels]
  (`size.shortest_edge` / `size.longest_edge`), sides multiples of patch * merge;
- resize of the uint8 frames with antialiased bicubic interpolation, natively
  on uint8 on the CPU, which is what torchvision's `resize` runs there;
- rescale and normalize fused as transformers does: `(x - 255 mean) / (255 std)`;
- the last frame repeated until the frame count divides by `temporal_patch_size`,
  then patchify into `[T/Tp * gh * gw, C * Tp * P * P]`, merge blocks contiguous.

The prompt of a video is one `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`
per group of `temporal_patch_size` frames, `t` the mean time of the group's first
and last frame (`Qwen3VLProcessor.replace_video_token`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.processor import MAX_ASPECT_RATIO, ImageSizeError, PatchProcessor, as_pixel_tensor

# transformers' Qwen3VLVideoProcessor class defaults, for keys a config file leaves out.
_IMAGENET_STANDARD = (0.5, 0.5, 0.5)
BICUBIC = 3


class VideoError(ValueError):
    """A video the processor cannot take (user error: maps to HTTP 400)."""


def video_smart_resize(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
    min_pixels: int, max_pixels: int,
) -> tuple[int, int]:
    """(height, width) of every frame; `t * h * w` within [min, max] pixels.

    transformers' Qwen3-VL video `smart_resize`, same rounding (round-half-even).
    """
    if num_frames < temporal_factor:
        raise VideoError(f"a video needs at least {temporal_factor} sampled frames, got {num_frames}")
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"video frames have no pixels ({width}x{height})")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"video aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class ProcessedVideos:
    """Preprocessed videos, concatenated.

    Shapes: pixel_values [N_patch, C*Tp*P*P] fp32; grid_thw [n, 3] int64 (t in
    frame groups, h, w in patches). Video i owns `grid_thw[i].prod()` rows.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


@dataclass(frozen=True, slots=True)
class VideoProcessor(PatchProcessor):
    """Video preprocessing settings (video_preprocessor_config.json).

    Defaults are transformers' `Qwen3VLVideoProcessor` class attributes.
    `cap_pixels_per_frame` is the per-frame budget of qwen-vl-utils that
    transformers applies only when asked (off by default there too).
    """

    min_pixels: int = 128 * 32 * 32
    max_pixels: int = 32 * 32 * 768
    image_mean: tuple[float, ...] = _IMAGENET_STANDARD
    image_std: tuple[float, ...] = _IMAGENET_STANDARD
    resample: int = BICUBIC
    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> VideoProcessor:
        """From a video processor config dict; missing keys take transformers' class defaults."""
        d = cls()
        size = dict(cfg.get("size") or {})
        shared = cls.shared_fields(cfg, d)
        if shared["resample"] != BICUBIC:
            raise ValueError(f"video resample {shared['resample']} is not supported (only bicubic, 3)")
        num_frames, fps = cfg.get("num_frames"), cfg.get("fps", d.fps)
        return cls(
            min_pixels=int(size.get("shortest_edge", d.min_pixels)),
            max_pixels=int(size.get("longest_edge", d.max_pixels)),
            fps=None if fps is None else float(fps),
            num_frames=None if num_frames is None else int(num_frames),
            min_frames=int(cfg.get("min_frames", d.min_frames)),
            max_frames=int(cfg.get("max_frames", d.max_frames)),
            do_sample_frames=bool(cfg.get("do_sample_frames", d.do_sample_frames)),
            cap_pixels_per_frame=bool(cfg.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(cfg.get("max_video_tokens", d.max_video_tokens)),
            **shared,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> VideoProcessor:
        """The config transformers' `AutoVideoProcessor` would read.

        In its order: `processor_config.json`'s `video_processor`, then
        `video_preprocessor_config.json`, then the image `preprocessor_config.json`.
        """
        root = Path(model_dir)
        processor = root / "processor_config.json"
        if processor.is_file():
            section = json.loads(processor.read_text()).get("video_processor")
            if section is not None:
                return cls.from_dict(section)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (root / name).is_file():
                return cls.from_dict(json.loads((root / name).read_text()))
        raise FileNotFoundError(f"no video or image preprocessor config in {model_dir}")

    def sample_indices(self, total_num_frames: int, video_fps: float) -> np.ndarray:
        """Indices of the frames the model sees, ascending. Shapes: -> [n] int64."""
        if total_num_frames < 1:
            raise VideoError("the video has no frames")
        if not self.do_sample_frames:
            return np.arange(total_num_frames)
        num = self.num_frames
        if num is None and self.fps is not None:
            num = int(total_num_frames / video_fps * self.fps)
            num = min(max(num, self.min_frames), self.max_frames, total_num_frames)
        if num is None:
            num = min(max(total_num_frames, self.min_frames), self.max_frames)
        return np.linspace(0, total_num_frames - 1, num).round().astype(np.int64)

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a `num_frames`-frame clip is resized to."""
        if not self.do_resize:
            self.check_multiple(height, width, "with do_resize off,")
            return height, width
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * self.factor**2
            per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return video_smart_resize(
            num_frames, height, width, self.temporal_patch_size, self.factor, self.min_pixels, max_pixels
        )

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Patch grid (frame groups, h, w) of `num_frames` sampled frames of `height` x `width`."""
        h, w = self.target_size(num_frames, height, width)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def tokens_per_frame_group(self, grid_thw: Sequence[int]) -> int:
        """`<|video_pad|>` tokens of one frame group (one timestamp) of a video with grid (t, h, w)."""
        return int(grid_thw[1]) * int(grid_thw[2]) // self.merge_size**2

    def timestamps(self, frame_indices: Sequence[int], video_fps: float) -> list[float]:
        """Seconds of each frame group: mean of its first and last frame's time."""
        indices = [int(i) for i in frame_indices]
        if not indices:
            raise VideoError("no frames were sampled")
        tp = self.temporal_patch_size
        indices += [indices[-1]] * (-len(indices) % tp)
        times = [i / video_fps for i in indices]
        return [(times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp)]

    def resize(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The host half: resize sampled RGB frames. Shapes: [T, H, W, 3] uint8 -> [T, h, w, 3] uint8."""
        video = torch.as_tensor(frames)
        if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise VideoError(f"expected RGB uint8 frames [T, H, W, 3], got {video.dtype} {list(video.shape)}")
        height, width = self.target_size(video.shape[0], video.shape[1], video.shape[2])
        if (height, width) == tuple(video.shape[1:3]):
            return video.contiguous()
        # On the CPU torchvision resizes uint8 natively (fixed point); its float path
        # (GPU) differs by a few grey levels, so the resize always runs here.
        x = F.interpolate(
            video.cpu().permute(0, 3, 1, 2), size=[height, width], mode="bicubic", align_corners=False, antialias=True
        )
        return x.permute(0, 2, 3, 1).contiguous()

    def _normalized(self, video: torch.Tensor) -> torch.Tensor:
        """Shapes: [T, h, w, 3] uint8 -> [T, 3, h, w] fp32, transformers' fused rescale + normalize."""
        x = video.permute(0, 3, 1, 2).to(torch.float32)
        mean = torch.tensor(self.image_mean, device=x.device)
        std = torch.tensor(self.image_std, device=x.device)
        if self.do_rescale and self.do_normalize:
            mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
        if self.do_normalize:
            return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        return x * self.rescale_factor if self.do_rescale else x

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """Shapes: [T, C, h, w] -> [ceil(T/Tp) * gh * gw, C * Tp * P * P], merge blocks contiguous."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if pad := -video.shape[0] % tp:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        t, c, height, width = video.shape
        gt, gh, gw = t // tp, height // p, width // p
        x = video.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, Tp, P, P]
        return x.reshape(gt * gh * gw, c * tp * p * p)

    def pixel_values(
        self, resized: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu"
    ) -> ProcessedVideos:
        """The device half: normalize and patchify `resize`'s outputs on `device`."""
        if len(resized) == 0:
            raise VideoError("no videos to preprocess")
        patches, grids = [], []
        for frames in resized:
            video = as_pixel_tensor(frames, device)
            if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
                raise VideoError(f"expected resized uint8 frames [T, h, w, 3], got {video.dtype} {list(video.shape)}")
            self.check_multiple(video.shape[1], video.shape[2], "resized frames")
            patches.append(self.patchify(self._normalized(video)))
            tp = self.temporal_patch_size
            grids.append((-(-video.shape[0] // tp), video.shape[1] // self.patch_size, video.shape[2] // self.patch_size))
        return ProcessedVideos(
            pixel_values=torch.cat(patches, dim=0).contiguous(),
            grid_thw=torch.tensor(grids, dtype=torch.int64),
        )

    def preprocess(self, videos: Sequence[np.ndarray | torch.Tensor]) -> ProcessedVideos:
        """Resize then normalize + patchify already-sampled frame stacks ([T, H, W, 3] uint8 each), on the CPU."""
        return self.pixel_values([self.resize(v) for v in videos])


def video_prompt(
    timestamps: Sequence[float], tokens_per_group: int, vision_start: str, video_pad: str, vision_end: str,
    pads: int | None = None,
) -> str:
    """The text that replaces a chat template's `<|vision_start|><|video_pad|><|vision_end|>`.

    One `<t seconds>` + vision_start + pads + vision_end per frame group; `pads`
    placeholders per group (default `tokens_per_group`; 1 to expand after tokenizing).
    """
    n = tokens_per_group if pads is None else pads
    return "".join(f"<{t:.1f} seconds>{vision_start}{video_pad * n}{vision_end}" for t in timestamps)


VIDEO_WRAPPER = "<|vision_start|><|video_pad|><|vision_end|>"


def expand_video_wrappers(text: str, expansions: Sequence[str]) -> str:
    """Replace the i-th `<|vision_start|><|video_pad|><|vision_end|>` of a rendered chat by `expansions[i]`.

    Raises:
        VideoError: the text holds a different number of video wrappers than videos.
    """
    pieces = text.split(VIDEO_WRAPPER)
    if len(pieces) - 1 != len(expansions):
        raise VideoError(
            f"the prompt has {len(pieces) - 1} video placeholder(s) but {len(expansions)} video(s) were given"
        )
    out = [pieces[0]]
    for expansion, piece in zip(expansions, pieces[1:]):
        out += [expansion, piece]
    return "".join(out)
