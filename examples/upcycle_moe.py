"""Turn the embedded tiny chat model into a small Mixture-of-Experts model (a Mixtral).

Sparse upcycling: each block's MLP is copied into every expert and a router is added with
small random weights. The experts are identical, so whichever two a token is routed to,
their softmax-weighted sum is the dense MLP's output: the new model says exactly what the
dense one says (the script checks it), and preference training then moves the experts and
the router apart. The README's Mixture-of-Experts example trains it.

    python examples/upcycle_moe.py runs/tiny-moe-model [--experts 4] [--top-k 2]
"""

from __future__ import annotations

# isort: off
import mlx_pref  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)

# isort: on
import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mlx_pref.models import embedded_root

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def upcycle(out: Path, experts: int, top_k: int, seed: int = 0) -> Path:
    source = embedded_root("tiny-chat")
    dense, _ = load(str(source))
    config = json.loads((source / "config.json").read_text())
    config.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        tie_word_embeddings=False,
    )
    weights = {}
    mx.random.seed(seed)
    for name, value in tree_flatten(dense.parameters()):
        if ".mlp." in name:
            block, projection = name.split(".mlp.")
            stacked = mx.broadcast_to(value[None], (experts, *value.shape))
            weights[f"{block}.block_sparse_moe.switch_mlp.{projection}"] = mx.array(stacked)
        else:
            weights[name] = value
    for i in range(config["num_hidden_layers"]):
        gate = mx.random.normal((experts, config["hidden_size"])) * 0.02
        weights[f"model.layers.{i}.block_sparse_moe.gate.weight"] = gate
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    sparse, _ = load(str(out))
    tokens = mx.array([[1, 5, 9, 14, 27, 3]])
    gap = float(mx.abs(sparse(tokens) - dense(tokens)).max())
    print(
        f"wrote {out}: {experts} experts, top {top_k}; max |logit difference| to the dense model {gap:.2e}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    upcycle(args.output, args.experts, args.top_k)


if __name__ == "__main__":
    main()
