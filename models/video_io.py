"""Decoding request videos with PyAV, under limits, keeping only the sampled frames.

PyAV is the maintained Python binding of FFmpeg; its wheels bundle FFmpeg, so
no system package is needed, and it is the decoder transformers' own video
loader uses (`read_video_pyav`): same frame count (`stream.frames`), frame rate
(`stream.average_rate`) and RGB conversion, so our frames are transformers'.

Limits are checked from the container header before any frame is decoded
(frame size, duration, frame count) and again while decoding (a header can
lie). Only the frames the video processor samples are converted to RGB and
kept, so memory is bounded by the sampled frames, not the clip. Decoding is
CPU-bound and blocking: the router runs it in a thread
(`deployments/media.py: load_request_video`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.video_processor import VideoError, VideoProcessor

# Sampled frame indices for (total_num_frames, video_fps).
SampleFn = Callable[[int, float], np.ndarray]


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """What one request video may cost to decode."""

    max_seconds: float
    max_frames: int
    max_frame_pixels: int


UNLIMITED = VideoLimits(max_seconds=float("inf"), max_frames=2**62, max_frame_pixels=2**62)


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    """The sampled frames of one video.

    Shapes: frames [n, H, W, 3] uint8 RGB; frame_indices [n] ascending indices
    into the video's `total_num_frames` frames.
    """

    frames: np.ndarray
    frame_indices: tuple[int, ...]
    fps: float
    total_num_frames: int


class VideoDecodeError(VideoError):
    """Not a decodable video. `code` is an OpenAI error code for the over-limit cases."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def _error(message: str, code: str | None = None) -> VideoDecodeError:
    return VideoDecodeError(message, code)


def _open(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise _error(f"cannot decode video: {type(exc).__name__}") from exc
    if not container.streams.video:
        container.close()
        raise _error("the file holds no video stream")
    return container


def _header(stream, limits: VideoLimits) -> tuple[float, int]:
    """(fps, declared frame count) after the header checks."""
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
        raise _error("the video has no frame rate")
    fps = float(rate)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise _error(f"video frames have no pixels ({width}x{height})")
    if width * height > limits.max_frame_pixels:
        raise _error(
            f"video frames are {width}x{height} = {width * height} pixels; the limit is {limits.max_frame_pixels}",
            code="video_too_large",
        )
    frames = int(stream.frames or 0)
    _check_length(frames, fps, limits)
    return fps, frames


def _check_length(frames: int, fps: float, limits: VideoLimits) -> None:
    if frames > limits.max_frames:
        raise _error(f"the video has more than {limits.max_frames} frames (max_video_frames)", code="video_too_long")
    if frames / fps > limits.max_seconds:
        raise _error(
            f"the video is longer than {limits.max_seconds:g} seconds (max_video_seconds)", code="video_too_long"
        )


def _count_frames(data: bytes, limits: VideoLimits, fps: float) -> int:
    """Frames of a container whose header does not say (e.g. WebM), by decoding them."""
    container = _open(data)
    try:
        count = 0
        for _ in container.decode(video=0):
            count += 1
            _check_length(count, fps, limits)
        return count
    finally:
        container.close()


def _decode_indices(data: bytes, wanted: np.ndarray, limits: VideoLimits, fps: float) -> tuple[list[np.ndarray], int]:
    """RGB arrays of the frames at `wanted` (ascending), and how many frames were read."""
    import av

    keep = set(int(i) for i in wanted)
    last = int(wanted[-1])
    frames: list[np.ndarray] = []
    container = _open(data)
    count = 0
    try:
        for index, frame in enumerate(container.decode(video=0)):
            count = index + 1
            _check_length(count, fps, limits)
            if index in keep:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= last:
                break
    except av.FFmpegError as exc:
        raise _error(f"cannot decode video: {type(exc).__name__}") from exc
    finally:
        container.close()
    return frames, count


def decode_video(data: bytes, sample: SampleFn, limits: VideoLimits = UNLIMITED) -> DecodedVideo:
    """Decode the frames `sample(total_num_frames, fps)` picks from an encoded video.

    Raises:
        VideoDecodeError: not a video, no frames, or over a limit (all HTTP 400).
    """
    import av

    container = _open(data)
    try:
        fps, total = _header(container.streams.video[0], limits)
    except av.FFmpegError as exc:
        raise _error(f"cannot decode video: {type(exc).__name__}") from exc
    finally:
        container.close()
    if total == 0:
        total = _count_frames(data, limits, fps)
    for _ in range(2):
        if total < 1:
            raise _error("the video has no decodable frames")
        wanted = np.asarray(sample(total, fps), dtype=np.int64)
        frames, read = _decode_indices(data, wanted, limits, fps)
        if len(frames) == len(wanted):
            shapes = {f.shape for f in frames}
            if len(shapes) != 1:
                raise _error("video frames change size mid-stream; this is not supported")
            return DecodedVideo(np.stack(frames), tuple(int(i) for i in wanted), fps, total)
        total = read  # the header overstated the frame count: sample again from what is there
    raise _error("the video's frames could not be decoded")


@dataclass(frozen=True, slots=True)
class PreparedVideo:
    """A video after the host half of preprocessing.

    Shapes: resized [T, h, w, 3] uint8 (the sampled frames, resized); grid_thw
    (frame groups, h, w in patches); one timestamp (seconds) per frame group.
    """

    resized: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]


def prepare_video(data: bytes, processor: VideoProcessor, limits: VideoLimits = UNLIMITED) -> PreparedVideo:
    """Decode, sample and resize one encoded video (blocking: run it off an event loop).

    Raises:
        VideoError: not a video, over a limit, or too small to preprocess.
    """
    decoded = decode_video(data, processor.sample_indices, limits)
    resized = processor.resize(decoded.frames)
    t, h, w = processor.grid_thw(*decoded.frames.shape[:3])
    return PreparedVideo(resized, (t, h, w), tuple(processor.timestamps(decoded.frame_indices, decoded.fps)))
