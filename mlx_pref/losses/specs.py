"""The spec table: every loss with its function, formula, paper, TRL source and inputs.

Each entry names the extra batch inputs its loss reads (``inputs``); those are declared
once in ``EXTRA_INPUTS`` with the config switch that turns them on, so the trainer's
providers (``mlx_pref.train.inputs``) and the config checks read the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_pref.losses import dpo, reference_free, unpaired
from mlx_pref.losses.base import LossSpec


@dataclass(frozen=True)
class ExtraInput:
    """A per-batch input some losses read besides the log-probs (no gradient flows in it)."""

    name: str
    per: str
    """What it has one value per: ``pair``, ``row`` (each sequence), ``rejected`` (each
    undesirable row) or ``batch`` (a scalar); a config-time placeholder takes that shape."""
    about: str
    switch: str | None = None
    """The config key that turns it on; None: supplied whenever a selected loss reads it."""


EXTRA_INPUTS: dict[str, ExtraInput] = {
    e.name: e
    for e in (
        ExtraInput("policy_weights", "pair", "WPO pair weights", switch="use_weighting"),
        ExtraInput("udm_weights", "rejected", "BCO's UDM density-ratio weights", switch="bco_udm"),
        ExtraInput("policy_kl_logps", "row", "KTO's KL rows under the policy"),
        ExtraInput("ref_kl_logps", "row", "KTO's KL rows under the reference"),
        ExtraInput(
            "chosen_nll", "batch", "the chosen NLL from true sums (LD-DPO)", switch="ld_alpha"
        ),
    )
}
"""Every extra loss input, by the keyword ``preference_loss`` takes it as."""

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
    decomposable: bool = True,
    aliases: tuple[str, ...] = (),
    description: str = "",
) -> LossSpec:
    return LossSpec(
        inputs=("policy_weights", "chosen_nll"),
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
        decomposable=decomposable and not stateful,
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
        decomposable=False,
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
        decomposable=False,
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
        decomposable=False,
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
        inputs=("chosen_nll",),
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
        inputs=("chosen_nll",),
        family="reference_free",
        uses_label_smoothing=True,
        description="Length-averaged reference-free reward with target margin γ = simpo_gamma.",
        decomposable=True,
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
        inputs=("chosen_nll",),
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
        inputs=("udm_weights",),
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
        inputs=("policy_kl_logps", "ref_kl_logps"),
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
        decomposable=True,
    ),
)

REGISTRY: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}
ALIASES: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in spec.aliases}
