"""Where a node's files live on disk, and how they are written safely.

Every path a user sends is confined to the node's data directory; every file
the node writes appears complete or not at all (temporary file + rename).
"""
from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from errors import PathRefused

MAX_PATH_LENGTH = 1024
MAX_NAME_BYTES = 255


def confine_path(base: Path, user_path: Any, field: str = "file_path", *, private: Path | None = None) -> Path:
    """Resolve `user_path` inside `base` and outside `private`, or raise PathRefused without touching the file.

    Relative paths are taken from `base`; absolute ones must already lie inside it.
    Symlinks are resolved first, so a link that points out of `base`, or into `private`
    (the node's own files), is refused.
    """
    if not isinstance(user_path, str) or not user_path.strip():
        raise PathRefused(f"'{field}' must be a non-empty string")
    if "\x00" in user_path:
        raise PathRefused(f"'{field}' contains a NUL byte")
    try:
        os.fsencode(user_path)
    except UnicodeEncodeError:
        raise PathRefused(f"'{field}' holds characters no file name can have (a lone surrogate)") from None
    if len(user_path) > MAX_PATH_LENGTH:
        raise PathRefused(f"'{field}' is longer than {MAX_PATH_LENGTH} characters")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in Path(user_path).parts):
        raise PathRefused(f"'{field}' has a name longer than {MAX_NAME_BYTES} bytes")
    root = base.resolve()
    resolved = (root / user_path).resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise PathRefused(f"'{field}' must stay inside the node's data directory")
    if private is not None and resolved.is_relative_to(private.resolve()):
        raise PathRefused(f"'{field}' names the node's own files ({private.name}), which no request may touch")
    return resolved


def safe_file_name(name: str, fallback: str) -> str:
    """A plain file name to write under: no folders, no control characters, not hidden."""
    name = unicodedata.normalize("NFC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip().lstrip(".")
    while len(name.encode()) > MAX_NAME_BYTES:
        name = name[:-1]
    return name or fallback


@contextmanager
def written_atomically(destination: Path, mode: str = "wb", *, overwrite: bool = True,
                       durable: bool = True) -> Iterator[Any]:
    """Open a temporary file beside `destination`; rename it into place only if the block succeeds.

    The file is created owner-only (mkstemp), which suits medical records. With
    overwrite=False an existing destination, even one that appeared meanwhile,
    raises FileExistsError and is left alone. durable=True flushes it to disk
    before the rename, so a crash cannot leave an empty file under the name.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".part-")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if not overwrite and destination.exists():
            raise FileExistsError(str(destination))
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json_atomically(destination: Path, data: Any) -> None:
    with written_atomically(destination, "w") as handle:
        json.dump(data, handle)
