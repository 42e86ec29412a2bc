"""Shared fixtures: a tiny random Llama with the embedded tokenizer, and small data files."""

from __future__ import annotations

import os

# Full float32 matmuls on every backend, for this process and the runs it starts. MLX
# reads MLX_ENABLE_TF32 once (default 1); when on, cuBLAS computes float32 GEMMs in TF32
# on CUDA, as do the neural accelerators of recent Apple GPUs, and log-probs drift by
# ~1e-4 relative, beyond what the parity tests allow. tests/_numerics.py states what
# each backend is then held to.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# isort: off
import mlx_pref  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)

# isort: on
import ctypes
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_pref import backend
from mlx_pref.config import Config, config_from_dict
from mlx_pref.data import embedded_data
from mlx_pref.models import embedded_root


def share_blas_threads() -> None:
    """Start child processes (the SIGKILL and CLI resume tests) with this process's
    OpenBLAS thread count. OpenBLAS splits long inner products across its threads, so a
    matmul's last bits depend on the count, and mlx-pref picks the count from the load at
    start: a run resumed in another process is bit-exact only with the same count."""
    info = backend.blas_info()
    if info.name == "OpenBLAS" and info.path and "OPENBLAS_NUM_THREADS" not in os.environ:
        threads = ctypes.CDLL(info.path).openblas_get_num_threads()
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)


share_blas_threads()

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_random_llama(
    directory: Path, *, seed: int = 0, tie: bool = True, layers: int = 2
) -> Path:
    """A small random Llama in Hugging Face layout that uses the embedded tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_root("tiny-chat") / name, directory / name)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": len(vocab) + 3,
        "tie_word_embeddings": tie,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(
        str(directory / "model.safetensors"),
        dict(tree_flatten(model.parameters())),
        metadata={"format": "pt"},
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny-llama"))


def head_rows(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text().splitlines()[:n]
    dst.write_text("".join(line + "\n" for line in lines))
    return dst


@pytest.fixture(scope="session")
def prefs(tmp_path_factory) -> tuple[Path, Path]:
    """48 training and 16 eval pairs from the embedded preference data."""
    root = tmp_path_factory.mktemp("prefs")
    train, eval_ = embedded_data()
    return head_rows(train, root / "train.jsonl", 48), head_rows(eval_, root / "eval.jsonl", 16)


@pytest.fixture
def make_config(tmp_path, tiny_model, prefs, monkeypatch):
    """Build a small, fast Config; keyword arguments override it."""
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))

    def build(**overrides) -> Config:
        raw = {
            "model": str(tiny_model),
            "data": str(prefs[0]),
            "eval_data": str(prefs[1]),
            "output": str(tmp_path / "run"),
            "batch_size": 4,
            "max_steps": 4,
            "learning_rate": 1e-2,
            "eval_every": 2,
            "log_every": 1,
            "save_every": 2,
            "lora": {"r": 4, "alpha": 8},
            "max_length": 128,
        }
        raw.update(overrides)
        return config_from_dict(raw)

    return build
