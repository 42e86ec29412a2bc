"""Worker: mlx-lm-lora's DPO trainer (``train_dpo``), in its own process.

    python bench/mlx_lm_lora_peer.py SPEC.json OUT.json

Set up as its ``mlx_lm_lora.train --train-mode dpo`` does: the policy loaded with
mlx-lm, frozen, LoRA layers from mlx-lm's ``linear_to_lora_layers`` (here on q,k,v,o
with rank 8 and scale alpha/r = 2, the other peers' settings; its CLI default adapts
every linear layer with scale 10), a second full copy of the model loaded and frozen
as the reference (its default when no reference path is given), Adam (its default
optimizer), its compiled step. Its dataset items are token-id dicts in the shape its
``DPODataset`` produces, so it trains on exactly the ids the other peers see.

Two run-time adjustments, no vendored code: OpenBLAS is loaded before ``mlx.core``
through ``mlx_pref.backend.load_fast_blas`` (as mlx-pref does; without it MLX's Linux
CPU matmuls use a reference BLAS ~50x slower), and ``mx.device_info()`` gains the
Apple-only ``max_recommended_working_set_size`` key that ``train_dpo`` reads (the
machine's RAM; ``mx.set_wired_limit`` does nothing off Metal).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.hide_torch()

from mlx_pref.backend import load_fast_blas, matmul_gflops, total_memory  # noqa: E402

load_fast_blas()

import mlx.core as mx  # noqa: E402


def _patch_device_info() -> None:
    original = mx.device_info
    ram = int(total_memory() or 0)  # read before the patch: it asks mx.device_info too

    def device_info() -> dict:
        info = dict(original())
        info.setdefault("max_recommended_working_set_size", ram)
        return info

    mx.device_info = device_info


def main() -> None:
    spec = common.load_spec(sys.argv[1])
    _patch_device_info()
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    class StepTimes(TrainingCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak_gb = 0.0

        def on_train_loss_report(self, info: dict) -> None:
            self.times.append(1.0 / info["iterations_per_second"])
            self.peak_gb = max(self.peak_gb, info["peak_memory"])

    mx.random.seed(0)
    t0 = time.perf_counter()
    model, _ = load(spec["model"])
    model.freeze()
    keys = [f"self_attn.{t}" for t in common.LORA["targets"]]
    linear_to_lora_layers(
        model,
        len(model.layers),
        {
            "rank": common.LORA["r"],
            "scale": common.LORA["alpha"] / common.LORA["r"],
            "dropout": common.LORA["dropout"],
            "keys": keys,
        },
    )
    reference, _ = load(spec["model"])
    reference.freeze()
    load_s = time.perf_counter() - t0
    dataset = [
        {
            "chosen": p.prompt + p.chosen,
            "rejected": p.prompt + p.rejected,
            "chosen_prompt_length": len(p.prompt),
            "rejected_prompt_length": len(p.prompt),
        }
        for p in common.pairs_from_spec(spec)
    ]
    total = spec["warmup"] + spec["steps"]
    timer = StepTimes()
    with tempfile.TemporaryDirectory(prefix="mlx-pref-bench-lora-") as tmp:
        args = DPOTrainingArgs(
            batch_size=common.PAIRS_PER_STEP,
            iters=total,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
            max_seq_length=8192,
            beta=common.BETA,
            loss_type="sigmoid",
        )
        optimizer = optim.Adam(learning_rate=common.LEARNING_RATE)
        train_dpo(model, reference, optimizer, dataset, None, args=args, training_callback=timer)
    result = {
        **common.summarize(timer.times, spec["warmup"]),
        "model_load_s": load_s,
        "mlx_peak_gb": timer.peak_gb,
        "torch_imported": bool(sys.modules.get("torch")),
        "mlx_matmul_gflops": matmul_gflops(n=512),
    }
    common.write_result(sys.argv[2], result)


if __name__ == "__main__":
    main()
