"""Build the embedded default: a tiny chat language model and a preference dataset.

    python models/make_tiny.py            # rebuilds models/tiny-chat and data/tiny-prefs

Everything is seeded, so a rerun reproduces the same corpus, tokenizer and data; the
model weights match to float tolerance on the same platform. The model is a 4-layer
Llama (mlx-lm's architecture, Hugging Face layout) pretrained on chat dialogues from
tinyworld.py: mostly helpful, correct answers, with a minority of rude, wrong,
shouted or rambling ones, so the base model produces both and a preference loss has
something to move.
"""

from __future__ import annotations

# isort: off
import contextlib

with contextlib.suppress(ImportError):  # mlx-pref, when installed, loads a fast BLAS first
    import mlx_pref  # noqa: F401
# isort: on
import argparse
import json
import math
import random
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import tinyworld as tw
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}


def render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def dialogue(rng: random.Random) -> list[dict]:
    messages = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        f = tw.fact(rng)
        if rng.random() < 0.7:
            answer = tw.good_answer(rng, f)
        else:
            answer = tw.bad_answer(rng, f, rng.choice(tw.BAD_STYLES))
        messages += [
            {"role": "user", "content": f["question"]},
            {"role": "assistant", "content": answer},
        ]
    return messages


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "add_bos_token": False,
                "model_max_length": MODEL_CONFIG["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
    return tok


def pretrain(tok, texts: list[str], steps: int, seed: int, out: Path) -> None:
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eot]
    data = np.array(ids, dtype=np.int32)
    print(f"corpus: {len(texts)} dialogues, {len(data)} tokens")
    config = dict(
        MODEL_CONFIG,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=eot,
    )
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    batch, seq = 32, 128
    warmup = min(100, steps // 10)
    sched = optim.join_schedules(
        [optim.linear_schedule(1e-4, 3e-3, warmup), optim.cosine_decay(3e-3, steps - warmup, 1e-4)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    step_fn = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        chunk = np.stack([data[s : s + seq + 1] for s in starts])
        loss, grads = step_fn(model, mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % 100 == 0 or step == 1:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  ppl {math.exp(loss.item()):.2f}"
                f"  {time.time() - t0:.0f}s",
                flush=True,
            )
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"], "pad_token_id": eot}, indent=2) + "\n"
    )


def make_prefs(seed: int, n_train: int, n_eval: int, out: Path) -> None:
    """Paired preferences in the conversational format: a helpful, correct answer is
    chosen over a rude, wrong, shouted or rambling one. Eval prompts never occur in train."""
    rng = random.Random(seed)
    rows, seen = {"train": [], "eval": []}, {"train": set(), "eval": set()}
    while len(rows["train"]) < n_train or len(rows["eval"]) < n_eval:
        f = tw.fact(rng)
        split = "eval" if len(rows["eval"]) < n_eval and rng.random() < 0.2 else "train"
        if len(rows[split]) >= (n_eval if split == "eval" else n_train):
            continue
        other = "train" if split == "eval" else "eval"
        if f["question"] in seen[other]:
            continue
        seen[split].add(f["question"])
        rows[split].append(
            {
                "prompt": [{"role": "user", "content": f["question"]}],
                "chosen": [{"role": "assistant", "content": tw.good_answer(rng, f)}],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": tw.bad_answer(rng, f, rng.choice(tw.BAD_STYLES)),
                    }
                ],
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(out / f"{split}.jsonl", "w") as fh:
            for row in items:
                fh.write(json.dumps(row) + "\n")
        print(f"{out / (split + '.jsonl')}: {len(items)} pairs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "tiny-chat")
    p.add_argument("--data-out", type=Path, default=HERE.parent / "data" / "tiny-prefs")
    p.add_argument("--dialogues", type=int, default=60000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-only", action="store_true", help="only rebuild the preference data")
    args = p.parse_args()
    make_prefs(args.seed + 1, 1024, 256, args.data_out)
    if args.data_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    texts = [render(dialogue(rng)) for _ in range(args.dialogues)]
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    pretrain(tok, texts, args.steps, args.seed, args.out)


if __name__ == "__main__":
    main()
