"""A tiny random Qwen2-VL that mlx-vlm loads offline, and small images, for the vision tests.

The folder holds what mlx-vlm's loader reads: ``config.json`` (text settings at the top
level, ``vision_config`` beside them), a byte-level BPE ``tokenizer.json`` with Qwen2-VL's
special tokens, a ChatML template that writes ``<|vision_start|><|image_pad|><|vision_end|>``
for each image part, ``preprocessor_config.json`` for mlx-vlm's own image processor, and
random weights in MLX's layout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a helpful assistant.",
    "What colour is the square? Describe the picture.",
    "The square is red. The square is blue. A green circle on a white ground.",
    "I cannot see anything. No idea, sorry.",
    "user assistant system",
]


def write_tokenizer(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    ids = {t: hf.convert_tokens_to_ids(t) for t in SPECIAL}
    ids["vocab"] = len(hf)
    return ids


VISION_CONFIGS = {
    "qwen2_vl": {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2},  # mlp_ratio: an int,
    # as transformers' strict config rejects 2.0
    "qwen2_5_vl": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
}


def write_tiny_qwen2_vl(directory: Path, seed: int = 0, model_type: str = "qwen2_vl") -> Path:
    """A random Qwen2-VL (or Qwen2.5-VL: ``model_type``) in ``directory``: 2 text blocks,
    hidden size 64, a 2-block vision tower."""
    from mlx_vlm.utils import get_model_and_args

    processor = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    architecture = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[model_type]

    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": processor,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "min_pixels": 56 * 56,
                "max_pixels": 112 * 112,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
            }
        )
    )
    config = {
        "model_type": model_type,
        "architectures": [f"{architecture}ForConditionalGeneration"],
        "vocab_size": ids["vocab"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "vision_config": {
            "model_type": model_type,
            **VISION_CONFIGS[model_type],
            "depth": 2,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    arch, _ = get_model_and_args(config)
    model_config = arch.ModelConfig.from_dict(config)
    model_config.vision_config = arch.VisionConfig.from_dict(config["vision_config"])
    model_config.text_config = arch.TextConfig.from_dict(config)
    mx.random.seed(seed)
    model = arch.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return directory


def png(colour: tuple[int, int, int], size: tuple[int, int] = (56, 84), seed: int = 0) -> bytes:
    """A small PNG: a flat colour with a little noise (width, height = ``size``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
