"""The images of a preference row: read, checked, and kept as a small reference.

A row names its images in ``images`` (a list) or ``image`` (one), each as:

- a path, relative to the folder of the data file that holds the row (or absolute);
- image bytes, as parquet files written by ``datasets`` hold them: ``{"bytes": ..., "path":
  ...}`` (the bytes win; the path is then only a name), or raw bytes;
- a ``data:image/...;base64,`` URI.

URLs are not fetched: a row must not make training reach the network. Each image is
decoded once when it is read, so that a missing file or bytes that are not an image are a
counted, skipped row with a one-line ``file:line: field 'images' ...`` message (an error
under ``strict``), never a crash mid-run. What is kept is an ``ImageRef``: the file's
path or the bytes, their SHA-256 (the reference cache's fingerprint includes it) and the
size; the pixels are decoded again when a batch needs them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_pref.errors import DataError

IMAGE_FIELDS = ("images", "image")


class ImageProblem(Exception):
    """A row whose images cannot be used: ``reason`` for counting, ``message`` names
    file:line:field (the same shape as the data pipeline's row errors)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: where its bytes are, their digest, and its size in pixels."""

    source: str | bytes
    """A file path, or the encoded image itself."""
    digest: str
    width: int
    height: int

    def data(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        return Path(self.source).read_bytes()

    def open(self):
        """The image as an RGB ``PIL.Image``."""
        image = pil().open(io.BytesIO(self.data()))
        return image.convert("RGB")


def pil():
    """Pillow's ``Image`` module, or a one-line DataError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("rows with images need Pillow: pip install 'mlx-pref[vision]'") from None
    return Image


def _where(where: str, field: str, item: int, many: bool) -> str:
    return f"{where}: field '{field}'" + (f" item {item}" if many else "")


def _bytes_of(value: Any, base: Path, at: str) -> tuple[bytes, str | bytes]:
    """The encoded image and where it comes from (a path, or the bytes themselves)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ImageProblem("bad image", f"{at}: has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), bytes(value)
    if not isinstance(value, str) or not value.strip():
        kind = type(value).__name__ if value is not None else "null"
        raise ImageProblem(
            "wrong type", f"{at}: must be a path, image bytes or a data URI, got {kind}"
        )
    if value.startswith(("http://", "https://")):
        raise ImageProblem(
            "image URL",
            f"{at}: {value[:60]} is a URL; mlx-pref does not fetch images: download them "
            "and give their paths (relative to the data file)",
        )
    if value.startswith("data:"):
        try:
            data = base64.b64decode(value.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            raise ImageProblem("bad image", f"{at}: not a base64 data URI") from None
        return data, data
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise ImageProblem("missing image", f"{at}: file not found: {path}") from None
    except OSError as exc:
        raise ImageProblem("missing image", f"{at}: cannot read {path} ({exc.strerror})") from None


def read_image(value: Any, base: Path, at: str) -> ImageRef:
    """One image value checked: its bytes found and decoded (then let go)."""
    data, source = _bytes_of(value, base, at)
    image_module = pil()
    try:
        with image_module.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageProblem("bad image", f"{at}: not an image ({what})") from None
    return ImageRef(source, hashlib.sha256(data).hexdigest(), width, height)


def row_images(row: Any, where: str, base: Path) -> tuple[ImageRef, ...]:
    """The images a row names (``images`` or ``image``), in order; () when it names none.
    ``base``: the folder relative paths start from (the data file's)."""
    if not isinstance(row, dict):
        return ()
    field = next((f for f in IMAGE_FIELDS if row.get(f) is not None), None)
    if field is None:
        return ()
    value = row[field]
    many = isinstance(value, (list, tuple))
    values = list(value) if many else [value]
    return tuple(
        read_image(v, base, _where(where, field, i, many)) for i, v in enumerate(values, 1)
    )
