"""Model loading: quantized bases (QLoRA), dequantizing, dtypes, clear errors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import dequantize_model

from mlx_pref.errors import ModelError
from mlx_pref.models import load_model, resolve_model_path
from mlx_pref.train import Trainer

TOKENS = mx.array([[5, 9, 33, 120, 7, 2]])


def test_quantize_then_dequantize_keeps_the_quantized_values(tiny_model):
    quantized = load_model(str(tiny_model), quantization_bits=4).model
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    before = quantized(TOKENS)
    quantized = dequantize_model(quantized)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(quantized.model.embed_tokens, nn.Embedding)
    np.testing.assert_allclose(np.asarray(quantized(TOKENS)), np.asarray(before), atol=1e-4)
    full = load_model(str(tiny_model)).model(TOKENS)
    assert float(mx.abs(full - before).max()) > 1e-3  # 4-bit really changed the weights


def test_dtype_casts_float_weights(tiny_model):
    model = load_model(str(tiny_model), dtype="bfloat16").model
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_qlora_trains_on_a_4bit_base(make_config):
    trainer = Trainer(make_config(quantization="4bit", max_steps=3), verbose=False)
    layer = trainer.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.linear, nn.QuantizedLinear)
    final = trainer.train()
    assert np.isfinite(final["eval/loss"]) and float(mx.abs(layer.lora_b).sum()) > 0


def test_bad_model_specs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="not a local path, and not a Hub id"):
        resolve_model_path("./nope")
