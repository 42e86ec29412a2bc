"""Hugging Face Hub dataset repositories: files downloaded (or found in the local cache),
every failure one line that says what to do."""

from __future__ import annotations

from pathlib import Path

from mlx_pref.errors import DataError


def download_dataset(repo: str, patterns: list[str], revision: str | None = None) -> Path:
    """The local snapshot of dataset ``repo`` holding the files that match ``patterns``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, revision=revision)
        )
    except LocalEntryNotFoundError:
        raise DataError(
            f"cannot download dataset '{repo}' from the Hugging Face Hub: offline "
            "(no network, or HF_HUB_OFFLINE=1) and not in the local cache. Connect once to "
            "cache it, or pass a local file."
        ) from None
    except GatedRepoError:
        raise DataError(
            f"dataset '{repo}' is gated on the Hugging Face Hub: accept its terms on its "
            "page and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            f"dataset '{repo}' not found on the Hugging Face Hub (if it is private, log "
            "in with hf auth login); a local path that does not exist is read as a Hub id"
        ) from None
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot download dataset '{repo}': {first}") from None
    except OSError as exc:
        raise DataError(
            f"cannot download dataset '{repo}' from the Hugging Face Hub "
            f"({type(exc).__name__}); check the network or pass a local file"
        ) from None
