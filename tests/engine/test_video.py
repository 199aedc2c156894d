"""Video prompts through `engine.LLM` vs transformers' own models (fp32, greedy equal).

transformers gets the same token ids and `pixel_values_videos` / `video_grid_thw`
(their parity with transformers' processor is tests/models/test_video_processor.py)
and computes its own mRoPE positions (per frame group), embedding placement
and deepstack; the engine must produce the same tokens.
"""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from models.video_io import decode_video
from models.video_processor import VideoProcessor
from tests.engine.helpers import HFReference, arch_llm_fixture, image
from tests.videos import noise_video

pytest.importorskip("av")
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _messages(parts: list[dict]) -> list[dict]:
    return [{"role": "user", "content": parts}]


def _hf_inputs(hf: HFReference, model_dir, ids: list[int], videos: list[bytes], images: list) -> dict:
    proc = VideoProcessor.from_pretrained(model_dir)
    frames = [decode_video(v, proc.sample_indices).frames for v in videos]
    cfg = hf.config
    input_ids = torch.tensor([ids])
    types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types}
    if videos:
        pv = proc.preprocess(frames)
        kwargs.update(pixel_values_videos=pv.pixel_values, video_grid_thw=pv.grid_thw)
    if images:
        pi = hf.processor(images=images, return_tensors="pt")
        kwargs.update(pixel_values=pi["pixel_values"], image_grid_thw=pi["image_grid_thw"])
    return kwargs


@torch.inference_mode()
def _hf_greedy(hf: HFReference, inputs: dict, n: int) -> list[int]:
    out = hf.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


arch_llm = arch_llm_fixture(["qwen3_vl", "qwen3_5"])


def test_video_prompts_match_transformers(arch_llm):
    path, llm = arch_llm
    hf = HFReference(path)
    clip_a = noise_video(seconds=3, fps=4, height=64, width=96, seed=1)
    clip_b = noise_video(seconds=2.5, fps=6, height=40, width=130, seed=2, codec="libx264")
    still = image(64, 64, 3)
    cases = {
        "one_video": ([{"type": "video", "video": clip_a}, {"type": "text", "text": "What happens?"}], [clip_a], []),
        "video_image_video": (
            [{"type": "text", "text": "Compare"}, {"type": "video", "video": clip_b}, {"type": "image", "image": still},
             {"type": "video", "video": clip_a}, {"type": "text", "text": "now"}], [clip_b, clip_a], [still]),
    }
    prompts = [{"messages": _messages(parts)} for parts, _, _ in cases.values()]
    outs = llm.generate(prompts, GREEDY)  # one batch
    for (name, (_, videos, images)), out in zip(cases.items(), outs):
        ids = out.prompt_token_ids
        assert ids.count(llm.model_config.video_token_id) > 0
        ref = _hf_greedy(hf, _hf_inputs(hf, path, ids, videos, images), GREEDY.max_tokens)
        assert out.token_ids == ref, name


def test_prompt_ids_hold_timestamps_and_one_span_per_frame_group(arch_llm):
    path, llm = arch_llm
    clip = noise_video(seconds=3, fps=4, height=64, width=96, seed=1)
    ids, mm = llm.prepare({"messages": _messages([{"type": "video", "video": clip}])})
    text = llm.tokenizer.decode(ids)
    proc = VideoProcessor.from_pretrained(path)
    decoded = decode_video(clip, proc.sample_indices)
    stamps = proc.timestamps(decoded.frame_indices, decoded.fps)
    assert [f"<{t:.1f} seconds>" in text for t in stamps] == [True] * len(stamps)
    assert len(mm.image_grid_thw) == len(stamps) and all(g[0] == 1 for g in mm.image_grid_thw)
    assert "<|vision_start|><|vision_start|>" not in text  # the template's outer wrapper is gone


def test_video_with_token_ids_or_bad_bytes_is_a_clear_error(arch_llm):
    from engine.errors import EngineInputError

    _, llm = arch_llm
    with pytest.raises(EngineInputError, match="text prompt"):
        llm.prepare({"prompt_token_ids": [1, 2], "videos": [b"x"]})
    with pytest.raises(EngineInputError, match="video"):
        llm.prepare({"messages": _messages([{"type": "video", "video": b"not a video" * 10}])})
    with pytest.raises(EngineInputError, match="placeholder"):
        llm.prepare({"prompt": "no video here", "videos": [noise_video(seconds=1, fps=4)]})


def test_video_logprobs_match_transformers(arch_llm):
    """Logprobs too: greedy tokens of a tiny model can agree even when positions are off; logits do not."""
    path, llm = arch_llm
    hf = HFReference(path)
    clip = noise_video(seconds=3, fps=4, height=64, width=96, seed=4)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    out = llm.generate([{"messages": _messages([{"type": "video", "video": clip}])}], params)[0]
    inputs = _hf_inputs(hf, path, out.prompt_token_ids, [clip], [])
    with torch.inference_mode():
        ref = hf.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logprobs = torch.cat(ref.logits).float().log_softmax(-1)
    for step, lp in enumerate(out.logprobs):
        top_vals, top_ids = logprobs[step].topk(3)
        assert list(lp.top_ids) == top_ids.tolist()
        assert torch.allclose(torch.tensor(lp.top_logprobs), top_vals, atol=1e-4)
