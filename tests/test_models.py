"""Model loading: quantized bases (QLoRA), dequantizing, dtypes, clear errors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import dequantize_model

import mlx_pref.models as models
from mlx_pref.errors import ModelError
from mlx_pref.models import float_bytes, load_model, resolve_model_path
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
    # dequantize: false keeps a quantized base on every backend, the CPU included
    trainer = Trainer(
        make_config(quantization="4bit", dequantize=False, max_steps=3), verbose=False
    )
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


@pytest.fixture
def quantized_dir(tmp_path, tiny_model):
    """The tiny model as an MLX 4-bit checkpoint (what mlx_lm.convert -q writes)."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    out = tmp_path / "tiny-4bit"
    shutil.copytree(tiny_model, out)
    model = load_model(str(tiny_model), quantization_bits=4).model
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_cpu_trains_a_quantized_base_in_float32_by_default(quantized_dir, monkeypatch):
    loaded = load_model(str(quantized_dir), dequantize=None)
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == mx.float32 and loaded.dequantized
    (note,) = loaded.notes
    assert note.startswith(
        "note: dequantized the quantized base: float weights (0.0 GB) on the CPU"
    )
    assert "set dequantize: false" in note
    kept = load_model(str(quantized_dir), dequantize=False)
    assert isinstance(kept.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert not kept.notes and not kept.dequantized
    np.testing.assert_allclose(
        np.asarray(loaded.model(TOKENS)), np.asarray(kept.model(TOKENS)), atol=1e-4
    )
    # Metal and CUDA keep it quantized (QLoRA's memory saving); so does a tight memory plan.
    monkeypatch.setattr(models.backend, "backend_name", lambda: "metal")
    gpu = load_model(str(quantized_dir), dequantize=None)
    assert isinstance(gpu.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert not gpu.notes
    monkeypatch.setattr(models.backend, "backend_name", lambda: "cpu")
    monkeypatch.setattr(models.backend, "total_memory", lambda: 1000)
    tight = load_model(str(quantized_dir), dequantize=None)
    assert isinstance(tight.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert tight.notes[0].startswith("note: keeping the base quantized on the CPU: a float copy")


def test_cpu_skips_quantizing_a_float_base_unless_asked_and_records_it(make_config, tiny_model):
    float_size = float_bytes(load_model(str(tiny_model)).model)
    assert float_size == float_bytes(load_model(str(tiny_model), quantization_bits=4).model)
    trainer = Trainer(make_config(quantization="4bit", max_steps=1), verbose=False)
    assert type(trainer.model.model.layers[0].self_attn.q_proj.linear) is nn.Linear
    assert trainer.loaded.notes[0].startswith("note: not quantizing the base to 4 bits")
    # The saved config says what was trained on: a resume or an export agrees with it.
    assert (trainer.config.quantization, trainer.config.dequantize) == (None, False)
    with pytest.raises(Exception, match="quantization and dequantize exclude each other"):
        make_config(quantization="4bit", dequantize=True)


def test_vision_language_folders_say_what_they_need(tmp_path, monkeypatch):
    """A config with a vision_config goes to mlx-vlm: a missing mlx-vlm or an architecture
    the vision forward is not written for is one line (no weights are read first)."""
    import json
    import sys

    folder = tmp_path / "vlm"
    folder.mkdir()
    config = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"'llava' is not supported .*supported: qwen2_vl, qwen2_5_vl$"
    ):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)
    monkeypatch.setitem(sys.modules, "mlx_vlm.utils", None)
    with pytest.raises(ModelError, match=r"^vision-language models load through mlx-vlm, .*"
                       r"pip install 'mlx-pref\[vision\]'$"):  # fmt: skip
        load_model(str(folder))
