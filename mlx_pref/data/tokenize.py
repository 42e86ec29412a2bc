"""Turning records into token ids: chat templates, BOS/EOS, truncation."""

from __future__ import annotations

from mlx_pref.data.batching import PairExample, UnpairedExample
from mlx_pref.data.formats import Record


def _render(tokenizer, prompt, completion) -> tuple[str, str]:
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt_text, full[len(prompt_text) :]
    return prompt, completion


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _completion_ids(tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token
    text = text.rstrip()
    ids = _ids(tokenizer, text)
    if not (eos and text.endswith(eos)):
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_records(records: list[Record], tokenizer, cfg) -> tuple[list, dict]:
    bos = tokenizer.bos_token_id if getattr(tokenizer, "bos_token", None) else None
    out = []
    for r in records:
        if r.completion is not None:
            p, c = _render(tokenizer, r.prompt, r.completion)
            prompt = ([bos] if bos is not None else []) + _ids(tokenizer, p)
            out.append(
                UnpairedExample(
                    tuple(prompt), tuple(_completion_ids(tokenizer, c)), r.label, r.source
                )
            )
        else:
            p, c = _render(tokenizer, r.prompt, r.chosen)
            _, rj = _render(tokenizer, r.prompt, r.rejected)
            prompt = ([bos] if bos is not None else []) + _ids(tokenizer, p)
            out.append(
                PairExample(
                    tuple(prompt),
                    tuple(_completion_ids(tokenizer, c)),
                    tuple(_completion_ids(tokenizer, rj)),
                    r.source,
                )
            )
    return out, {"rows": len(records), "kept": len(out)}
