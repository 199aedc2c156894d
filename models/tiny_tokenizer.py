"""An offline Qwen-style tokenizer for the tiny checkpoints.

Byte-level BPE with Qwen2's pre-tokenizer regex, trained with `tokenizers` on a
small built-in English corpus; the Qwen special tokens follow the learned
vocabulary (as in the real vocab), and the chat template renders
system/user/assistant turns with image parts as
`<|vision_start|><|image_pad|><|vision_end|>`. Saved as `tokenizer.json` +
`tokenizer_config.json` so `AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2 / Qwen3 pre-tokenization regex (transformers' Qwen2Tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BPE_VOCAB_SIZE = 1200

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    # Qwen3's switch (`chat_template_kwargs: {"enable_thinking": false}`): an empty think block.
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
You are a helpful assistant. Describe the image in one sentence. What is in this picture?
There is a red car parked next to a small house with a green door and two windows.
The cat is sleeping on the sofa while the dog plays with a ball in the garden.
Please answer the question using the information shown in the image and the text.
A large mountain rises above the lake; the water is calm and the sky is blue.
The chart shows the number of visitors per month: January 120, February 95, March 143.
Hello! How can I help you today? I would like to know the weather in the city.
Tomorrow it will be sunny in the morning and cloudy in the afternoon, with light rain.
Language models read text as tokens. Vision encoders turn images into patches.
Each patch is sixteen pixels wide; four patches are merged into one image token.
Reading, writing and counting are skills people learn at school when they are young.
The train leaves the station at seven o'clock and arrives in the capital at noon.
She said: "I'll bring the books, you'll bring the maps, and we're going together."
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 and 3.14 appear in many documents.
Colors: red, orange, yellow, green, blue, indigo, violet, black, white, gray, brown.
Animals: cat, dog, horse, cow, sheep, bird, fish, lion, tiger, bear, rabbit, mouse.
Food: bread, cheese, apple, banana, orange, rice, soup, salad, pizza, coffee, tea.
The user uploaded two photos. The first one shows a beach, the second a forest trail.
def add(a, b):\n    return a + b\nprint(add(2, 3))  # prints 5
Scientists measure temperature, pressure and humidity to understand how storms develop.
The museum opened a new exhibition about ancient maps, ships, coins and handwritten letters.
Our team reviewed the report, fixed several mistakes, and published the final version online.
Children built a wooden bridge across the river using ropes, nails, planks and a hammer.
Fresh vegetables from the market: carrots, potatoes, onions, tomatoes, peppers and lettuce.
The doctor asked the patient about sleep, exercise, diet and any recent changes in health.
Engineers designed a faster processor with more memory, lower power and better cooling.
Musicians practiced the symphony for weeks before the concert in the beautiful old theater.
Students solved equations, drew triangles, computed areas and explained every single step.
Travelers crossed deserts, forests, valleys and frozen glaciers during their long journey.
Questions? Answers! Lists; colons: brackets [like this] and braces {like that}.
"""


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True) * 2, trainer=trainer)
    # Special tokens come after the learned vocab, as in Qwen's real vocabulary.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return tokenizer


def write_tokenizer(out_dir: Path) -> tuple[dict[str, int], int]:
    """Train and save the tokenizer into `out_dir`.

    Returns:
        (special token -> id, total vocabulary length incl. special tokens).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = _train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    _set_tokenizer_class(out_dir / "tokenizer_config.json")
    special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    return special_ids, tokenizer.get_vocab_size(with_added_tokens=True)


def _set_tokenizer_class(path: Path) -> None:
    import json

    cfg = json.loads(path.read_text())
    # The published Qwen3-VL checkpoints name Qwen2Tokenizer; AutoTokenizer then
    # builds it from tokenizer.json.
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
