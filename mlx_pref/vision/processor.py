"""A vision-language model's tokenizer with its processor, and how rows with images
become token ids (TRL's vision format).

A row's prompt shows its images as ``{"type": "image"}`` parts of its messages'
content, filled in order from the row's ``images``; a prompt with no such part gets them
in front of its first user message (TRL's ``prepare_multimodal_messages``); a plain-text
row with images is read as one user message answered by the completion. The chat template
writes one image placeholder per part and the processor turns each into as many image
tokens as the image gets after resizing, so the tokens of a prompt fix the images' sizes:
the images belong to the prompt, never to a completion.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_pref.data.formats import Record, RowError
from mlx_pref.errors import ModelError
from mlx_pref.vision.images import ImageRef

PIXEL_CACHE = 32
"""Images whose processed pixels are kept (a step scores the same prompts up to three
times: the reference, KTO's KL rows, the policy)."""


def mlx_vlm_utils():
    """``mlx_vlm.utils``, or a one-line ModelError saying how to install it."""
    try:
        import mlx_vlm.utils
    except ImportError:
        raise ModelError(
            "vision-language models load through mlx-vlm, which is not installed: "
            "pip install 'mlx-pref[vision]'"
        ) from None
    return mlx_vlm.utils


def _is_image(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _image_parts(messages: list[dict]) -> int:
    return sum(
        _is_image(p) for m in messages if isinstance(m["content"], list) for p in m["content"]
    )


def _as_parts(content) -> list[dict]:
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


class VisionTokenizer:
    """A VLM's text tokenizer and its processor, passed where mlx-pref passes a tokenizer.

    Attributes are the text tokenizer's (``decode``, ``eos_token_id``, ...); the chat
    template is the processor's; ``processor`` tells the data pipeline that rows may carry
    images (``with_images``, ``encode_prompts``), and ``pixels`` prepares a prompt's images
    for the model."""

    def __init__(self, processor, name: str = ""):
        self.processor = processor
        self._tokenizer = processor.tokenizer
        """The text tokenizer (mlx-lm's wrapper keeps its tokenizer under this name too)."""
        self.name_or_path = name
        self._pixels: OrderedDict[tuple, dict[str, mx.array]] = OrderedDict()

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or self._tokenizer.chat_template

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], **kwargs):
        kwargs.setdefault("chat_template", self.chat_template)
        return self._tokenizer.apply_chat_template(messages, **kwargs)

    @property
    def image_token_id(self) -> int:
        return int(self.processor.image_token_id)

    def with_images(self, record: Record) -> Record:
        """``record`` in TRL's vision format: chat messages whose image parts match its
        images one for one; RowError (file:line:field) when they cannot."""
        keys = ("chosen", "rejected") if record.paired else ("completion",)
        if not record.chat:
            answers = {k: [{"role": "assistant", "content": getattr(record, k)}] for k in keys}
            record = replace(record, prompt=[{"role": "user", "content": record.prompt}], **answers)
        for key in keys:
            if _image_parts(getattr(record, key)):
                raise RowError(
                    "images", f"{record.where}: field '{key}' shows an image; images belong to "
                    "the prompt"
                )  # fmt: skip
        n, shown = len(record.images), _image_parts(record.prompt)
        if shown == 0:
            users = [i for i, m in enumerate(record.prompt) if m["role"] == "user"]
            if not users:
                raise RowError(
                    "images", f"{record.where}: field 'prompt' has no user message to show "
                    "the row's images in"
                )  # fmt: skip
            prompt = [dict(m) for m in record.prompt]
            first = prompt[users[0]]
            first["content"] = [{"type": "image"}] * n + _as_parts(first["content"])
            return replace(record, prompt=prompt)
        if shown != n:
            raise RowError(
                "images", f"{record.where}: field 'prompt' shows {shown} image(s) but field "
                f"'images' holds {n}"
            )  # fmt: skip
        return record

    def encode_prompts(
        self, texts: list[str], images: list[tuple], encode: Callable[[list[str]], list]
    ) -> list[tuple[int, ...]]:
        """Token ids of rendered prompts: the processor's for prompts with images (each
        placeholder becomes its image's tokens), ``encode``'s for the others."""
        out = encode(texts)
        for i, refs in enumerate(images):
            if refs:
                ids = self.processor(
                    text=[texts[i]], images=[r.open() for r in refs], add_special_tokens=False
                )["input_ids"]
                out[i] = tuple(int(t) for t in np.asarray(ids)[0])
        return out

    def pixels(self, images: tuple[ImageRef, ...]) -> dict[str, mx.array]:
        """The image processor's inputs for one prompt's images (``pixel_values``,
        ``image_grid_thw``), the last few kept."""
        key = tuple(r.digest for r in images)
        if key not in self._pixels:
            out = self.processor.image_processor(images=[r.open() for r in images])
            self._pixels[key] = {k: mx.array(np.asarray(v)) for k, v in out.items()}
            if len(self._pixels) > PIXEL_CACHE:
                self._pixels.popitem(last=False)
        self._pixels.move_to_end(key)
        return self._pixels[key]


def load_vision_tokenizer(path: Path, config: dict) -> VisionTokenizer:
    """The processor of the VLM in ``path`` (no weights read), as a VisionTokenizer."""
    utils = mlx_vlm_utils()
    try:
        utils.get_model_and_args(config)  # imports the architecture: registers its processor
        processor = utils.load_processor(path, True, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, OSError, ImportError, KeyError) as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"cannot load the processor of {path}: {text[0] if text else type(exc).__name__}"
        ) from None
    return VisionTokenizer(processor, str(path))
