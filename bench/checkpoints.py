"""Random-weight checkpoints of real architectures that the Serve app can load.

The Router tokenizes chat messages, so a served checkpoint needs a tokenizer
whose special tokens carry the architecture's ids (`<|image_pad|>` must be the
config's `image_token_id`, `<|vision_start|>` its `vision_start_token_id`).
`write_padded_tokenizer` takes the tiny byte-level BPE of `models.tiny_tokenizer`
(ids < 1,200) and pads its vocabulary with never-produced filler tokens so the
Qwen special tokens land at the real ids and every id below `vocab_size`
decodes. Prompts are short English text, so their token count differs from the
real tokenizer's by a few tokens; the image's tokens are exact.

`prepare_checkpoint(name, cache_dir)` writes weights + tokenizer once per cache
directory (a `.complete` marker guards against half-written ones), so the
serve and decode benchmarks of one device call share a multi-GB checkpoint.
`prepare_checkpoint(name, cache_dir, weights=False)` writes the same directory
without the weights (`<name>-dummy`; seconds) for replicas that run with
`load_format: dummy`: the full MoE shapes' checkpoints (~60-70 GB) do not fit the
GPU machine's disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import config_path

MARKER = ".complete"


def write_padded_tokenizer(out_dir: Path, config: dict) -> None:
    """Save a tokenizer into `out_dir` whose Qwen special tokens have the ids of `config`.

    Raises:
        ValueError: the config's special-token ids are not laid out as in Qwen's vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from models.tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, _set_tokenizer_class, _train_tokenizer

    trained = _train_tokenizer()
    vocab = {tok: i for tok, i in trained.get_vocab(with_added_tokens=False).items()}
    merges = json.loads(trained.to_str())["model"]["merges"]
    text = config.get("text_config", config)
    vocab_size = int(text["vocab_size"])
    base = int(config["image_token_id"]) - SPECIAL_TOKENS.index("<|image_pad|>")
    specials = {tok: base + k for k, tok in enumerate(SPECIAL_TOKENS)}
    expected = {"<|vision_start|>": config.get("vision_start_token_id"),
                "<|vision_end|>": config.get("vision_end_token_id"),
                "<|video_pad|>": config.get("video_token_id")}
    for tok, want in expected.items():
        if want is not None and specials[tok] != want:
            raise ValueError(f"{tok} would get id {specials[tok]}, the config says {want}")
    if base < len(vocab) or base + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"special tokens at {base} do not fit a vocabulary of {vocab_size}")
    by_id = {i: tok for tok, i in vocab.items()} | {i: tok for tok, i in specials.items()}
    # No merge builds a filler string, so BPE never emits one; they only make every id decodable.
    full = {by_id.get(i, f"<|fill{i}|>"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.BPE(full, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]))
    tokenizer.normalizer = trained.normalizer
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = trained.decoder
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=int(text.get("max_position_embeddings", 32768)),
        clean_up_tokenization_spaces=False, split_special_tokens=False, chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    _set_tokenizer_class(out_dir / "tokenizer_config.json")


def prepare_checkpoint(
    name: str, cache_dir: str | Path | None, dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu", tokenizer: bool = True, config_json: str | Path | None = None,
    weights: bool = True,
) -> Path:
    """`cache_dir/<name>`: random weights of `configs/models/<name>.json` (+ tokenizer), written once.

    Args:
        cache_dir: where checkpoints live between runs; None makes a fresh temporary directory
            (the caller removes it).
        config_json: another config.json instead of `configs/models/<name>.json` (smoke tests).
        weights: False writes `cache_dir/<name>-dummy` with everything but the safetensors (for
            `load_format: dummy`).
    """
    from models.random_weights import write_config_files, write_random_checkpoint

    source = Path(config_json) if config_json is not None else config_path(name)
    label = name if weights else f"{name}-dummy"
    if cache_dir is None:
        out = Path(tempfile.mkdtemp(prefix=f"splitvl-bench-{label}-"))
    else:
        out = Path(cache_dir) / label
        if (out / MARKER).is_file() and (not tokenizer or (out / "tokenizer.json").is_file()):
            return out
        shutil.rmtree(out, ignore_errors=True)
    if weights:
        write_random_checkpoint(source, out, dtype, device)
    else:
        write_config_files(source, out)
    if tokenizer:
        write_padded_tokenizer(out, json.loads(source.read_text()))
    (out / MARKER).write_text("ok\n")
    return out
