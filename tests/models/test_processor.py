"""Image preprocessing parity with transformers' Qwen2VLImageProcessor (PIL backend)."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from models.processor import (
    ImageDecodeError,
    ImageProcessor,
    ImageSizeError,
    ImageTooLargeError,
    check_image_size,
    load_image,
    smart_resize,
)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("qwen3_vl")


@pytest.fixture(scope="module")
def hf_processor(model_dir):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def ours(model_dir):
    return ImageProcessor.from_pretrained(model_dir)


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    # Smooth gradient plus noise: exercises the resize filter on real structure.
    base = np.linspace(0, 255, width * height).reshape(height, width)
    if channels is not None:
        base = base[..., None]
    arr = np.clip(base + rng.randint(-60, 60, shape), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(arr, mode=mode)


def _assert_parity(ours, hf_processor, images) -> None:
    expected = hf_processor(images=images, return_tensors="pt")
    got = ours.preprocess(images)
    assert torch.equal(got.grid_thw, expected["image_grid_thw"])
    assert got.pixel_values.dtype == torch.float32
    assert got.pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(got.pixel_values, expected["pixel_values"].float(), rtol=0, atol=1e-5)
    for image, row in zip(images, got.grid_thw):
        n_patches = hf_processor.get_number_of_image_patches(image.height, image.width, {})
        assert int(row.prod()) == n_patches
        assert ours.num_image_tokens(row) == n_patches // hf_processor.merge_size**2


SIZES = [
    (64, 64),  # square, already a multiple of 32
    (100, 100),  # square, resized
    (300, 100),  # 3:1 wide
    (60, 300),  # 1:5 tall
    (1, 1),
    (10, 10),
    (1500, 900),  # large: capped by max_pixels
    (37, 515),
    (1000, 10),  # 100:1
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_sizes(ours, hf_processor, size):
    _assert_parity(ours, hf_processor, [_noise(*size)])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P-transparency"])
def test_parity_modes(ours, hf_processor, mode):
    if mode.startswith("P"):
        image = _noise(90, 70).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=32)
        if mode == "P-transparency":
            image.info["transparency"] = 3
    else:
        image = _noise(90, 70, mode)
    _assert_parity(ours, hf_processor, [image])
    # load_image gives the same pixels as handing the raw image to the processor.
    _assert_parity(ours, hf_processor, [load_image(image)])


def test_parity_batch_of_different_sizes(ours, hf_processor):
    images = [_noise(64, 64, seed=1), _noise(300, 100, seed=2), _noise(33, 97, seed=3)]
    _assert_parity(ours, hf_processor, images)
    got = ours.preprocess(images)
    counts = [int(g.prod()) for g in got.grid_thw]
    single = [ours.preprocess(im).pixel_values for im in images]
    assert torch.equal(got.pixel_values, torch.cat(single))
    assert sum(counts) == got.pixel_values.shape[0]


def test_parity_with_published_style_config(tmp_path):
    """A Qwen3-VL style file that leaves most keys to the class defaults."""
    from transformers import Qwen2VLImageProcessorPil

    cfg = {
        "size": {"longest_edge": 32 * 32 * 64, "shortest_edge": 32 * 32 * 2},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    for size in [(640, 480), (20, 20), (77, 333)]:
        _assert_parity(ours, hf, [_noise(*size)])


def test_legacy_min_max_pixels_keys(tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    cfg = {"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "merge_size": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert (ours.min_pixels, ours.max_pixels, ours.patch_size) == (3136, 50176, 14)
    _assert_parity(ours, hf, [_noise(500, 300)])


def test_grid_and_token_count_without_decoding(ours, hf_processor):
    for width, height in SIZES:
        t, h, w = ours.grid_thw(height, width)
        assert t == 1
        assert h * w == hf_processor.get_number_of_image_patches(height, width, {})
        assert ours.num_image_tokens((t, h, w)) == h * w // 4


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    rng = np.random.RandomState(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.randint(1, 3000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, 32, 4096, 262144) == hf_resize(h, w, 32, 4096, 262144)
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        smart_resize(1, 300, 32, 4096, 262144)


def _encode(image: PIL.Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    image = _noise(40, 30)
    data = _encode(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (data, str(path), path, image):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (40, 30)
        assert np.array_equal(np.asarray(out), np.asarray(image))


def test_load_image_modes():
    rgba = PIL.Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(load_image(_encode(rgba)))[0, 0].tolist() == [255, 255, 255]
    gray = PIL.Image.new("L", (3, 2), 77)
    assert np.asarray(load_image(_encode(gray)))[0, 0].tolist() == [77, 77, 77]
    one = load_image(_encode(PIL.Image.new("RGB", (1, 1), (1, 2, 3))))
    assert one.size == (1, 1)


def test_load_image_exif_orientation():
    image = _noise(40, 20)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = load_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_transposes_as_pil_does(orientation):
    """Every EXIF orientation, against PIL's own `exif_transpose` of a fresh decode (the reference)."""
    import PIL.ImageOps

    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_noise(40, 20, seed=orientation), "PNG", exif=exif.tobytes())
    reference = PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data))).convert("RGB")
    out = load_image(data)
    assert out.size == reference.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    assert out.getexif().get(0x0112, 1) == 1


def test_load_image_leaves_a_callers_image_alone():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    given = PIL.Image.open(io.BytesIO(_encode(_noise(40, 20), "PNG", exif=exif.tobytes())))
    given.load()
    before = np.asarray(given).copy()
    out = load_image(given)
    assert out.size == (20, 40) and given.size == (40, 20)
    assert np.array_equal(np.asarray(given), before) and given.getexif().get(0x0112) == 6


def test_bad_images():
    with pytest.raises(ImageDecodeError):
        load_image(b"definitely not an image")
    with pytest.raises(ImageDecodeError):
        load_image(_encode(_noise(50, 50))[:60])  # truncated
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(_encode(_noise(50, 50)), max_pixels=2000)
    with pytest.raises(ImageTooLargeError):
        check_image_size(10_000, 10_000, 50_000_000)
    check_image_size(100, 100, 10_000)
    with pytest.raises(ImageSizeError):
        check_image_size(0, 5, None)


def test_preprocess_rejects_extreme_aspect(ours):
    with pytest.raises(ImageSizeError):
        ours.preprocess(_noise(400, 1))


def test_split_host_device_halves_equal_preprocess(ours, hf_processor):
    """resize (router) + pixel_values (vision replica) == preprocess == transformers, bit for bit."""
    images = [_noise(300, 200, seed=1), _noise(97, 501, "RGBA", seed=2)]
    resized = [ours.resize(im) for im in images]
    assert all(r.dtype == np.uint8 and r.shape[0] % ours.factor == 0 for r in resized)
    frozen = [r.copy() for r in resized]
    for r in frozen:
        r.setflags(write=False)  # as mapped out of Ray's object store
    split = ours.pixel_values(frozen)
    whole = ours.preprocess(images)
    assert torch.equal(split.pixel_values, whole.pixel_values)
    assert torch.equal(split.grid_thw, whole.grid_thw)
    ref = hf_processor(images=images, return_tensors="pt")
    assert torch.equal(split.pixel_values, ref["pixel_values"])


def test_pixel_values_rejects_bad_arrays(ours):
    with pytest.raises(ImageSizeError, match="multiples of 32"):
        ours.pixel_values([np.zeros((40, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        ours.pixel_values([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match="uint8"):
        ours.pixel_values([np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        ours.pixel_values([])


@pytest.mark.gpu
def test_pixel_values_on_gpu_equal_cpu(ours):
    resized = [ours.resize(_noise(1024, 768, seed=3)), ours.resize(_noise(448, 448, seed=4))]
    gpu = ours.pixel_values(resized, "cuda")
    cpu = ours.pixel_values(resized)
    assert gpu.pixel_values.is_cuda and not gpu.grid_thw.is_cuda
    assert torch.equal(gpu.pixel_values.cpu(), cpu.pixel_values)
    assert torch.equal(gpu.grid_thw, cpu.grid_thw)
