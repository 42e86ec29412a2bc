"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face fast tokenizer.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, split as llama.cpp splits for the
file's ``tokenizer.ggml.pre``) and SentencePiece BPE (``llama``), with the file's special
tokens, BOS/EOS rules and chat template, in mlx-lm's ``TokenizerWrapper``.
"""

from __future__ import annotations

import warnings

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)

from mlx_pref.errors import GGUFError

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges), as llama.cpp
# splits text for these vocabularies before BPE.
_BPE_PRE = {
    "default": ([_GPT2_REGEX], False),
    "gpt-2": ([_GPT2_REGEX], False),
    "smollm": ([r"\p{N}", _GPT2_REGEX], False),
    "starcoder": ([r"\p{N}", _GPT2_REGEX], False),
    "refact": ([r"\p{N}", _GPT2_REGEX], False),
    "llama-bpe": ([_LLAMA3_REGEX], True),
    "llama3": ([_LLAMA3_REGEX], True),
    "llama-v3": ([_LLAMA3_REGEX], True),
    "smaug-bpe": ([_LLAMA3_REGEX], True),
}

# tokenizer.ggml.token_type values
_CONTROL, _USER_DEFINED = 3, 4


def _bpe_backend(meta: dict):
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known here; splitting text like GPT-2, "
            "which may tokenize digits or punctuation differently from the original model",
            stacklevel=3,
        )
    regexes, ignore_merges = _BPE_PRE.get(pre, _BPE_PRE["default"])
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple]:
    """Merges implied by a SentencePiece BPE vocabulary: every way of writing a normal
    piece as two pieces, best-scored result first (SentencePiece merges by score)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_backend(meta: dict):
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``) with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type", [1] * n)
    scores = meta.get("tokenizer.ggml.scores", [-float(i) for i in range(n)])
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        {token: i for i, token in enumerate(tokens)},
        _spm_merges(tokens, scores, types),
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


def gguf_tokenizer(meta: dict) -> TokenizerWrapper:
    """The tokenizer a GGUF describes: vocabulary, merges, special tokens, BOS/EOS rules
    and chat template, as a ``PreTrainedTokenizerFast`` in mlx-lm's wrapper."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend, detokenizer = _bpe_backend(meta), BPEStreamingDetokenizer
    elif kind == "llama":
        backend, detokenizer = _spm_backend(meta), SPMStreamingDetokenizer
    else:
        raise GGUFError(
            f"tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece BPE)"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    added = [
        AddedToken(token, special=ttype == _CONTROL, normalized=False)
        for token, ttype in zip(tokens, types, strict=False)
        if ttype in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens([t for t in added if not t.special])
    backend.add_special_tokens([t for t in added if t.special])

    def special(name: str) -> tuple[str, int] | None:
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        return (tokens[token_id], token_id) if token_id is not None else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False) and eos)
    if add_bos or add_eos:

        def wrap(seq: str) -> list[str]:
            return [bos[0]] * add_bos + [seq] + [eos[0]] * add_eos

        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(wrap("$A")),
            pair=" ".join(wrap("$A") + wrap("$B")),
            special_tokens=[t for t, on in ((bos, add_bos), (eos, add_eos)) if on],
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos and bos[0],
        eos_token=eos and eos[0],
        unk_token=(special("unknown") or (None,))[0],
        pad_token=(special("padding") or (None,))[0],
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{meta['general.architecture']}.context_length", 2048)),
    )
    extra_eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return TokenizerWrapper(hf, detokenizer, eos_token_ids=[i for i in extra_eos if i is not None])
