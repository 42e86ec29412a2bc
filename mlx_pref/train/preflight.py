"""Checks a run passes before it trains, beyond its config's own: the loss fits the data,
the Hub login is there, the model can do what the config asks. Each fails with one line,
before hours are spent."""

from __future__ import annotations

from mlx_pref.data import Dataset, data_warnings
from mlx_pref.errors import ConfigError
from mlx_pref.losses import get_loss, parse_loss, unused_params


def check_loss_fits_data(loss, train_set: Dataset, eval_set: Dataset | None) -> None:
    """Paired losses need pairs; the held-out set must be of the training set's kind."""
    paired_only = [get_loss(name).name for name in parse_loss(loss) if get_loss(name).paired]
    if paired_only and not train_set.paired:
        raise ConfigError(
            f"loss {', '.join(paired_only)} needs paired data (prompt/chosen/rejected) but "
            f"{train_set.name} holds unpaired rows (prompt/completion/label): "
            "use loss: bco or kto"
        )
    if eval_set is not None and eval_set.paired != train_set.paired:
        raise ConfigError(
            f"eval_data {eval_set.name} is {'paired' if eval_set.paired else 'unpaired'} but "
            f"the training data is {'paired' if train_set.paired else 'unpaired'}"
        )


def check_hub_login(repo_id: str) -> None:
    """A well-formed repo id and a Hub login (the token itself is never shown)."""
    from huggingface_hub import get_token

    from mlx_pref.export import ExportError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    if not get_token():
        raise ConfigError(
            "push_to_hub: not logged in to the Hugging Face Hub; run `hf auth login` "
            "or set HF_TOKEN before training"
        )


def check_data(cfg, train_set: Dataset, eval_set: Dataset | None) -> list[str]:
    """The loaded data against the loss and its options; returns what the user should
    hear before training (warnings on the data, loss parameters without effect)."""
    check_loss_fits_data(cfg.loss, train_set, eval_set)
    if (cfg.use_weighting or cfg.ld_alpha is not None) and not train_set.paired:
        raise ConfigError(
            "use_weighting (WPO) and ld_alpha (LD-DPO) weigh pairs: they need paired data"
        )
    notes = data_warnings(train_set, cfg)
    notes += [
        f"note: {k} has no effect on loss {cfg.loss}"
        for k in unused_params(cfg.loss, cfg.loss_params)
    ]
    return notes


def check_context(cfg, model_config: dict) -> None:
    """A ``max_length`` past the positions the model was built for is refused: beyond them
    its position embeddings were never trained (set it in the model's config.json if you
    extend the context on purpose)."""
    limit = model_config.get("max_position_embeddings")
    if limit and cfg.max_length > int(limit):
        raise ConfigError(
            f"max_length {cfg.max_length} is past the {limit} positions the model was built "
            "for (max_position_embeddings in its config.json): lower max_length"
        )


def check_model_fits_config(cfg, loaded) -> None:
    """What a vision-language model is not trained with here (yet)."""
    if not loaded.vision:
        return
    refused = [
        ("fine_tune: full", cfg.full, "train LoRA adapters on its language model"),
        ("generate_during_eval", cfg.generate_during_eval, "sample with mlx_vlm.generate"),
        ("bco_udm", cfg.bco_udm, "it embeds text prompts with a text model's body"),
        ("push_to_hub", bool(cfg.push_to_hub), "upload the run's adapter folder yourself"),
    ]
    for what, asked, instead in refused:
        if asked:
            raise ConfigError(
                f"{what} is not available for the vision-language model {loaded.path} ({instead})"
            )
