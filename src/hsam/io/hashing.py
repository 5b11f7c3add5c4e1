"""Content hashes of files (split manifests, weights identity, evaluation reuse)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hsam.errors import DataError


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes.

    Raises:
        DataError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot hash {path}: the file does not exist.")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
