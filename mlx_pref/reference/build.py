"""Choosing and building the reference strategy of a run: ``make_reference``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from mlx_pref import backend
from mlx_pref.errors import ConfigError
from mlx_pref.losses import get_loss, parse_loss, supplied_inputs
from mlx_pref.models import LoadedModel, load_model
from mlx_pref.reference.cache import Cached, model_fingerprint
from mlx_pref.reference.strategies import (
    AdaptersOff,
    FrozenCopy,
    NoReference,
    Reference,
    SeparateModel,
    StartingWeights,
)


def reference_free(cfg) -> bool:
    """Whether the run scores no reference at all: its losses need none, or
    ``reference_free: true`` with ``reference: none`` (TRL's ``reference_free`` drops the
    reference from the loss only; the logged rewards still subtract it)."""
    needs = any(get_loss(name).needs_reference for name in parse_loss(cfg.loss))
    return not needs or (bool(cfg.loss_params.get("reference_free")) and cfg.reference == "none")


def make_reference(
    cfg,
    loaded: LoadedModel,
    *,
    sft_weights: dict[str, mx.array] | None = None,
    steps_per_epoch: int = 1,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> Reference:
    """The reference strategy for ``cfg`` over the policy ``loaded`` (adapters attached),
    with the reason it was chosen. ``sft_weights``: the adapter the run started from, which
    the reference keeps (TRL's ``ref_adapter_name``)."""
    if reference_free(cfg):
        if cfg.reference not in ("auto", "none"):
            log(f"note: loss {cfg.loss} is reference-free; ignoring reference: {cfg.reference}")
        why = "reference: none" if cfg.reference == "none" else "the loss is reference-free"
        return NoReference(why + " (rewards are beta * log pi)")
    if cfg.ref_model:
        ref = load_model(
            cfg.ref_model,
            quantization_bits=cfg.quantization_bits,
            dtype=cfg.dtype,
            dequantize=cfg.dequantize,
        )
        theirs, ours = ref.tokenizer, loaded.tokenizer
        if theirs.vocab_size != ours.vocab_size or theirs.get_vocab() != ours.get_vocab():
            raise ConfigError(f"ref_model {cfg.ref_model} has a different tokenizer from the model")
        scorer: Reference = SeparateModel(
            ref.model, "a separate reference model was given", cfg.ld_alpha, cfg.share_prompt
        )
        scored_by = ref
    elif cfg.full:
        scorer = full_fine_tuning_scorer(cfg, loaded)
        scored_by = loaded
    else:
        what = (
            "the base plus the SFT adapter, frozen" if sft_weights else "the base with adapters off"
        )
        scorer = AdaptersOff(
            loaded.model,
            sft_weights,
            f"{what}, no second copy of the weights",
            cfg.ld_alpha,
            cfg.share_prompt,
        )
        scored_by = loaded
    live_refresh = cfg.sync_ref_model and cfg.ref_model_sync_steps < steps_per_epoch
    if isinstance(scorer, StartingWeights):  # the starting weights only exist before step 1
        live_refresh = False
    if cfg.reference == "cache" or (cfg.reference == "auto" and not live_refresh):
        cache_dir = (
            Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else backend.cache_dir() / "ref-logps"
        )
        reason = "each row is scored the first time a step uses it and kept on disk"
        if isinstance(scorer, StartingWeights):
            reason = scorer.reason
        elif isinstance(scorer, FrozenCopy):
            reason = f"{scorer.reason}; {reason}"
        if cfg.reference == "auto":
            reason = "auto: " + reason
        # Everything about the scoring model that changes its values (the examples and
        # the reference adapter are added per dataset by the cache itself).
        base = (
            f"{scored_by.path.name}|{model_fingerprint(scored_by.path)}|"
            f"q{scored_by.quantization_bits}|{cfg.dtype}|dequantize={scored_by.dequantized}"
        )
        return Cached(scorer, base, cache_dir, reason, log=log, show_progress=show_progress)
    if cfg.reference == "auto":
        scorer.reason = (
            f"auto: TR-DPO syncs every {cfg.ref_model_sync_steps} steps, so a cache would be "
            f"scored anew often; {scorer.reason}"
        )
    return scorer


def full_fine_tuning_scorer(cfg, loaded: LoadedModel) -> Reference:
    """Full fine-tuning's reference scorer: the starting weights, scored into the cache
    before the first step; or a frozen copy of the starting model, held beside the policy,
    when the user asks for one (``reference: model``) or the run needs a live reference
    (a refresh, TR-DPO, KTO's KL rows)."""
    live = [
        why
        for why, needed in (
            ("reference: model", cfg.reference == "model"),
            ("ref_regen_epochs", bool(cfg.ref_regen_epochs)),
            ("TR-DPO (sync_ref_model)", cfg.sync_ref_model),
            ("KTO's KL rows", "ref_kl_logps" in supplied_inputs(cfg.loss, vars(cfg))),
        )
        if needed
    ]
    if not live:
        return StartingWeights(
            loaded.model,
            "full fine-tuning has no adapters to switch off: every row of the run's data is "
            "scored from the starting weights before the first step and kept on disk "
            "(reference: model holds a frozen copy instead)",
            cfg.ld_alpha,
            cfg.share_prompt,
        )
    copy = load_model(cfg.model, dtype=cfg.dtype, dequantize=cfg.dequantize)
    return FrozenCopy(
        copy.model,
        f"full fine-tuning with {', '.join(live)}: a frozen copy of the starting model",
        cfg.ld_alpha,
        cfg.share_prompt,
    )


def start_reference(reference: Reference, datasets: dict, orders: dict | None = None) -> None:
    """Attach the run's datasets; a reference scored from the starting weights of a full
    fine-tuning run scores every row now, while the policy still holds them, in the
    batches ``orders`` gives (the ones the run uses)."""
    reference.attach(datasets)
    scorer = getattr(reference, "scorer", None)
    if isinstance(scorer, StartingWeights) and not scorer.sealed:
        reference.prepare(datasets, orders)
        scorer.seal()
