"""Answers of a model to prompts: what ``generate_during_eval`` writes to samples.jsonl."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.nn as nn


def answer(model: nn.Module, tokenizer, prompt: Sequence[int], max_tokens: int) -> str:
    """The greedy continuation of a tokenized prompt (dropout off), decoded."""
    from mlx_lm import generate

    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, list(prompt), max_tokens=max_tokens)
    finally:
        model.train(was_training)
