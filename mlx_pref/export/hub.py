"""Uploading an exported folder to the Hugging Face Hub.

The token comes from the usual login or ``HF_TOKEN``; it is never printed, logged or
written, and it is scrubbed from any error message that echoes it.
"""

from __future__ import annotations

from pathlib import Path

from mlx_pref.errors import MlxPrefError


class HubError(MlxPrefError):
    """The Hugging Face Hub refused or could not be reached; the export stays on disk."""


def validate_repo_id(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Reject a malformed Hub repo id before any work is done."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{flag} {repo_id!r}: {str(exc).splitlines()[0]}") from None


def upload_files(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file an upload of ``folder`` sends, sorted. Hidden
    files and folders (``.cache``, ``.DS_Store``) are left out, as the upload leaves them."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def describe_upload(folder: str | Path, repo_id: str, private: bool) -> list[str]:
    """The dry-run listing: repo, visibility, then each file with its size in bytes."""
    files = upload_files(folder)
    total = sum(size for _, size in files)
    visibility = "private" if private else "public"
    lines = [
        f"dry run: would upload {len(files)} files ({total} bytes) from {folder} "
        f"to {repo_id} ({visibility}); nothing was uploaded"
    ]
    lines += [f"  {name}  {size} bytes" for name, size in files]
    return lines


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    api: object | None = None,
) -> list[str]:
    """Create the model repo if needed and upload ``folder``; returns lines to show the user.

    ``dry_run`` only lists what would be uploaded. ``api`` replaces ``huggingface_hub.HfApi()``
    (which reads the token from ``HF_TOKEN`` or the saved login). Any failure becomes one
    ``HubError`` line; the folder is left as it was.
    """
    folder = Path(folder)
    validate_repo_id(repo_id)
    if not folder.is_dir() or not upload_files(folder):
        raise HubError(f"{folder}: nothing to upload (not an exported folder)")
    if dry_run:
        return describe_upload(folder, repo_id, private)
    from huggingface_hub import get_token

    token = get_token()
    if api is None:
        if not token:
            raise HubError(
                "not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN"
            )
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            ignore_patterns=[".*", "*/.*"],
            commit_message="Upload from mlx-pref",
        )
    except Exception as exc:  # the network boundary: whatever the client raises, one line
        raise HubError(_hub_failure(repo_id, folder, exc, token)) from None
    files = upload_files(folder)
    return [f"uploaded {len(files)} files to https://huggingface.co/{repo_id}"]


def _hub_failure(repo_id: str, folder: Path, exc: Exception, token: str | None) -> str:
    detail = " ".join(str(exc).split()) or "no details"
    if token:
        detail = detail.replace(token, "<token>")
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return (
        f"cannot upload to {repo_id} on the Hugging Face Hub ({type(exc).__name__}: {detail}); "
        f"the export is intact in {folder}"
    )
