"""Qwen3-VL image preprocessing in numpy/torch/PIL (no torchvision).

Same numbers as transformers' `Qwen2VLImageProcessorPil` (what
`Qwen2VLImageProcessor` falls back to without torchvision), step by step:
RGB conversion with transparency composited on white, `smart_resize` to
multiples of patch_size * merge_size within [min_pixels, max_pixels], PIL
resize (bicubic by default) of the uint8 image, rescale in float64 then cast to
float32, normalize in float32, and patchify into `[N_patch, C * Tp * P * P]`
with the frame repeated `temporal_patch_size` times. Patches are ordered
merge-block by merge-block (the `merge_size**2` patches of one LLM token are
adjacent), as the vision tower expects.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

# transformers' Qwen2VLImageProcessor class defaults, for keys a
# preprocessor_config.json leaves out.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

ImageInput = PIL.Image.Image | bytes | str | Path


class ImageError(ValueError):
    """An image the processor cannot take (user error: maps to HTTP 400)."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image."""


class ImageTooLargeError(ImageError):
    """More pixels than the deployment allows."""


class ImageSizeError(ImageError):
    """A size smart_resize cannot handle (aspect ratio over 200, empty image)."""


def check_image_size(width: int, height: int, max_pixels: int | None) -> None:
    """Reject an image by its header size, before decoding its pixels."""
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, with any transparency composited onto white (as transformers does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: ImageInput, max_pixels: int | None = None) -> PIL.Image.Image:
    """Decode `source` (encoded bytes, a file path or a PIL image) to an RGB PIL image.

    EXIF orientation is applied; RGBA / LA / palette-with-transparency are
    composited on white; grayscale and palette images become RGB.

    Raises:
        ImageDecodeError: not an image. ImageTooLargeError: over `max_pixels`
        (checked on the header, before the pixels are decoded).
    """
    owned = not isinstance(source, PIL.Image.Image)  # ours to change in place (a caller's image is not)
    if not owned:
        image = source
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                image = PIL.Image.open(io.BytesIO(bytes(source)))
            elif isinstance(source, (str, Path)):
                image = PIL.Image.open(source)
            else:
                raise ImageDecodeError(f"unsupported image input type {type(source).__name__}")
        except PIL.Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc)) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, ImageError):
                raise
            raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    check_image_size(image.width, image.height, max_pixels)
    try:
        image.load()
        # In place: without an orientation tag exif_transpose would return a full copy of the pixels.
        if owned:
            PIL.ImageOps.exif_transpose(image, in_place=True)
        else:
            image = PIL.ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width) as multiples of `factor`, pixels within [min, max], aspect kept.

    transformers' `smart_resize`, same rounding (Python's round-half-even).
    """
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image has no pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} ({width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise ImageSizeError(f"image {width}x{height} resizes to nothing (min_pixels={min_pixels})")
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class ProcessedImages:
    """Preprocessed images, concatenated.

    Shapes: pixel_values [N_patch, C*Tp*P*P] fp32; grid_thw [n, 3] int64 (t, h, w
    in patches). Image i owns `grid_thw[i].prod()` consecutive rows.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


def as_pixel_tensor(array: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`, copied first when it is read-only (torch cannot wrap that)."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = array.copy()  # e.g. mapped read-only out of Ray's object store
    return torch.as_tensor(array).to(device)


@dataclass(frozen=True, slots=True)
class PatchProcessor:
    """Settings the image and video processors share: patch geometry, pixel budget, rescale, normalize.

    The defaults are Qwen3-VL's patch geometry with transformers' image budget and
    CLIP mean/std; `VideoProcessor` sets its own budget and mean/std.
    """

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = _OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = _OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = PIL.Image.Resampling.BICUBIC

    @staticmethod
    def shared_fields(cfg: dict[str, Any], defaults: PatchProcessor) -> dict[str, Any]:
        """The shared fields but the pixel budget, from a processor config dict; missing keys take `defaults`'.

        A scalar `image_mean` / `image_std` applies to all three channels.
        """
        mean = cfg.get("image_mean", defaults.image_mean)
        std = cfg.get("image_std", defaults.image_std)
        return {
            "patch_size": int(cfg.get("patch_size", defaults.patch_size)),
            "merge_size": int(cfg.get("merge_size", defaults.merge_size)),
            "temporal_patch_size": int(cfg.get("temporal_patch_size", defaults.temporal_patch_size)),
            "image_mean": tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)),
            "image_std": tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)),
            "rescale_factor": float(cfg.get("rescale_factor", defaults.rescale_factor)),
            "do_resize": bool(cfg.get("do_resize", True)),
            "do_rescale": bool(cfg.get("do_rescale", True)),
            "do_normalize": bool(cfg.get("do_normalize", True)),
            "resample": int(cfg.get("resample", defaults.resample)),
        }

    @property
    def factor(self) -> int:
        """Pixels per LLM token along each side."""
        return self.patch_size * self.merge_size

    def check_multiple(self, height: int, width: int, what: str) -> None:
        """Raise ImageSizeError unless both sides divide by `factor` (`what` names the pixels in the message)."""
        if height % self.factor or width % self.factor:
            raise ImageSizeError(f"{what} {width}x{height} must be multiples of {self.factor}")


@dataclass(frozen=True, slots=True)
class ImageProcessor(PatchProcessor):
    """Qwen3-VL image preprocessing settings (preprocessor_config.json).

    The dataclass defaults are Qwen3-VL's patch geometry; `from_dict` fills keys
    a file leaves out with transformers' Qwen2VLImageProcessor class defaults
    (patch 14, CLIP mean/std), exactly as transformers would.
    """

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ImageProcessor:
        """From a preprocessor_config.json dict; missing keys take HF's class defaults.

        `size.shortest_edge` / `size.longest_edge` are min / max pixels; a
        top-level `min_pixels` / `max_pixels` overrides them (as in transformers).
        """
        size = dict(cfg.get("size") or {})
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        defaults = cls(patch_size=14)
        return cls(
            min_pixels=int(min_pixels or defaults.min_pixels),
            max_pixels=int(max_pixels or defaults.max_pixels),
            **cls.shared_fields(cfg, defaults),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ImageProcessor:
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing; the pixel size must divide by `factor`."""
        if self.do_resize:
            return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        self.check_multiple(height, width, "with do_resize off,")
        return height, width

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of a `height` x `width` image, without decoding it."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, grid_thw: Sequence[int] | torch.Tensor) -> int:
        """LLM tokens (`<|image_pad|>` count) of one image with patch grid (t, h, w)."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size**2

    def resize(self, image: ImageInput) -> np.ndarray:
        """The host half of `preprocess`: decode (bytes and paths, EXIF applied), make RGB, resize.

        Shapes: -> [H, W, 3] uint8, H and W multiples of `factor`.
        """
        image = to_rgb(image) if isinstance(image, PIL.Image.Image) else load_image(image)
        height, width = self.target_size(image.height, image.width)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        return np.asarray(image)

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rescaled, normalized float32 image. Shapes: [H, W, 3] uint8 -> [3, H, W]."""
        if self.do_rescale:
            # float64 first, then float32: transformers' rescale, bit for bit (on any device).
            pixels = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        pixels = pixels.to(torch.float32).permute(2, 0, 1)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """Shapes: pixels [C, H, W] -> [gh * gw, C * Tp * P * P], merge blocks contiguous."""
        c, height, width = pixels.shape
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
        x = x.unsqueeze(5).expand(*x.shape[:5], tp, p, p)  # repeat the frame Tp times
        return x.reshape(gh * gw, c * tp * p * p)

    def pixel_values(
        self, resized: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu"
    ) -> ProcessedImages:
        """The device half of `preprocess`: rescale, normalize and patchify `resize`'s outputs on `device`.

        A vision replica runs this on its GPU, so only the uint8 pixels travel
        (an eighth of the float32 patches, which repeat each frame Tp times).
        """
        if len(resized) == 0:
            raise ImageError("no images to preprocess")
        patches, grids = [], []
        for array in resized:
            pixels = as_pixel_tensor(array, device)
            if pixels.dim() != 3 or pixels.shape[2] != 3 or pixels.dtype != torch.uint8:
                raise ImageError(f"expected resized RGB uint8 [H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
            self.check_multiple(pixels.shape[0], pixels.shape[1], "resized pixels")
            patches.append(self.patchify(self._normalized(pixels)))
            grids.append((1, pixels.shape[0] // self.patch_size, pixels.shape[1] // self.patch_size))
        return ProcessedImages(
            pixel_values=torch.cat(patches, dim=0).contiguous(),
            grid_thw=torch.tensor(grids, dtype=torch.int64),
        )

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> ProcessedImages:
        """Preprocess one image or a list, concatenating their patches (on the CPU).

        Bytes and paths go through `load_image` (EXIF applied); PIL images are
        used as given (only made RGB), like transformers' image processor.
        """
        if isinstance(images, (PIL.Image.Image, bytes, str, Path)):
            images = [images]
        if len(images) == 0:
            raise ImageError("no images to preprocess")
        return self.pixel_values([self.resize(source) for source in images])
