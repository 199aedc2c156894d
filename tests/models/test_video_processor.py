"""Video preprocessing parity with transformers' Qwen3VLVideoProcessor and Qwen3VLProcessor.

transformers' video processor needs torchvision (a test-only dependency here);
its frames come from transformers' own PyAV loader (`load_video(backend="pyav")`),
ours from `deployments.media_video.decode_video`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.video_io import VideoDecodeError, VideoLimits, decode_video
from models.video_processor import VideoError, VideoProcessor, video_prompt
from tests.videos import noise_frames, noise_video

pytest.importorskip("av")
LIMITS = VideoLimits(max_seconds=60, max_frames=2000, max_frame_pixels=4096 * 4096)


def _hf_video_processor(model_dir):
    pytest.importorskip("torchvision")
    from transformers import AutoVideoProcessor

    return AutoVideoProcessor.from_pretrained(model_dir)


def _load_all_frames(path):
    """transformers' PyAV loader; for containers without a frame count (which it
    cannot read) every frame decoded with PyAV and the same metadata fields."""
    import av
    from transformers.video_utils import VideoMetadata, load_video

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return load_video(str(path), backend="pyav")
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        return frames, VideoMetadata(total_num_frames=len(frames), fps=float(stream.average_rate))


def _hf_reference(model_dir, path):
    video, metadata = _load_all_frames(path)
    hf = _hf_video_processor(model_dir)
    out = hf(videos=[video], video_metadata=[metadata], return_metadata=True, cap_pixels_per_frame=False)
    return video, metadata, out


def _ours(model_dir, data: bytes):
    proc = VideoProcessor.from_pretrained(model_dir)
    decoded = decode_video(data, proc.sample_indices, LIMITS)
    return proc, decoded, proc.preprocess([decoded.frames])


@pytest.mark.parametrize(
    "seconds,fps,height,width,kwargs",
    [
        (3, 4, 64, 96, {}),  # 6 sampled frames, 3 groups
        (2.5, 6, 40, 130, {"codec": "libx264"}),  # odd size: resized up; 5 frames -> last repeated
        (1, 8, 128, 72, {"codec": "libvpx-vp9", "container": "webm"}),  # no frame count in the header
        (6, 2, 48, 48, {}),  # 12 frames at fps 2: every frame kept
    ],
)
def test_pixels_grid_and_frames_match_transformers(tiny_checkpoint, tmp_path, seconds, fps, height, width, kwargs):
    model_dir = tiny_checkpoint("qwen3_vl")
    data = noise_video(seconds=seconds, fps=fps, height=height, width=width, seed=3, **kwargs)
    path = tmp_path / ("v.webm" if kwargs.get("container") == "webm" else "v.mp4")
    path.write_bytes(data)
    _, metadata, ref = _hf_reference(model_dir, path)
    proc, decoded, ours = _ours(model_dir, data)
    ref_meta = ref["video_metadata"][0]
    assert decoded.fps == pytest.approx(ref_meta.fps)
    assert decoded.total_num_frames == metadata.total_num_frames
    assert list(decoded.frame_indices) == ref_meta.frames_indices.tolist()
    assert torch.equal(ours.grid_thw, ref["video_grid_thw"])
    assert torch.equal(ours.pixel_values, ref["pixel_values_videos"])


def test_settings_follow_transformers_loading_order(tiny_checkpoint, tmp_path):
    """video_preprocessor_config.json wins over preprocessor_config.json; class defaults fill gaps."""
    src = tiny_checkpoint("qwen3_vl")
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            (tmp_path / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((src / "video_preprocessor_config.json").read_text())
    cfg.update(fps=3, min_frames=2, max_frames=9, size={"shortest_edge": 2048, "longest_edge": 50000})
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(cfg))
    hf = _hf_video_processor(tmp_path)
    ours = VideoProcessor.from_pretrained(tmp_path)
    assert (ours.fps, ours.min_frames, ours.max_frames) == (hf.fps, hf.min_frames, hf.max_frames)
    assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert ours.image_mean == tuple(hf.image_mean) and ours.image_std == tuple(hf.image_std)
    defaults = VideoProcessor.from_dict({})
    from transformers import Qwen3VLVideoProcessor

    assert defaults.fps == Qwen3VLVideoProcessor.fps and defaults.max_frames == Qwen3VLVideoProcessor.max_frames
    assert defaults.min_pixels == Qwen3VLVideoProcessor.size["shortest_edge"]
    assert defaults.image_mean == tuple(Qwen3VLVideoProcessor.image_mean)


def test_frame_sampling_matches_transformers_over_many_clips(tiny_checkpoint):
    from transformers.video_utils import VideoMetadata

    hf = _hf_video_processor(tiny_checkpoint("qwen3_vl"))
    for cfg in ({}, {"fps": 1, "min_frames": 2, "max_frames": 7}, {"num_frames": 5, "fps": None}):
        ours = VideoProcessor.from_dict(cfg)
        kwargs = {k: v for k, v in cfg.items() if k in ("fps", "num_frames")}
        hf.min_frames, hf.max_frames = ours.min_frames, ours.max_frames
        for total in (1, 2, 3, 7, 30, 241, 2000):
            for video_fps in (1.0, 7.5, 24.0, 29.97, 60.0):
                meta = VideoMetadata(total_num_frames=total, fps=video_fps)
                want = hf.sample_frames(meta, **kwargs)
                assert ours.sample_indices(total, video_fps).tolist() == list(want), (cfg, total, video_fps)


def test_prompt_ids_match_qwen3_vl_processor(tiny_checkpoint, tmp_path):
    """Timestamps and per-frame-group placeholders, tokenized, equal the HF processor's input_ids."""
    from transformers import AutoProcessor

    pytest.importorskip("torchvision")
    model_dir = tiny_checkpoint("qwen3_vl")
    data = noise_video(seconds=3.5, fps=4, height=64, width=96, seed=5)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    hf = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "before"}, {"type": "video"}, {"type": "text", "text": "after"}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    video, metadata = _load_all_frames(path)
    ref = hf(text=[text], videos=[video], videos_kwargs={"video_metadata": [metadata], "cap_pixels_per_frame": False})

    proc, decoded, ours = _ours(model_dir, data)
    grid = ours.grid_thw[0].tolist()
    wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
    expansion = video_prompt(
        proc.timestamps(decoded.frame_indices, decoded.fps), proc.tokens_per_frame_group(grid),
        "<|vision_start|>", "<|video_pad|>", "<|vision_end|>",
    )
    ids = hf.tokenizer.encode(text.replace(wrapper, expansion), add_special_tokens=False)
    assert ids == ref["input_ids"][0]


def test_too_few_frames_and_bad_inputs_are_user_errors():
    proc = VideoProcessor()
    with pytest.raises(VideoError):
        proc.target_size(1, 64, 64)  # one sampled frame cannot fill a temporal patch of 2
    with pytest.raises(VideoError):
        proc.resize(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(VideoError):
        proc.sample_indices(0, 24.0)


def test_decode_limits_and_garbage_are_media_errors():
    proc = VideoProcessor()
    data = noise_video(seconds=2, fps=8, height=64, width=64)
    with pytest.raises(VideoDecodeError, match="max_video_seconds"):
        decode_video(data, proc.sample_indices, VideoLimits(1.5, 1000, 10**6))
    with pytest.raises(VideoDecodeError, match="max_video_frames"):
        decode_video(data, proc.sample_indices, VideoLimits(60, 10, 10**6))
    with pytest.raises(VideoDecodeError, match="pixels"):
        decode_video(data, proc.sample_indices, VideoLimits(60, 1000, 63 * 64))
    webm = noise_video(seconds=2, fps=8, height=64, width=64, codec="libvpx-vp9", container="webm")
    with pytest.raises(VideoDecodeError, match="max_video_frames"):  # counted while decoding: no header count
        decode_video(webm, proc.sample_indices, VideoLimits(60, 10, 10**6))
    for garbage in (b"", b"not a video at all" * 50, data[: len(data) // 3]):
        with pytest.raises(VideoDecodeError):
            decode_video(garbage, proc.sample_indices, LIMITS)


def test_decoded_frames_are_the_encoded_frames():
    """Lossless-enough check: decoded sampled frames are close to the frames we encoded."""
    frames = noise_frames(8, 64, 64, seed=2)
    from tests.videos import encode_video

    data = encode_video(frames, fps=4, codec="libx264")
    decoded = decode_video(data, lambda total, fps: np.array([0, 3, 7]), LIMITS)
    assert decoded.frame_indices == (0, 3, 7) and decoded.total_num_frames == 8 and decoded.fps == 4.0
    err = np.abs(decoded.frames.astype(int) - frames[[0, 3, 7]].astype(int)).mean()
    assert err < 12
