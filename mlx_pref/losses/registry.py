"""The loss registry, config parsing and the ``preference_loss`` entry point."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_pref.errors import suggest
from mlx_pref.losses.base import (
    ArrayLike,
    LossInputs,
    LossOutput,
    LossSpec,
    UnknownLossError,
    as_float_array,
)
from mlx_pref.losses.specs import ALIASES, EXTRA_INPUTS, REGISTRY
from mlx_pref.losses.state import LossState

MIN_COMBINED = 2
MAX_COMBINED = 5
WEIGHT_SUM_TOL = 1e-6


def loss_names() -> list[str]:
    """Registered loss names (TRL's spellings), in registry order; aliases not included."""
    return list(REGISTRY)


def _unknown(name: str) -> UnknownLossError:
    candidates = [*REGISTRY, *ALIASES]
    hint = suggest(name, candidates)
    hint_text = f" (did you mean '{ALIASES.get(hint, hint)}'?)" if hint else ""
    return UnknownLossError(
        f"unknown loss '{name}'{hint_text}; valid losses: {', '.join(REGISTRY)} "
        f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())})"
    )


def resolve_name(name: str) -> str:
    """Canonical name of ``name`` (case and surrounding spaces ignored; aliases resolved)."""
    if not isinstance(name, str):
        raise UnknownLossError(f"a loss name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in REGISTRY:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise _unknown(name.strip())


def get_loss(name: str) -> LossSpec:
    """The ``LossSpec`` registered under ``name`` or one of its aliases."""
    return REGISTRY[resolve_name(name)]


def describe_losses() -> list[dict[str, Any]]:
    """One row per loss for a ``mlx-pref losses`` table: name, aliases, formula, reference
    needed, paired/unpaired, parameters with defaults, label-smoothing use, paper, TRL source."""
    rows = []
    for spec in REGISTRY.values():
        rows.append(
            {
                "name": spec.name,
                "aliases": list(spec.aliases),
                "formula": spec.formula,
                "reference": spec.needs_reference,
                "paired": spec.paired,
                "data": "paired" if spec.paired else "unpaired",
                "params": dict(spec.params),
                "label_smoothing": spec.uses_label_smoothing,
                "stateful": spec.stateful,
                "paper": spec.paper,
                "arxiv": spec.arxiv,
                "url": spec.paper_url,
                "trl": spec.trl,
                "description": spec.description,
            }
        )
    return rows


def parse_loss(value: str | Mapping[str, float]) -> dict[str, float]:
    """Turn a config value into ``{loss_name: weight}``.

    A string (or alias) gives ``{name: 1.0}``. A mapping is a weighted combination: 2 to 5
    distinct losses, each weight > 0, weights summing to 1 within 1e-6. Paired and unpaired
    losses may be mixed (paired batches feed unpaired losses chosen → desirable, rejected →
    undesirable). Raises ``UnknownLossError`` for an unknown name and ``ValueError`` otherwise,
    each with a one-line message.
    """
    if isinstance(value, str):
        return {resolve_name(value): 1.0}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"loss must be a loss name or a mapping {{name: weight}}, got {type(value).__name__}"
        )
    if len(value) == 1:
        (only,) = value
        raise ValueError(
            f"a weighted loss needs {MIN_COMBINED} to {MAX_COMBINED} entries; for a single loss "
            f"write `loss: {only}` instead of a mapping"
        )
    if len(value) < MIN_COMBINED:
        raise ValueError(
            f"a weighted loss needs {MIN_COMBINED} to {MAX_COMBINED} entries, got none"
        )
    if len(value) > MAX_COMBINED:
        raise ValueError(
            f"a weighted loss combines at most {MAX_COMBINED} losses, got {len(value)}: "
            f"{', '.join(map(str, value))}"
        )
    weights: dict[str, float] = {}
    for raw_name, raw_weight in value.items():
        name = resolve_name(raw_name)
        if name in weights:
            raise ValueError(f"loss '{name}' appears twice in the weighted loss (aliases included)")
        if isinstance(raw_weight, bool) or not isinstance(raw_weight, (int, float)):
            raise ValueError(f"weight of loss '{raw_name}' must be a number, got {raw_weight!r}")
        weight = float(raw_weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of loss '{raw_name}' must be > 0, got {raw_weight}")
        weights[name] = weight
    total = math.fsum(weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(
            f"loss weights must sum to 1 (±{WEIGHT_SUM_TOL:g}), got {total:.10g} for "
            + ", ".join(f"{k}={v:g}" for k, v in weights.items())
        )
    return weights


def _check_params(specs: list[LossSpec], params: Mapping[str, Any]) -> None:
    known_anywhere = {p for spec in REGISTRY.values() for p in spec.params}
    for key in params:
        if key not in known_anywhere:
            own = sorted({p for spec in specs for p in spec.params})
            hint = suggest(key, sorted(known_anywhere))
            raise ValueError(
                f"unknown loss parameter '{key}'"
                + (f" (did you mean '{hint}'?)" if hint else "")
                + f"; {'/'.join(s.name for s in specs)} accepts: {', '.join(own) or 'none'}"
            )


def input_users(name: str) -> str:
    """Who reads extra input ``name``, for messages: ``DPO-family losses`` or loss names."""
    users = [s for s in REGISTRY.values() if name in s.inputs]
    if users and {s.family for s in users} == {"dpo"}:
        return "DPO-family losses"
    return ", ".join(s.name for s in users) or "no loss"


def supplied_inputs(value: str | Mapping[str, float], settings: Mapping[str, Any]) -> list[str]:
    """The extra inputs a run of loss ``value`` supplies under config ``settings``: those its
    losses read that are always on, and those whose switch is set."""
    specs = [REGISTRY[n] for n in parse_loss(value)]
    read = {i for spec in specs for i in spec.inputs}
    return [
        name
        for name, e in EXTRA_INPUTS.items()
        if (e.switch is None and name in read)
        or (e.switch and settings.get(e.switch) not in (None, False))
    ]


@dataclass
class PreparedLoss:
    """A loss (or weighted combination) with its name parsed and parameters checked once,
    ready to call on every batch: ``prepare_loss(...)(chosen_logps, ...)``."""

    weights: dict[str, float]
    specs: list[LossSpec]
    params: dict[str, dict[str, Any]]
    """Each loss's own parameters, defaults filled in."""
    label_smoothing: float

    @property
    def decomposable(self) -> bool:
        """The loss is a mean of per-example terms: sub-batches give the batch's gradient
        (no NLL term, whose token mean spans the batch)."""
        return all(
            spec.decomposable
            and self.params[spec.name].get("rpo_alpha") is None
            and not self.params[spec.name].get("cpo_alpha")
            for spec in self.specs
        )

    def __call__(
        self,
        chosen_logps: ArrayLike,
        rejected_logps: ArrayLike,
        ref_chosen_logps: ArrayLike | None = None,
        ref_rejected_logps: ArrayLike | None = None,
        chosen_lengths: ArrayLike | None = None,
        rejected_lengths: ArrayLike | None = None,
        *,
        beta: float,
        state: LossState | None = None,
        train: bool = True,
        group: Any = None,
        **extras: ArrayLike | None,
    ) -> LossOutput:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        given = {k: v for k, v in extras.items() if v is not None}
        for key in given:
            if key not in EXTRA_INPUTS:
                raise TypeError(f"unknown loss input '{key}'")
            if not any(key in spec.inputs for spec in self.specs):
                raise ValueError(
                    f"{key} is only used by {input_users(key)}, not by "
                    f"{', '.join(s.name for s in self.specs)}"
                )
        core = LossInputs(
            chosen_logps=as_float_array(chosen_logps, "chosen_logps"),
            rejected_logps=as_float_array(rejected_logps, "rejected_logps"),
            ref_chosen_logps=_optional(ref_chosen_logps, "ref_chosen_logps"),
            ref_rejected_logps=_optional(ref_rejected_logps, "ref_rejected_logps"),
            chosen_lengths=_optional(chosen_lengths, "chosen_lengths"),
            rejected_lengths=_optional(rejected_lengths, "rejected_lengths"),
            train=bool(train),
            group=group,
        )
        _check_shapes(core)
        outputs: list[tuple[str, float, LossOutput]] = []
        for spec in self.specs:
            own = {k: as_float_array(v, k) for k, v in given.items() if k in spec.inputs}
            inputs = dataclasses.replace(core, extras=own)
            out = spec.fn(
                inputs,
                beta=beta,
                label_smoothing=self.label_smoothing,
                state=state,
                **self.params[spec.name],
            )
            outputs.append((spec.name, self.weights[spec.name], out))
        if len(outputs) == 1:
            return outputs[0][2]
        return _combine(outputs)


def prepare_loss(
    name: str | Mapping[str, float], *, label_smoothing: float = 0.0, **params: Any
) -> PreparedLoss:
    """Parse ``name`` (a loss, an alias, or ``{name: weight}``) and check its parameters.

    ``params`` may hold parameters of any registered loss (a trainer passes its whole loss
    configuration); each loss takes its own and keeps its defaults for the rest. A name no
    loss knows raises ``ValueError``.
    """
    weights = parse_loss(name) if isinstance(name, str) else parse_loss(dict(name))
    specs = [REGISTRY[n] for n in weights]
    _check_params(specs, params)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    own = {s.name: {k: params.get(k, d) for k, d in s.params.items()} for s in specs}
    return PreparedLoss(weights, specs, own, label_smoothing)


def unused_params(name: str | Mapping[str, float], params: Mapping[str, Any]) -> list[str]:
    """Loss parameters in ``params`` that none of the selected losses reads."""
    used = {k for n in parse_loss(name) for k in REGISTRY[n].params}
    return sorted(set(params) - used)


def preference_loss(
    name: str | Mapping[str, float],
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike | None = None,
    ref_rejected_logps: ArrayLike | None = None,
    chosen_lengths: ArrayLike | None = None,
    rejected_lengths: ArrayLike | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    state: LossState | None = None,
    train: bool = True,
    group: Any = None,
    **kwargs: Any,
) -> LossOutput:
    """Compute a preference loss (or a weighted combination) from per-sequence log-probs.

    ``chosen_logps``/``rejected_logps`` are policy log-probs summed over completion tokens
    (paired losses: row i of each forms pair i; ``bco``/``kto``: desirable and undesirable
    rows, sizes may differ). ``ref_*`` are the reference's, or ``None`` for reference-free
    losses / ``reference_free=True``. Lengths are completion token counts, needed by the
    length-averaged losses (ipo, sigmoid_norm, simpo, orpo) and NLL terms.

    Keywords: ``beta``; ``label_smoothing`` (ε of cDPO/robust/exo_pair/aot/cpo/simpo);
    ``state`` (a ``LossState``, required by ``bco``/``bco_pair``); ``train`` (False: δ is read,
    not updated); ``group`` (``mx.distributed`` group, default: the global one); the extra
    inputs of ``EXTRA_INPUTS`` (``policy_weights``: WPO pair weights; ``udm_weights``: BCO
    UDM weights per undesirable row; ``policy_kl_logps``/``ref_kl_logps``: KTO's
    mismatched-pair log-probs; ``chosen_nll``: token-mean NLL of chosen, overriding the one
    derived from summed log-probs and lengths); and loss parameters
    (``get_loss(name).params``), e.g. ``simpo_gamma``. An extra input none of the selected
    losses reads raises ``ValueError``. A trainer prepares the loss once (``prepare_loss``).
    """
    extras = {k: kwargs.pop(k) for k in list(kwargs) if k in EXTRA_INPUTS}
    loss = prepare_loss(name, label_smoothing=label_smoothing, **kwargs)
    return loss(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        state=state,
        train=train,
        group=group,
        **extras,
    )


def _optional(value: ArrayLike | None, name: str) -> mx.array | None:
    return None if value is None else as_float_array(value, name)


def _check_shapes(inputs: LossInputs) -> None:
    pairs = [
        ("ref_chosen_logps", inputs.ref_chosen_logps, inputs.chosen_logps),
        ("ref_rejected_logps", inputs.ref_rejected_logps, inputs.rejected_logps),
        ("chosen_lengths", inputs.chosen_lengths, inputs.chosen_logps),
        ("rejected_lengths", inputs.rejected_lengths, inputs.rejected_logps),
    ]
    for label, arr, like in pairs:
        if arr is not None and arr.shape != like.shape:
            raise ValueError(
                f"{label} has shape {tuple(arr.shape)}, expected {tuple(like.shape)} "
                "(one value per row)"
            )
    if (inputs.ref_chosen_logps is None) != (inputs.ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")


def _combine(outputs: list[tuple[str, float, LossOutput]]) -> LossOutput:
    total = sum(weight * out.loss for _, weight, out in outputs)
    counts: dict[str, int] = {}
    for _, _, out in outputs:
        for key in out.metrics:
            counts[key] = counts.get(key, 0) + 1
    metrics: dict[str, mx.array] = {}
    for name, _, out in outputs:
        metrics[f"{name}/loss"] = out.loss
        for key, value in out.metrics.items():
            metrics[f"{name}/{key}" if counts[key] > 1 else key] = value
    first = outputs[0][2]
    return LossOutput(
        loss=total,
        losses=None,
        chosen_rewards=first.chosen_rewards,
        rejected_rewards=first.rejected_rewards,
        metrics=metrics,
    )
