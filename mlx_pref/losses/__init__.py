"""Preference losses for mlx-pref, as pure functions of per-sequence log-probs.

``preference_loss(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
chosen_lengths, rejected_lengths, *, beta, ...)`` computes any registered loss or a weighted
combination; ``prepare_loss`` parses and checks it once for a training run; ``parse_loss``
validates the config value; ``get_loss`` / ``loss_names`` / ``describe_losses`` expose the
registry (``specs``), whose entries also name the extra batch inputs each loss reads
(``EXTRA_INPUTS``). Per-token helpers (WPO, LD-DPO), β schedules, BCO's running state and
its UDM density-ratio classifier live alongside.

Which TRL release each loss follows is recorded in ``get_loss(name).trl``.
"""

from mlx_pref.losses.base import (
    LossInputs,
    LossOutput,
    LossSpec,
    UnknownLossError,
    concat_rows,
    empty_rows,
    on_rows,
)
from mlx_pref.losses.dpo import F_DIVERGENCES, f_divergence_scores
from mlx_pref.losses.registry import (
    PreparedLoss,
    describe_losses,
    get_loss,
    input_users,
    loss_names,
    parse_loss,
    preference_loss,
    prepare_loss,
    resolve_name,
    supplied_inputs,
    unused_params,
)
from mlx_pref.losses.schedule import BETA_SCHEDULES, beta_at
from mlx_pref.losses.specs import ALIASES, EXTRA_INPUTS, REGISTRY, ExtraInput
from mlx_pref.losses.state import LossState, RunningMoments
from mlx_pref.losses.tokens import (
    ld_sequence_logps,
    log_sum_squared_probs,
    wpo_pair_weights,
    wpo_sequence_weights,
)
from mlx_pref.losses.udm import (
    DensityRatioClassifier,
    density_ratio_weights,
    fit_density_ratio_classifier,
    mean_pool,
    sample_prompt_indices,
)

__all__ = [
    "ALIASES",
    "BETA_SCHEDULES",
    "EXTRA_INPUTS",
    "F_DIVERGENCES",
    "REGISTRY",
    "DensityRatioClassifier",
    "ExtraInput",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "LossState",
    "PreparedLoss",
    "RunningMoments",
    "UnknownLossError",
    "beta_at",
    "concat_rows",
    "density_ratio_weights",
    "describe_losses",
    "empty_rows",
    "f_divergence_scores",
    "fit_density_ratio_classifier",
    "get_loss",
    "input_users",
    "ld_sequence_logps",
    "log_sum_squared_probs",
    "loss_names",
    "mean_pool",
    "on_rows",
    "parse_loss",
    "preference_loss",
    "prepare_loss",
    "resolve_name",
    "sample_prompt_indices",
    "supplied_inputs",
    "unused_params",
    "wpo_pair_weights",
    "wpo_sequence_weights",
]
