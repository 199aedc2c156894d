"""Short test videos written with PyAV (coloured noise, a few frames)."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np


def noise_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth coloured noise (codecs keep it recognisable). Shapes: -> [T, H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(num_frames, height // 8 + 1, width // 8 + 1, 3))
    frames = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    return frames.astype(np.uint8)


def encode_video(
    frames: np.ndarray, fps: int = 4, codec: str = "mpeg4", container: str = "mp4"
) -> bytes:
    """Encode [T, H, W, 3] uint8 frames (H, W even) into a `container` file's bytes."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def noise_video(
    seconds: float = 2.0, fps: int = 4, height: int = 64, width: int = 96, seed: int = 0, **kwargs
) -> bytes:
    """An encoded clip of `seconds * fps` noise frames."""
    return encode_video(noise_frames(round(seconds * fps), height, width, seed), fps=fps, **kwargs)
