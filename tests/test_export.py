"""Export: mlx-lm adapter, PEFT adapter, fused model, model card, Hub push, CLI.

The base models are tiny random Llamas written here in the Hugging Face layout (GQA
attention, tied or untied embeddings) with a word-level tokenizer, so every test is
fast and needs nothing but this file. Parity tests load the PEFT export and the fused
model in PyTorch and compare logits with MLX; they skip when torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_pref.adapters import adapter_parameters, save_adapters
from mlx_pref.cli import cli
from mlx_pref.config import Config, LoraConfig
from mlx_pref.errors import MlxPrefError
from mlx_pref.export import (
    ExportError,
    HubError,
    export_and_push,
    export_run,
    push_to_hub,
)

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "good", "bad", "hello"]
PARITY_TOL = 1e-4


def llama_config(tied: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "vocab_size": 256,
        "bos_token_id": None,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over a few words (ids below the model's vocab size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 128,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def make_base(path: Path, *, tied: bool, seed: int = 0) -> Path:
    """A random Llama in the Hugging Face layout (config.json, model.safetensors 'pt')."""
    path.mkdir(parents=True)
    config = llama_config(tied)
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for name in weights:  # non-trivial norms, so a misplaced norm would show
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * mx.random.normal(weights[name].shape)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    write_tokenizer(path)
    return path


def load_mlx(base: Path, quantization_bits: int | None = None):
    from mlx_pref.models import load_model

    return load_model(str(base), quantization_bits=quantization_bits).model


def make_run(
    run_dir: Path,
    base: Path,
    *,
    targets: list[str],
    dora: bool = False,
    layers: int | None = None,
    quantization: str | None = None,
    extra_keys: tuple[str, ...] = (),
    seed: int = 1,
) -> Path:
    """A finished run directory with random (nonzero) adapter weights, as the trainer
    leaves it: adapters, adapter_config.json, config.yaml, metrics.jsonl."""
    lora = LoraConfig(r=4, alpha=8.0, target_modules=targets, layers=layers, dora=dora)
    cfg = Config(
        model=str(base), lora=lora, quantization=quantization, output=str(run_dir), beta=0.25
    )
    model = load_mlx(base, cfg.quantization_bits)
    from mlx_pref.adapters import adapter_config

    config = adapter_config(model, lora)
    config["lora_parameters"]["keys"] += list(extra_keys)
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=dora)
    mx.random.seed(seed)
    params = adapter_parameters(model)
    randomized = {}
    for name, value in params.items():
        if name.endswith(".m"):  # DoRA magnitude: move it away from the base norm
            randomized[name] = value * mx.random.uniform(0.8, 1.2, value.shape)
        else:
            randomized[name] = 0.15 * mx.random.normal(value.shape)
    model.load_weights(list(randomized.items()), strict=False)
    save_adapters(model, run_dir, config)
    cfg.save(run_dir / "config.yaml")
    records = [
        {"step": 5, "loss": 0.69, "rewards/accuracies": 0.5},
        {"step": 5, "eval/loss": 0.6812, "eval/rewards/accuracies": 0.625},
        {"step": 10, "loss": 0.61, "rewards/accuracies": 0.75},
        {"step": 10, "eval/loss": 0.5921, "eval/rewards/accuracies": 0.8125},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, 12))


def mlx_logits(base: Path, adapter_dir: Path | None, quantization_bits: int | None = None):
    """Logits of the MLX base (optionally quantized as in training) with the run's adapter."""
    from mlx_lm.tuner.utils import load_adapters

    model = load_mlx(base, quantization_bits)
    if adapter_dir is not None:
        load_adapters(model, str(adapter_dir))
    out = model(mx.array(batch()))
    mx.eval(out)
    return np.array(out.astype(mx.float32))


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def card_code(card: str, heading: str) -> str:
    """The Python snippet under ``## heading`` in a model card."""
    section = card.split(f"## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("untied") / "base", tied=False)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("tied") / "base", tied=True, seed=3)


@pytest.fixture
def lora_run(tmp_path, untied_base) -> Path:
    return make_run(tmp_path / "run", untied_base, targets=["q_proj", "v_proj"])


# ----------------------------------------------------------------------- parity (torch)
@pytest.fixture(scope="module")
def torch_stack():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


def torch_logits(torch, model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(batch())).logits.float().numpy()


def peft_logits(torch_stack, base: Path, adapter: Path) -> np.ndarray:
    torch, transformers, peft = torch_stack
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return torch_logits(torch, peft.PeftModel.from_pretrained(model, adapter))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_lora_matches_mlx(torch_stack, tmp_path, request, tied):
    """LoRA on every projection and the embedding, GQA attention; tied and untied heads."""
    base = request.getfixturevalue("tied_base" if tied else "untied_base")
    run = make_run(
        tmp_path / "run", base, targets=ALL_PROJECTIONS, extra_keys=("model.embed_tokens",)
    )
    out = export_run(run, "peft", tmp_path / "peft")
    expected = mlx_logits(base, run)
    assert np.abs(expected - mlx_logits(base, None)).max() > 0.5  # the adapter matters
    diff = np.abs(peft_logits(torch_stack, base, out) - expected).max()
    print(f"peft lora {'tied' if tied else 'untied'}: max |logit diff| {diff:.2e}")
    assert diff <= PARITY_TOL
    snippet: dict = {}
    exec(card_code((out / "README.md").read_text(), "Use with PEFT"), snippet)
    assert np.abs(torch_logits(torch_stack[0], snippet["model"]) - expected).max() <= PARITY_TOL
    config = json.loads((out / "adapter_config.json").read_text())
    assert ("lm_head" in config["target_modules"]) == tied
    assert config.get("ensure_weight_tying", False) == tied


def test_peft_dora_matches_mlx(torch_stack, tmp_path, tied_base):
    """DoRA magnitudes on the last block only (full module paths as targets)."""
    run = make_run(tmp_path / "run", tied_base, targets=ALL_PROJECTIONS, dora=True, layers=1)
    out = export_run(run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["target_modules"] == sorted(
        f"model.layers.1.{part}.{name}"
        for part, names in (("self_attn", ALL_PROJECTIONS[:4]), ("mlp", ALL_PROJECTIONS[4:]))
        for name in names
    )
    expected = mlx_logits(tied_base, run)
    assert np.abs(expected - mlx_logits(tied_base, None)).max() > 0.5
    diff = np.abs(peft_logits(torch_stack, tied_base, out) - expected).max()
    print(f"peft dora: max |logit diff| {diff:.2e}")
    assert diff <= PARITY_TOL


@pytest.mark.parametrize(
    ("tied", "dora"), [(True, False), (False, True)], ids=["tied-lora", "untied-dora"]
)
def test_fused_matches_mlx_in_transformers_and_mlx_lm(torch_stack, tmp_path, request, tied, dora):
    import mlx_lm

    torch, transformers, _ = torch_stack
    base = request.getfixturevalue("tied_base" if tied else "untied_base")
    extra = () if dora else ("model.embed_tokens",)
    run = make_run(tmp_path / "run", base, targets=ALL_PROJECTIONS, dora=dora, extra_keys=extra)
    out = export_run(run, "fused", tmp_path / "fused")
    expected = mlx_logits(base, run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = np.abs(torch_logits(torch, hf) - expected).max()
    model, _ = mlx_lm.load(str(out))
    reload_diff = np.abs(np.array(model(mx.array(batch()))) - expected).max()
    print(f"fused {request.node.callspec.id}: transformers {diff:.2e}, mlx-lm {reload_diff:.2e}")
    assert diff <= PARITY_TOL
    assert reload_diff <= PARITY_TOL
    card = (out / "README.md").read_text()
    for heading in ("Use with transformers", "Use with mlx-lm"):
        exec(card_code(card, heading), {})
    assert mx.load(str(out / "model.safetensors"), return_metadata=True)[1] == {"format": "pt"}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }


def test_fused_dequantized_from_4bit_run(torch_stack, tmp_path, untied_base):
    """A QLoRA run fused with --dequantize: a float model equal to the quantized base plus
    the adapter, loadable by transformers."""
    torch, transformers, _ = torch_stack
    run = make_run(tmp_path / "run", untied_base, targets=ALL_PROJECTIONS, quantization="4bit")
    out = export_run(run, "fused", tmp_path / "fused", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    expected = mlx_logits(untied_base, run, quantization_bits=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = np.abs(torch_logits(torch, hf) - expected).max()
    print(f"fused 4-bit --dequantize: max |logit diff| {diff:.2e}")
    assert diff <= PARITY_TOL


# -------------------------------------------------------------------- without torch
def test_fused_quantized_base_stays_mlx_quantized(tmp_path, tied_base):
    import mlx_lm

    run = make_run(
        tmp_path / "run", tied_base, targets=["q_proj", "down_proj"], quantization="8bit"
    )
    out = export_run(run, "fused", tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    weights, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    assert "model.layers.0.self_attn.q_proj.scales" in weights
    expected = mlx_logits(tied_base, run, quantization_bits=8)
    effect = np.abs(expected - mlx_logits(tied_base, None, quantization_bits=8)).max()
    model, _ = mlx_lm.load(str(out))
    diff = np.abs(np.array(model(mx.array(batch()))) - expected).max()
    assert effect > 1.0 and diff < 0.1  # the adapter is in; only 8-bit rounding differs
    card = (out / "README.md").read_text()
    assert front_matter(card)["library_name"] == "mlx"
    assert "loads with mlx-lm only" in card and "--dequantize" in card


def test_peft_tensors_are_transposed_and_named_like_peft(tmp_path, untied_base):
    run = make_run(
        tmp_path / "run", untied_base, targets=["q_proj", "down_proj"], extra_keys=("lm_head",)
    )
    out = export_run(run, "peft", tmp_path / "peft")
    ours = mx.load(str(run / "adapters.safetensors"))
    theirs, metadata = mx.load(str(out / "adapter_model.safetensors"), return_metadata=True)
    assert metadata == {"format": "pt"}
    prefix = "base_model.model."
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"):
        a, b = ours[f"{path}.lora_a"], ours[f"{path}.lora_b"]
        assert np.array_equal(np.array(theirs[f"{prefix}{path}.lora_A.weight"]), np.array(a.T))
        assert np.array_equal(np.array(theirs[f"{prefix}{path}.lora_B.weight"]), np.array(b.T))
    assert theirs[f"{prefix}model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert theirs[f"{prefix}model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(theirs) == 2 * (2 * 2 + 1)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # scale 2.0 x rank 4
    assert config["target_modules"] == ["down_proj", "lm_head", "q_proj"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["bias"] == "none" and config["use_dora"] is False
    assert config["lora_dropout"] == 0.0
    assert config["base_model_name_or_path"] == str(untied_base.resolve())


def test_peft_embedding_and_dora_names(tmp_path, untied_base, tied_base):
    run = make_run(
        tmp_path / "lora", tied_base, targets=["q_proj"], extra_keys=("model.embed_tokens",)
    )
    tensors = mx.load(str(export_run(run, "peft", tmp_path / "p1") / "adapter_model.safetensors"))
    ours = mx.load(str(run / "adapters.safetensors"))
    a, b = ours["model.embed_tokens.lora_a"], ours["model.embed_tokens.lora_b"]
    key = "base_model.model.model.embed_tokens"
    assert np.array_equal(np.array(tensors[f"{key}.lora_embedding_A"]), np.array(a.T))  # (r, V)
    assert np.array_equal(np.array(tensors[f"{key}.lora_embedding_B"]), np.array(b.T))  # (d, r)
    assert np.array_equal(np.array(tensors["base_model.model.lm_head.lora_A.weight"]), np.array(b))
    assert np.array_equal(np.array(tensors["base_model.model.lm_head.lora_B.weight"]), np.array(a))

    run = make_run(tmp_path / "dora", untied_base, targets=["v_proj"], dora=True)
    tensors = mx.load(str(export_run(run, "peft", tmp_path / "p2") / "adapter_model.safetensors"))
    ours = mx.load(str(run / "adapters.safetensors"))
    m = ours["model.layers.0.self_attn.v_proj.m"]
    assert m.shape == (32,)  # 2 KV heads x 16: one magnitude per output row
    magnitude = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"]
    assert np.array_equal(np.array(magnitude), np.array(m))


def test_peft_from_a_4bit_run_targets_the_float_model(tmp_path, untied_base):
    run = make_run(tmp_path / "run", untied_base, targets=["up_proj"], quantization="4bit")
    out = export_run(run, "peft", tmp_path / "peft", base="acme/tiny-llama")
    tensors = mx.load(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.up_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 64)  # float dims, not packed ones
    assert tensors[f"{key}.lora_B.weight"].shape == (128, 4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama"
    card = (out / "README.md").read_text()
    assert "(QLoRA). The PEFT adapter applies to the original float model" in card
    with pytest.raises(HubError, match="--base-model"):
        export_run(run, "peft", tmp_path / "other", base="not a repo id")


def test_peft_refuses_dora_on_embeddings(tmp_path, untied_base):
    run = make_run(
        tmp_path / "run",
        untied_base,
        targets=["q_proj"],
        dora=True,
        extra_keys=("model.embed_tokens",),
    )
    with pytest.raises(ExportError, match="DoRA on an embedding has no PEFT equivalent"):
        export_run(run, "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()  # nothing half-written
    assert export_run(run, "fused", tmp_path / "fused").is_dir()


def test_mlx_export_loads_in_mlx_lm(tmp_path, lora_run, untied_base):
    import mlx_lm

    out = export_run(lora_run, "mlx", tmp_path / "mlx")
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (lora_run / name).read_bytes()
    model, _ = mlx_lm.load(str(untied_base), adapter_path=str(out))
    logits = np.array(model(mx.array(batch())))
    assert np.array_equal(logits, mlx_logits(untied_base, lora_run))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mlx"
    assert meta["tags"] == ["mlx-pref", "dpo", "lora", "mlx"]
    assert "base_model" not in meta  # a local base without a known Hub id
    snippet: dict = {}
    exec(card_code(card, "Use with mlx-lm"), snippet)  # loads and generates
    logits = np.array(snippet["model"](mx.array(batch())))
    assert np.array_equal(logits, mlx_logits(untied_base, lora_run))
    command = card.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command == (
        f'mlx_lm.generate --model "{untied_base}" --adapter-path "{out}" --prompt Hello'
    )


def test_card_names_base_loss_data_and_final_metrics(tmp_path, untied_base):
    (untied_base.parent / "README.md").write_text("unused")  # only the base's own card counts
    base = tmp_path / "models--acme--tiny-llama" / "snapshots" / "abc"
    base.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(untied_base, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    data = tmp_path / "secret-dir" / "prefs.jsonl"
    data.parent.mkdir()
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3 + "\n")
    run = make_run(tmp_path / "run", base, targets=["q_proj"], dora=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(data=str(data), loss={"sigmoid": 0.7, "bco": 0.3}, label_smoothing=0.1)
    cfg.update(
        sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_cache_dir=str(data.parent / "cache")
    )
    cfg.update(adapter=str(data.parent / "sft-adapter"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    card = (
        export_run(run, "peft", tmp_path / "out", repo_id="me/tiny-dpo") / "README.md"
    ).read_text()
    meta = front_matter(card)
    assert meta == {
        "base_model": "acme/tiny-llama",
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["mlx-pref", "dpo", "bco", "lora", "dora"],
    }
    assert "| beta | 0.25 |" in card and "| label_smoothing | 0.1 |" in card
    assert "| loss | sigmoid 0.7, bco 0.3 |" in card
    assert "- train: `prefs.jsonl` (3 rows)" in card
    assert "| sync_ref_model | True |" in card  # set: shown
    assert "ref_model_sync_steps" not in card  # left at its default: not shown
    assert "| started from | the SFT adapter `sft-adapter` |" in card
    assert "secret-dir" not in card  # no local directories, of data or anything else
    assert "At step 10:" in card and "| eval/loss | 0.5921 |" in card
    assert "| eval/rewards/accuracies | 0.8125 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("acme/tiny-llama")' in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-dpo")' in card
    assert "lora_magnitude_vector" in card
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-llama"


def test_export_a_checkpoint(tmp_path, lora_run):
    checkpoint = lora_run / "checkpoints" / "step-00000005"
    checkpoint.mkdir(parents=True)
    for name in ("adapters.safetensors", "adapter_config.json"):
        (checkpoint / name).write_bytes((lora_run / name).read_bytes())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 5}))
    out = export_run(checkpoint, "mlx")
    assert out == lora_run / "export-mlx-step-00000005"
    card = (out / "README.md").read_text()
    assert ", at step 5." in card and "At step 5:" in card and "| eval/loss | 0.6812 |" in card


def test_missing_files_are_named(tmp_path, lora_run):
    with pytest.raises(ExportError, match="no such run directory"):
        export_run(tmp_path / "nope", "mlx", tmp_path / "o")
    (lora_run / "adapters.safetensors").unlink()
    with pytest.raises(ExportError, match=r"adapters\.safetensors is missing: not an mlx-pref"):
        export_run(lora_run, "mlx", tmp_path / "o")
    (lora_run / "checkpoints" / "step-00000007").mkdir(parents=True)
    with pytest.raises(ExportError, match="export its latest checkpoint .*step-00000007"):
        export_run(lora_run, "mlx", tmp_path / "o")
    (lora_run / "config.yaml").unlink()
    with pytest.raises(ExportError, match=r"config\.yaml is missing"):
        export_run(lora_run, "mlx", tmp_path / "o")


def test_output_is_never_clobbered_by_accident(tmp_path, lora_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(lora_run, "mlx", out)
    # --overwrite replaces only an earlier export, never a folder of the user's.
    with pytest.raises(ExportError, match="not empty and is not an mlx-pref export"):
        export_run(lora_run, "mlx", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    out = tmp_path / "fresh"
    export_run(lora_run, "mlx", out)
    with pytest.raises(ExportError, match="already holds an export"):
        export_run(lora_run, "mlx", out)
    export_run(lora_run, "mlx", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".mlx-pref.json",
        "README.md",
        "adapter_config.json",
        "adapters.safetensors",
    ]
    with pytest.raises(ExportError, match="would overwrite the run itself"):
        export_run(lora_run, "mlx", lora_run, overwrite=True)
    with pytest.raises(ExportError, match="--dequantize applies to --format fused"):
        export_run(lora_run, "peft", tmp_path / "p", dequantize=True)


# --------------------------------------------------------------------------- the Hub
class FakeApi:
    """Records create_repo and upload_folder; any other use of the API fails the test."""

    calls: list = []
    fail_with: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))

    def __getattr__(self, name):
        raise AssertionError(f"unexpected Hub API call: {name}")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(FakeApi, "calls", [])
    monkeypatch.setattr(FakeApi, "fail_with", None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_calls_create_repo_then_upload_folder(tmp_path, lora_run, fake_hub):
    folder = export_run(lora_run, "peft", tmp_path / "peft", repo_id="me/adapter")
    lines = push_to_hub(folder, "me/adapter", private=True)
    assert fake_hub.calls == [
        ("create_repo", "me/adapter", {"private": True, "exist_ok": True, "repo_type": "model"}),
        (
            "upload_folder",
            {
                "repo_id": "me/adapter",
                "folder_path": str(folder),
                "repo_type": "model",
                "ignore_patterns": [".*", "*/.*"],
                "commit_message": "Upload from mlx-pref",
            },
        ),
    ]
    assert lines == ["uploaded 3 files to https://huggingface.co/me/adapter"]


def test_push_offline_is_one_line_and_keeps_the_export(tmp_path, lora_run, fake_hub):
    folder = export_run(lora_run, "mlx", tmp_path / "mlx")
    before = digest(folder)
    fake_hub.fail_with = ConnectionError(f"Name or service not known\n(token {FAKE_TOKEN})")
    with pytest.raises(HubError) as info:
        push_to_hub(folder, "me/adapter")
    message = str(info.value)
    assert "\n" not in message and FAKE_TOKEN not in message
    assert message.startswith(
        "cannot upload to me/adapter on the Hugging Face Hub (ConnectionError"
    )
    assert message.endswith(f"the export is intact in {folder}")
    assert digest(folder) == before


def test_push_without_login_says_how(tmp_path, lora_run, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    folder = export_run(lora_run, "mlx", tmp_path / "mlx")
    with pytest.raises(HubError, match="not logged in .* `hf auth login` or set HF_TOKEN"):
        push_to_hub(folder, "me/adapter")
    with pytest.raises(HubError, match="not a valid|Repo id"):
        push_to_hub(folder, "me/bad name!")


def test_export_and_push_for_the_trainer(lora_run, fake_hub):
    folder = export_and_push(lora_run, "me/tiny", private=True, fmt="peft")
    assert folder == lora_run / "export-peft"
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][2]["private"] is True
    assert 'PeftModel.from_pretrained(base, "me/tiny")' in (folder / "README.md").read_text()
    export_and_push(lora_run, "me/tiny")  # the default folder is replaced on a rerun
    assert (lora_run / "export-mlx" / "adapters.safetensors").is_file()


# ------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("fmt", ["mlx", "peft", "fused"])
def test_cli_exports_each_format(tmp_path, lora_run, fmt):
    out = tmp_path / fmt
    result = CliRunner().invoke(
        cli, ["export", str(lora_run), "--format", fmt, "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exported {fmt} to {out} (")
    expected = {
        "mlx": "adapters.safetensors",
        "peft": "adapter_model.safetensors",
        "fused": "model.safetensors",
    }[fmt]
    assert (out / expected).is_file() and (out / "README.md").is_file()


def test_cli_dry_run_lists_exactly_what_would_be_uploaded(tmp_path, lora_run, fake_hub):
    out = tmp_path / "peft"
    args = ["export", str(lora_run), "--format", "peft", "--output", str(out)]
    result = CliRunner().invoke(cli, [*args, "--push-to-hub", "me/tiny", "--private", "--dry-run"])
    assert result.exit_code == 0, result.output
    sizes = {
        name: (out / name).stat().st_size
        for name in ("README.md", "adapter_config.json", "adapter_model.safetensors")
    }
    total = sum(sizes.values())
    assert result.output.splitlines() == [
        f"exported peft to {out} (3 files, {total} bytes)",
        f"dry run: would upload 3 files ({total} bytes) from {out} to me/tiny (private); "
        "nothing was uploaded",
        *[f"  {name}  {size} bytes" for name, size in sizes.items()],
    ]
    assert fake_hub.calls == []


def test_cli_push_never_shows_or_writes_the_token(tmp_path, lora_run, fake_hub):
    out = tmp_path / "mlx"
    args = ["export", str(lora_run), "--output", str(out), "--push-to-hub", "me/tiny"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "uploaded 3 files to https://huggingface.co/me/tiny"
    fake_hub.fail_with = OSError(f"offline; token={FAKE_TOKEN}")
    failed = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert isinstance(failed.exception, HubError)
    for text in (result.output, failed.output, str(failed.exception)):
        assert FAKE_TOKEN not in text
    for path in [*out.rglob("*"), *lora_run.rglob("*")]:
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_cli_bad_run_dir_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run")])
    assert isinstance(result.exception, MlxPrefError)
    assert str(tmp_path / "run" / "config.yaml") in str(result.exception)
    from mlx_pref.cli import main

    monkeypatch.setattr("sys.argv", ["mlx-pref", "export", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{tmp_path / 'run' / 'config.yaml'} is missing" in err


def test_cli_usage_errors(tmp_path, lora_run):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(lora_run), "--dry-run"])
    assert result.exit_code == 2 and "--push-to-hub" in result.output
    result = runner.invoke(cli, ["export", str(lora_run), "--dequantize"])
    assert result.exit_code == 2 and "--format fused" in result.output
    result = runner.invoke(cli, ["export", str(lora_run), "--format", "onnx"])
    assert result.exit_code == 2
