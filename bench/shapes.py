"""One DPO step of a model of a real shape with random weights: step time, MLX's peak
memory and the memory plan's estimate at several lengths. For hosts where the peers
cannot be installed (a GPU host without network) and for shapes too large to download:
speed and memory depend on the shape, not on the weights.

    python bench/shapes.py --shape smollm2-1.7b --tokenizer DIR --pairs 8 \\
        --lengths 512,1024,2048,4096 --out results.json

Each (length, settings) runs in its own ``bench/ours.py`` process. ``default`` is what a
run chooses by itself (the memory plan against its lean budget); ``kept`` keeps every
activation (``grad_checkpoint: false`` and a budget large enough for it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    "smollm2-1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        rope_theta=130000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),  # fmt: skip
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),  # fmt: skip
}
SETTINGS = {"default": {}, "kept": {"grad_checkpoint": False, "memory_limit": "1000GB"}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_model(shape: str, dtype: str, tokenizer: Path, out: Path) -> Path:
    """A Llama of ``shape`` with random weights in ``dtype``, saved as mlx-lm loads it."""
    if (out / "model.safetensors").exists():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    args = {"model_type": "llama", **SHAPES[shape]}
    model = Model(ModelArgs(**args))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    config = {**args, "architectures": ["LlamaForCausalLM"], "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out


def random_pairs(pairs: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``pairs`` pairs whose chosen and rejected sequences are ``length`` tokens each (half
    prompt, half completion)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    half = length // 2

    def ids(n: int) -> list[int]:
        return rng.integers(10, vocab - 1, n).tolist()

    return [{"prompt": ids(half), "chosen": ids(half), "rejected": ids(half)} for _ in range(pairs)]


def measure(model: Path, length: int, pairs: int, settings: str, steps: int, work: Path) -> dict:
    """One (length, settings) cell, in its own process (checkpointed blocks stay so)."""
    from mlx_pref.data import embedded_data

    spec = {
        "model": str(model),
        "data_file": str(embedded_data()[0]),
        "pairs": random_pairs(
            pairs, length, json.loads((model / "config.json").read_text())["vocab_size"]
        ),
        "config": {"batch_size": pairs, **SETTINGS[settings]},
        "warmup": 2,
        "steps": steps,
    }
    spec_path, out_path = work / f"{settings}-{length}.json", work / f"{settings}-{length}.out"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(HERE / "ours.py"), str(spec_path), str(out_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode or not out_path.exists():
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(out_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a folder with tokenizer.json"
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--settings", default="default,kept")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    parser.add_argument("--model-dir", type=Path, help="where the random model is kept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlx-pref-shapes-"))
    model = build_model(
        args.shape,
        args.dtype,
        args.tokenizer,
        args.model_dir or work / f"{args.shape}-{args.dtype}",
    )
    rows = []
    print("length  settings  step s  MLX peak GB  estimate GB  plan")
    for length in [int(n) for n in args.lengths.split(",")]:
        for settings in args.settings.split(","):
            r = measure(model, length, args.pairs, settings, args.steps, work)
            rows.append({"length": length, "settings": settings, **r})
            if "error" in r:
                print(f"{length:6d}  {settings:8s}  failed: {r['error']}", flush=True)
                continue
            print(
                f"{length:6d}  {settings:8s}  {r['step_s']:6.3f}  {r['mlx_peak_gb']:11.2f}  "
                f"{sum(r['estimate_gb'].values()):11.2f}  {r['memory_plan'].split('; ')[-1]}",
                flush=True,
            )
    meta = {"shape": args.shape, "dtype": args.dtype, "pairs": args.pairs}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
