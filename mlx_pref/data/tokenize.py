"""Records to token ids: chat templates, BOS/EOS, truncation (TRL's conventions).

- Conversational rows are rendered with the tokenizer's chat template: the prompt with
  the generation prompt (or continuing a final assistant message), each completion as the
  text the template adds after the prompt.
- BOS goes in front of the prompt when the tokenizer has one and the prompt does not
  already start with it (chat templates often write it themselves).
- EOS goes after each plain-text completion unless the text already ends with it (TRL's
  ``add_eos``). Chat-templated completions end the way the template ends a turn; EOS is
  added only when that ending (trailing whitespace aside) is not the EOS token, so
  ChatML's ``<|im_end|>\\n`` gets no second ``<|im_end|>``.
- Prompt and completions are tokenized separately and concatenated (one prompt serves
  both completions of a pair); texts are encoded in batches.
- A system message (a ``system`` column, or ``system_prompt``) has a meaning only in a
  chat template: rows that carry one are rendered as chat, ``[system, user: prompt]``
  then ``assistant: completion`` (``with_system``); without a template the system text
  and a blank line go in front of a plain prompt.
- Rows with images need a vision-language model's tokenizer (``vision.processor``): it
  puts them in TRL's vision format and its processor turns each image placeholder into
  the image's tokens. Those tokens are never truncated: the prompt of such a row stays
  whole and only its completions are cut.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from mlx_pref.data.batching import Example, PairExample, UnpairedExample
from mlx_pref.data.formats import Record, RowError
from mlx_pref.data.report import Report
from mlx_pref.errors import DataError

CHUNK = 2048
"""Rows per batch-encoding call: bounds the intermediate lists on large files."""

Ids = tuple[int, ...]


@dataclass(frozen=True)
class Truncation:
    """Length limits in tokens; ``mode`` says which end of a too-long sequence survives.

    ``max_prompt_length`` keeps the prompt's end (next to the answer); BOS is kept.
    ``max_completion_length`` keeps each completion's start. Then, if prompt + longest
    completion exceeds ``max_length``: ``keep_end`` drops tokens from the prompt's start
    (down to BOS and one token) and only then cuts completions' ends; ``keep_start`` keeps
    the prompt whole and cuts completions' ends, dropping the row when the prompt alone
    leaves no room for a completion token.
    """

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mode: str = "keep_end"

    @classmethod
    def from_config(cls, cfg) -> Truncation:
        return cls(
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.max_completion_length,
            cfg.truncation_mode,
        )


@dataclass(frozen=True)
class Truncated:
    prompt: Ids
    completions: tuple[Ids, ...]
    prompt_cut: bool
    completion_cut: bool


def truncate(
    prompt: Ids, completions: Sequence[Ids], limits: Truncation, bos_id: int | None = None
) -> Truncated | None:
    """Apply ``limits`` to one row; None when no completion token fits."""
    head = 1 if bos_id is not None and prompt[:1] == (bos_id,) else 0

    def keep_end_of_prompt(ids: Ids, n: int) -> Ids:
        if len(ids) <= n:
            return ids
        body = max(n - head, 0)
        return ids[: min(head, n)] + (ids[len(ids) - body :] if body else ())

    completions = tuple(completions)
    prompt_cut = completion_cut = False
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        prompt, prompt_cut = keep_end_of_prompt(prompt, limits.max_prompt_length), True
    if limits.max_completion_length is not None:
        n = limits.max_completion_length
        if any(len(c) > n for c in completions):
            completions, completion_cut = tuple(c[:n] for c in completions), True
    if limits.max_length is not None:
        longest = max(len(c) for c in completions)
        if len(prompt) + longest > limits.max_length:
            if limits.mode == "keep_end":
                keep = max(limits.max_length - longest, min(len(prompt), head + 1))
                if keep < len(prompt):
                    prompt, prompt_cut = keep_end_of_prompt(prompt, keep), True
            room = limits.max_length - len(prompt)
            if room < 1:
                return None
            if longest > room:
                completions, completion_cut = tuple(c[:room] for c in completions), True
    return Truncated(prompt, completions, prompt_cut, completion_cut)


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def _encoder(tokenizer) -> Callable[[list[str]], list[Ids]]:
    """Batch encoder returning tuples whose ints are shared, one object per vocabulary id.

    Python ints above 256 are separate 28-byte objects; sharing them keeps a token at
    about 8 bytes (a tuple slot) however large the dataset.
    """
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF one
    shared = list(range(len(inner))) if hasattr(inner, "__len__") else []

    def intern(ids: list[int]) -> Ids:
        try:
            return tuple(map(shared.__getitem__, ids))
        except IndexError:  # an id beyond the vocabulary size the tokenizer reports
            return tuple(ids)

    def encode(texts: list[str]) -> list[Ids]:
        if not texts:
            return []
        if callable(inner):
            batch = inner(texts, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            batch = [inner.encode(t, add_special_tokens=False) for t in texts]
        return [intern(ids) for ids in batch]

    return encode


def _render_chat(tokenizer, prompt: list, completion: list, key: str, where: str):
    continues = prompt[-1]["role"] == "assistant"
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt,
            tokenize=False,
            add_generation_prompt=not continues,
            continue_final_message=continues,
        )
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as exc:  # template errors (jinja, raise_exception) are per row
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RowError(
            "chat template", f"{where}: the chat template rejected 'prompt' + '{key}': {first}"
        ) from None
    if not full.startswith(prompt_text):
        raise RowError(
            "chat template",
            f"{where}: the chat template renders 'prompt' + '{key}' so that it does not start "
            "with the rendered 'prompt', so the completion cannot be told apart",
        )
    return prompt_text, full[len(prompt_text) :]


def with_system(record: Record, template: bool) -> Record:
    """``record`` with its system message in place (unchanged when it has none).

    Chat rows get a leading system message unless they already start with one; plain
    paired and unpaired rows become chat (``[system, user: prompt]``, each completion an
    assistant message) when the tokenizer has a chat template; otherwise, and for
    implicit-prompt transcripts, the system text and a blank line precede the prompt.
    """
    system = record.system
    if system is None:
        return record
    head = [{"role": "system", "content": system}] if system else []
    if record.chat:
        if not head or record.prompt[:1] and record.prompt[0]["role"] == "system":
            return record
        return replace(record, prompt=head + record.prompt)
    if not template or record.format == "implicit":
        return replace(record, prompt=f"{system}\n\n{record.prompt}" if system else record.prompt)
    keys = ("chosen", "rejected") if record.paired else ("completion",)
    answers = {k: [{"role": "assistant", "content": getattr(record, k)}] for k in keys}
    return replace(record, prompt=[*head, {"role": "user", "content": record.prompt}], **answers)


def render(record: Record, tokenizer) -> tuple[str, tuple[str, ...]]:
    """The prompt text and the completion texts (chosen, rejected) or (completion,)."""
    keys = ("chosen", "rejected") if record.paired else ("completion",)
    values = [getattr(record, k) for k in keys]
    if not record.chat:
        return record.prompt, tuple(values)
    prompt_text, completions = "", []
    for key, value in zip(keys, values, strict=True):
        prompt_text, text = _render_chat(tokenizer, record.prompt, value, key, record.where)
        completions.append(text)
    return prompt_text, tuple(completions)


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> Ids:
    """A prompt's token ids as training sees them: a string (one user message) or a list of
    messages through the chat template with the generation prompt (``chat`` and a template;
    otherwise the raw text), no special tokens added, BOS first when the tokenizer has one."""
    if isinstance(prompt, list):
        if not has_chat_template(tokenizer):
            raise DataError("a prompt of chat messages needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    elif chat and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = _encoder(tokenizer)([text])[0]
    bos = tokenizer.bos_token_id if getattr(tokenizer, "bos_token", None) is not None else None
    if bos is not None and ids[:1] != (bos,):
        ids = (bos, *ids)
    return ids


def with_images(record: Record, tokenizer) -> Record:
    """A row with images, in its vision-language model's format (``vision.processor``);
    a text-only model cannot take one. Rows without images are left as they are."""
    if not record.images:
        return record
    if getattr(tokenizer, "processor", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise DataError(
            f"{record.where}: the row has images but {name} is a text-only model: train a "
            "vision-language model (pip install 'mlx-pref[vision]'), or leave the images out"
        )
    return tokenizer.with_images(record)


def _encode_prompts(tokenizer, rendered: list, encode) -> list[Ids]:
    texts = [prompt for _, prompt, _ in rendered]
    if getattr(tokenizer, "processor", None) is None:
        return encode(texts)
    return tokenizer.encode_prompts(texts, [record.images for record, _, _ in rendered], encode)


def tokenize_records(
    records: Iterable[Record], tokenizer, limits: Truncation, report: Report
) -> list[Example]:
    """Token-id examples for the records; rows that cannot be used are counted in ``report``."""
    bos = getattr(tokenizer, "bos_token", None)
    bos_id = tokenizer.bos_token_id if bos is not None else None
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    encode = _encoder(tokenizer)
    template = has_chat_template(tokenizer)
    examples: list[Example] = []
    records = iter(records)
    while chunk := list(itertools.islice(records, CHUNK)):
        rendered = []
        for record in chunk:
            record = with_system(record, template)
            if record.chat and not template:
                name = getattr(tokenizer, "name_or_path", "") or "the model's tokenizer"
                raise DataError(
                    f"{record.where}: conversational rows (lists of messages) need a chat "
                    f"template, but {name} has none; use a chat/instruct model, or write "
                    "'prompt', 'chosen' and 'rejected' as plain strings"
                )
            try:
                record = with_images(record, tokenizer)
                rendered.append((record, *render(record, tokenizer)))
            except RowError as exc:
                report.problem(exc.reason, exc.message, record.file)
        prompts = _encode_prompts(tokenizer, rendered, encode)
        flat = encode([c for _, _, cs in rendered for c in cs])
        pos = 0
        for (record, _, texts), prompt in zip(rendered, prompts, strict=True):
            completions = []
            for text in texts:
                ids = flat[pos]
                pos += 1
                ending = text.rstrip() if record.chat else text
                if eos_id is not None and not (eos and ending.endswith(eos)):
                    ids = (*ids, eos_id)
                completions.append(ids)
            example = _example(record, prompt, completions, limits, bos_id, report)
            if example is not None:
                examples.append(example)
    report.kept = len(examples)
    return examples


def _example(
    record: Record,
    prompt: Ids,
    completions: list[Ids],
    limits: Truncation,
    bos_id: int | None,
    report: Report,
) -> Example | None:
    where = record.where
    if not prompt and bos_id is None:
        report.problem(
            "empty prompt",
            f"{where}: field 'prompt' is empty and the tokenizer has no BOS token, so the "
            "completion has nothing to follow",
            record.file,
        )
        return None
    if bos_id is not None and prompt[:1] != (bos_id,):
        prompt = (bos_id, *prompt)
    if record.images:  # an image's tokens are never cut: the prompt stays whole
        limits = replace(limits, max_prompt_length=None, mode="keep_start")
    cut = truncate(prompt, completions, limits, bos_id)
    if cut is None:
        n = min(len(prompt), limits.max_prompt_length or len(prompt))
        fix = (
            "its images' tokens included, which are never cut; raise max_length"
            if record.images
            else "raise max_length, set max_prompt_length, or use truncation_mode keep_end"
        )
        report.problem(
            "no room for completion",
            f"{where}: field 'prompt' has {n} tokens, leaving no room for a completion within "
            f"max_length {limits.max_length} ({fix})",
            record.file,
        )
        return None
    if record.paired and cut.completions[0] == cut.completions[1]:
        limit = f"max_length {limits.max_length}"
        if limits.max_completion_length is not None:
            limit += f" and max_completion_length {limits.max_completion_length}"
        report.problem(
            "identical after truncation",
            f"{where}: fields 'chosen' and 'rejected' are identical once truncated to {limit}",
            record.file,
        )
        return None
    report.count_truncation(cut.prompt_cut, cut.completion_cut)
    if record.paired:
        return PairExample(cut.prompt, *cut.completions, source=where, images=record.images)
    return UnpairedExample(
        cut.prompt, cut.completions[0], record.label, source=where, images=record.images
    )
