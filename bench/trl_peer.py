"""Worker: TRL's DPOTrainer with a PEFT LoRA adapter on torch CPU, in its own process.

    python bench/trl_peer.py SPEC.json OUT.json

TRL's own defaults (adapters-off reference, gradient checkpointing on, dropout off,
sigmoid loss, beta 0.1) except where the comparison needs the same setup as the other
peers: float32 (TRL defaults to bf16 autocast), batch 4 pairs, LoRA r=8 alpha=16 on
q,k,v,o, no truncation (the pairs already fit), the same learning rate. The dataset is
handed over already tokenized (``prompt_ids``/``chosen_ids``/``rejected_ids``, the
columns TRL's own preprocessing produces), so TRL trains on exactly the token ids the
other peers see. ``precompute_ref_log_probs`` and ``gradient_checkpointing`` come from
the spec.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    spec = common.load_spec(sys.argv[1])
    workdir = Path(tempfile.mkdtemp(prefix="mlx-pref-bench-trl-"))
    os.environ["HF_DATASETS_CACHE"] = str(workdir / "datasets")  # no reuse across runs

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    timings: dict[str, float] = {}

    class PreTokenized(DPOTrainer):
        """DPOTrainer fed token ids: its text preprocessing is skipped, its reference
        precompute is timed."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings["reference_precompute_s"] = time.perf_counter() - t0
            return out

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    timings["model_load_s"] = time.perf_counter() - t0
    pairs = common.pairs_from_spec(spec)
    dataset = Dataset.from_list(
        [
            {"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected}
            for p in pairs
        ]
    )
    total = spec["warmup"] + spec["steps"]
    args = DPOConfig(
        output_dir=str(workdir / "out"),
        per_device_train_batch_size=common.PAIRS_PER_STEP,
        max_steps=total,
        learning_rate=common.LEARNING_RATE,
        beta=common.BETA,
        bf16=False,
        max_length=None,
        gradient_checkpointing=spec.get("gradient_checkpointing", True),
        precompute_ref_log_probs=spec.get("precompute_ref_log_probs", False),
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=common.LORA["r"],
        lora_alpha=common.LORA["alpha"],
        lora_dropout=common.LORA["dropout"],
        target_modules=common.LORA["targets"],
        task_type="CAUSAL_LM",
    )
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = PreTokenized(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    timings["trainer_init_s"] = time.perf_counter() - t0
    trainer.train()
    result = {
        **common.summarize(timer.times, spec["warmup"]),
        **timings,
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops": _sgemm_rate(torch),
        "gradient_checkpointing": args.gradient_checkpointing,
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
    }
    common.write_result(sys.argv[2], result)


def _sgemm_rate(torch, n: int = 1024, repeats: int = 10) -> float:
    """torch's float32 n x n matmul rate here (median), for comparison with MLX's."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[repeats // 2] / 1e9


if __name__ == "__main__":
    main()
