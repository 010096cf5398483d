"""Private key files: readable by their owner only, whichever side of the federation holds them."""

from __future__ import annotations

from pathlib import Path


def others_may_read(path: Path) -> str | None:
    """Why the private key at ``path`` is exposed (group or other users may access it), or None.

    The message ends with the command that fixes it.
    """
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return f"other users may read this private key (mode {mode:o}); run `chmod 600 {path}`"
    return None
