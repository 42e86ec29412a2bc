"""The loss registry, config parsing and the ``preference_loss`` entry point."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from mlx_pref.losses import dpo, reference_free, unpaired
from mlx_pref.losses.base import (
    ArrayLike,
    LossInputs,
    LossOutput,
    LossSpec,
    UnknownLossError,
    as_float_array,
    closest,
)
from mlx_pref.losses.state import LossState

MIN_COMBINED = 2
MAX_COMBINED = 5
WEIGHT_SUM_TOL = 1e-6

_TRL_DPO = "TRL 1.16 trl/trainer/dpo_trainer.py"
_TRL_DPO_028 = "TRL 0.28 trl/trainer/dpo_trainer.py"
_TRL_KTO = "TRL 1.16 trl/trainer/kto_trainer.py"
_TRL_CPO = "TRL 1.16 trl/experimental/cpo/cpo_trainer.py"
_TRL_ORPO = "TRL 1.16 trl/experimental/orpo/orpo_trainer.py"
_TRL_BCO = "TRL 1.13 trl/experimental/bco/bco_trainer.py"


def _dpo_spec(
    name: str,
    fn: Any,
    formula: str,
    paper: str,
    arxiv: str | None,
    *,
    extra: dict[str, Any] | None = None,
    kept: tuple[str, ...] = (),
    needs_reference: bool = True,
    smoothing: bool = False,
    stateful: bool = False,
    aliases: tuple[str, ...] = (),
    description: str = "",
) -> LossSpec:
    return LossSpec(
        name=name,
        fn=fn,
        needs_reference=needs_reference,
        paired=True,
        params={**(extra or {}), **dpo.DPO_OPTIONS},
        formula=formula,
        paper=paper,
        arxiv=arxiv,
        # reference_free and rpo_alpha (every DPO-family loss) and ``kept`` were dropped by
        # TRL 1.x; they follow the last release that had them.
        trl=f"{_TRL_DPO}; {', '.join([*kept, 'reference_free', 'rpo_alpha'])}: {_TRL_DPO_028}",
        family="dpo",
        aliases=aliases,
        uses_label_smoothing=smoothing,
        stateful=stateful,
        description=description,
    )


_SPECS: tuple[LossSpec, ...] = (
    _dpo_spec(
        "sigmoid",
        dpo.sigmoid,
        "-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)",
        "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "2305.18290",
        kept=("label_smoothing (cDPO)",),
        smoothing=True,
        aliases=("dpo",),
        description="Standard DPO; label_smoothing > 0 gives cDPO.",
    ),
    _dpo_spec(
        "hinge",
        dpo.hinge,
        "max(0, 1 - βΔ)",
        "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
        "2305.10425",
        description="Hinge loss on the normalised likelihood (SLiC/RSO); 1/β is the margin.",
    ),
    _dpo_spec(
        "ipo",
        dpo.ipo,
        "(s_c/|y_c| - s_r/|y_r| - 1/(2β))²",
        "A General Theoretical Paradigm to Understand Learning from Human Preferences",
        "2310.12036",
        description="IPO on length-averaged log-ratios (TRL's normalisation); β is τ.",
    ),
    _dpo_spec(
        "exo_pair",
        dpo.exo_pair,
        "σ(βΔ)·(log σ(βΔ) - log(1-ε)) + σ(-βΔ)·(log σ(-βΔ) - log ε)",
        "Towards Efficient Exact Optimization of Language Model Alignment",
        "2402.00856",
        smoothing=True,
        description="Pairwise EXO (reverse KL); needs label_smoothing ε > 0 (paper: 1e-3).",
    ),
    _dpo_spec(
        "nca_pair",
        dpo.nca_pair,
        "-log σ(βl_c) - ½·log σ(-βl_c) - ½·log σ(-βl_r)",
        "Noise Contrastive Alignment of Language Models with Explicit Rewards",
        "2402.05369",
        description="Pairwise NCA: optimises absolute rather than relative likelihood.",
    ),
    _dpo_spec(
        "robust",
        dpo.robust,
        "(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1-2ε)",
        "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
        "2403.00409",
        smoothing=True,
        description="Unbiased DPO under label-flip probability ε = label_smoothing ∈ [0, 0.5).",
    ),
    _dpo_spec(
        "bco_pair",
        dpo.bco_pair,
        "-log σ(βl_c - δ) - log σ(-(βl_r - δ)), δ = running mean reward",
        "Binary Classifier Optimization for Large Language Model Alignment",
        "2404.04656",
        kept=("running shift δ",),
        stateful=True,
        description="Paired BCO with the running-mean reward shift δ (needs state); "
        "TRL 1.16's bco_pair has no shift.",
    ),
    _dpo_spec(
        "sppo_hard",
        dpo.sppo_hard,
        "(l_c - 1/(2β))² + (l_r + 1/(2β))²",
        "Self-Play Preference Optimization for Language Model Alignment",
        "2405.00675",
        description="SPPO with hard win/lose probabilities.",
    ),
    _dpo_spec(
        "aot",
        dpo.aot,
        "cDPO loss of β·(sort(logπ_c - logπ_r) - sort(logπref_c - logπref_r))",
        "Distributional Preference Alignment of LLMs via Optimal Transport",
        "2406.05882",
        smoothing=True,
        description="AOT for paired data: stochastic dominance via sorted quantiles.",
    ),
    _dpo_spec(
        "aot_unpaired",
        dpo.aot_unpaired,
        "cDPO loss of β·(sort(l_c) - sort(l_r))",
        "Distributional Preference Alignment of LLMs via Optimal Transport",
        "2406.05882",
        smoothing=True,
        aliases=("aot_pair",),
        description="AOT ignoring the pairing (equal counts); TRL's former 'aot_pair'.",
    ),
    _dpo_spec(
        "sigmoid_norm",
        dpo.sigmoid_norm,
        "-log σ(β·(s_c/|y_c| - s_r/|y_r|))",
        "SimPO: Simple Preference Optimization with a Reference-Free Reward",
        "2405.14734",
        description="DPO on length-normalised log-ratios.",
    ),
    _dpo_spec(
        "apo_zero",
        dpo.apo_zero,
        "1 - σ(βl_c) + σ(βl_r)",
        "Anchored Preference Optimization and Contrastive Revisions: Addressing "
        "Underspecification in Alignment",
        "2408.06266",
        description="Raise chosen, lower rejected likelihood (model worse than the winners).",
    ),
    _dpo_spec(
        "apo_down",
        dpo.apo_down,
        "σ(βl_c) + 1 - σ(βΔ)",
        "Anchored Preference Optimization and Contrastive Revisions: Addressing "
        "Underspecification in Alignment",
        "2408.06266",
        description="Lower both, rejected more (model better than the winners).",
    ),
    _dpo_spec(
        "discopop",
        dpo.discopop,
        "(1 - σ(βΔ/τ))·(-log σ(βΔ)) + σ(βΔ/τ)·exp(-βΔ)",
        "Discovering Preference Optimization Algorithms with and for Large Language Models",
        "2406.08414",
        extra={"discopop_tau": 0.05},
        description="Log-ratio modulated loss (LRML) found by LLM-driven discovery.",
    ),
    _dpo_spec(
        "sft",
        dpo.sft,
        "-Σ logπ(y_c) / Σ|y_c|  (token-mean NLL of chosen)",
        "Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed "
        "Preference Optimization (MPO, which mixes it in)",
        "2411.10442",
        needs_reference=False,
        description="Plain NLL of the chosen completions; combine with a preference loss.",
    ),
    LossSpec(
        name="cpo",
        fn=reference_free.cpo,
        needs_reference=False,
        paired=True,
        params={"cpo_alpha": 1.0, "alpha": 0.0},
        formula="-(1-ε)·log σ(β(logπ_c - logπ_r)) - ε·log σ(-β(…)) + cpo_alpha·NLL",
        paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
        "in Machine Translation",
        arxiv="2401.08417",
        trl=_TRL_CPO,
        family="reference_free",
        uses_label_smoothing=True,
        description="Reference-free DPO-style loss plus a behaviour-cloning NLL term.",
    ),
    LossSpec(
        name="simpo",
        fn=reference_free.simpo,
        needs_reference=False,
        paired=True,
        params={"simpo_gamma": 0.5, "cpo_alpha": 0.0, "alpha": 0.0},
        formula="-(1-ε)·log σ(β(p̄_c - p̄_r) - γ) - ε·log σ(-(…)), p̄ = logπ/|y|",
        paper="SimPO: Simple Preference Optimization with a Reference-Free Reward",
        arxiv="2405.14734",
        trl=f"{_TRL_CPO} (loss_type='simpo')",
        family="reference_free",
        uses_label_smoothing=True,
        description="Length-averaged reference-free reward with target margin γ = simpo_gamma.",
    ),
    LossSpec(
        name="orpo",
        fn=reference_free.orpo,
        needs_reference=False,
        paired=True,
        params={},
        formula="NLL - β·log σ(log odds(y_c) - log odds(y_r)), odds(y) = p̄/(1-p̄) on avg. logπ",
        paper="ORPO: Monolithic Preference Optimization without Reference Model",
        arxiv="2403.07691",
        trl=_TRL_ORPO,
        family="reference_free",
        description="SFT plus an odds-ratio preference term weighted by β (the paper's λ).",
    ),
    LossSpec(
        name="bco",
        fn=unpaired.bco,
        needs_reference=True,
        paired=False,
        params={},
        formula="-log σ(r_d - δ) | -w·log σ(-(r_u - δ)), r = β(logπ - logπ_ref)",
        paper="Binary Classifier Optimization for Large Language Model Alignment",
        arxiv="2404.04656",
        trl=_TRL_BCO,
        family="unpaired",
        stateful=True,
        description="Binary classifier on implicit rewards with running shift δ; "
        "optional UDM weights w.",
    ),
    LossSpec(
        name="kto",
        fn=unpaired.kto,
        needs_reference=True,
        paired=False,
        params={"desirable_weight": 1.0, "undesirable_weight": 1.0},
        formula="λ_D·(1 - σ(β(l_d - z))) | λ_U·(1 - σ(β(z - l_u))), z = max(0, KL estimate)",
        paper="KTO: Model Alignment as Prospect Theoretic Optimization",
        arxiv="2402.01306",
        trl=_TRL_KTO,
        family="unpaired",
        description="Prospect-theoretic loss; z from mismatched-pair log-probs (0 if not given).",
    ),
    LossSpec(
        name="apo_zero_unpaired",
        fn=unpaired.apo_zero_unpaired,
        needs_reference=True,
        paired=False,
        params={"desirable_weight": 1.0, "undesirable_weight": 1.0},
        formula="λ_D·(1 - σ(βl_d)) | λ_U·σ(βl_u)",
        paper="Anchored Preference Optimization and Contrastive Revisions: Addressing "
        "Underspecification in Alignment",
        arxiv="2408.06266",
        trl=f"{_TRL_KTO} (loss_type='apo_zero_unpaired')",
        family="unpaired",
        description="APO-zero on unpaired rows (KTOTrainer's variant, no KL term).",
    ),
)

REGISTRY: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}
ALIASES: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in spec.aliases}

_DATA_KEYWORDS = {
    "policy_weights": "DPO-family losses (WPO)",
    "udm_weights": "bco",
    "policy_kl_logps": "kto",
    "ref_kl_logps": "kto",
}
_DATA_USERS = {
    "policy_weights": lambda spec: spec.family == "dpo",
    "udm_weights": lambda spec: spec.name == "bco",
    "policy_kl_logps": lambda spec: spec.name == "kto",
    "ref_kl_logps": lambda spec: spec.name == "kto",
}


def loss_names() -> list[str]:
    """Registered loss names (TRL's spellings), in registry order; aliases not included."""
    return list(REGISTRY)


def _unknown(name: str) -> UnknownLossError:
    candidates = [*REGISTRY, *ALIASES]
    hint = closest(name, candidates)
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


def _optional(value: ArrayLike | None, name: str) -> mx.array | None:
    return None if value is None else as_float_array(value, name)


def _check_params(specs: list[LossSpec], params: dict[str, Any]) -> None:
    known_anywhere = {p for spec in REGISTRY.values() for p in spec.params}
    for key in params:
        if key not in known_anywhere:
            own = sorted({p for spec in specs for p in spec.params})
            hint = closest(key, sorted(known_anywhere))
            raise ValueError(
                f"unknown loss parameter '{key}'"
                + (f" (did you mean '{hint}'?)" if hint else "")
                + f"; {'/'.join(s.name for s in specs)} accepts: {', '.join(own) or 'none'}"
            )


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
    policy_weights: ArrayLike | None = None,
    udm_weights: ArrayLike | None = None,
    policy_kl_logps: ArrayLike | None = None,
    ref_kl_logps: ArrayLike | None = None,
    chosen_nll: ArrayLike | None = None,
    group: Any = None,
    **params: Any,
) -> LossOutput:
    """Compute a preference loss (or a weighted combination) from per-sequence log-probs.

    ``chosen_logps``/``rejected_logps`` are policy log-probs summed over completion tokens
    (paired losses: row i of each forms pair i; ``bco``/``kto``: desirable and undesirable
    rows, sizes may differ). ``ref_*`` are the reference's, or ``None`` for reference-free
    losses / ``reference_free=True``. Lengths are completion token counts, needed by the
    length-averaged losses (ipo, sigmoid_norm, simpo, orpo) and NLL terms.

    Keywords: ``beta``; ``label_smoothing`` (ε of cDPO/robust/exo_pair/aot/cpo/simpo);
    ``state`` (a ``LossState``, required by ``bco``/``bco_pair``); ``train`` (False: δ is read,
    not updated); ``policy_weights`` (WPO pair weights, DPO family); ``udm_weights`` (BCO UDM
    weights per undesirable row); ``policy_kl_logps``/``ref_kl_logps`` (KTO's mismatched-pair
    log-probs); ``chosen_nll`` (token-mean NLL of chosen, overrides the one derived from
    summed log-probs and lengths); ``group`` (``mx.distributed`` group, default: the global
    one); ``**params``: loss parameters (``get_loss(name).params``), e.g. ``simpo_gamma``.
    Parameters of other registered losses are accepted and ignored, so a trainer can pass its
    whole loss configuration; a name no loss knows raises ``ValueError``. A data keyword
    that none of the selected losses reads (e.g. ``udm_weights`` without ``bco``) raises too.
    """
    weights = parse_loss(name) if isinstance(name, str) else parse_loss(dict(name))
    specs = [REGISTRY[n] for n in weights]
    _check_params(specs, params)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")

    inputs = LossInputs(
        chosen_logps=as_float_array(chosen_logps, "chosen_logps"),
        rejected_logps=as_float_array(rejected_logps, "rejected_logps"),
        ref_chosen_logps=_optional(ref_chosen_logps, "ref_chosen_logps"),
        ref_rejected_logps=_optional(ref_rejected_logps, "ref_rejected_logps"),
        chosen_lengths=_optional(chosen_lengths, "chosen_lengths"),
        rejected_lengths=_optional(rejected_lengths, "rejected_lengths"),
        policy_weights=_optional(policy_weights, "policy_weights"),
        udm_weights=_optional(udm_weights, "udm_weights"),
        policy_kl_logps=_optional(policy_kl_logps, "policy_kl_logps"),
        ref_kl_logps=_optional(ref_kl_logps, "ref_kl_logps"),
        chosen_nll=None if chosen_nll is None else as_float_array(chosen_nll, "chosen_nll"),
        train=bool(train),
        group=group,
    )
    _check_shapes(inputs)
    supplied = {
        "policy_weights": policy_weights,
        "udm_weights": udm_weights,
        "policy_kl_logps": policy_kl_logps,
        "ref_kl_logps": ref_kl_logps,
    }
    for key, value in supplied.items():
        if value is not None and not any(_DATA_USERS[key](spec) for spec in specs):
            raise ValueError(
                f"{key} is only used by {_DATA_KEYWORDS[key]}, not by "
                f"{', '.join(s.name for s in specs)}"
            )

    outputs: list[tuple[str, float, LossOutput]] = []
    for spec in specs:
        own = {k: params.get(k, default) for k, default in spec.params.items()}
        out = spec.fn(inputs, beta=beta, label_smoothing=label_smoothing, state=state, **own)
        outputs.append((spec.name, weights[spec.name], out))

    if len(outputs) == 1:
        return outputs[0][2]
    return _combine(outputs)


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
