"""Write a file so that a reader sees the old content or the new, never half of it.

The content goes to a temporary file beside the target (same folder, so the same file system), is
flushed to disk, and is moved onto the target with ``os.replace``, which is atomic on POSIX. A failure at
any point leaves the target as it was and removes the temporary file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def temporary_beside(path: Path) -> Path:
    """A temporary name in ``path``'s folder, unique per process and thread, that keeps ``path``'s suffixes
    (writers such as nibabel and matplotlib choose the format from them)."""
    unique = f"{os.getpid()}-{threading.get_ident()}"
    return path.with_name(f".{path.name}.{unique}.tmp{''.join(path.suffixes)}")


def atomic_write(
    path: Path, write: Callable[[Path], None], *, fsync: bool = True, mode: int | None = None
) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then move it onto ``path``.

    Args:
        path: the file to (re)place; its folder is created if missing.
        write: writes the whole content to the path it is given.
        fsync: flush the temporary file to disk before the move, so a power loss cannot leave an empty
            target behind a completed rename.
        mode: create the file with these permission bits (e.g. 0o600 for a key), never wider, so it is
            not readable by others even for an instant; default: the umask's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # the umask may have narrowed it; never widened beyond `mode`
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> None:
    """`atomic_write` of a text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """`atomic_write` of bytes."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)
