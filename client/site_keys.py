"""`neurofed-site keygen`: the site's SuperNode key pair for Flower's node authentication.

The coordinator admits only SuperNodes whose public key it enrolled; the SuperNode proves it holds the
private key by signing its requests. Keys are ECDSA on NIST P-384, in OpenSSH format, as Flower reads
them (`flower-supernode --auth-supernode-private-key`, `flwr supernode register`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.atomic_files import atomic_write_bytes
from common.key_files import others_may_read
from models.errors import NeurofedError

PRIVATE_KEY_FILE = "site.key"
PUBLIC_KEY_FILE = "site.pub"


@dataclass(frozen=True)
class SiteKeyPair:
    """Where a key pair was written: ``private_key`` (mode 0600, stays at the site) and ``public_key``
    (sent to the coordinator's operator for `neurofed coordinator enroll`)."""

    private_key: Path
    public_key: Path


def generate_site_keys(out_dir: Path, comment: str = "neurofed-site") -> SiteKeyPair:
    """Write a new P-384 key pair into ``out_dir``; refuses to replace an existing pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir = out_dir.expanduser()
    pair = SiteKeyPair(out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE)
    for path in (pair.private_key, pair.public_key):
        if path.exists():
            raise NeurofedError(
                f"--out {out_dir}: {path.name} already exists; a site keeps its key (the coordinator enrolled "
                "it). To replace it, move the old pair away first and have the new public key enrolled"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise NeurofedError(f"--out {out_dir}: cannot create it ({exc.strerror})") from exc
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # Each file is created with its final mode (the key never briefly readable by others), under a
    # temporary name, then renamed into place.
    atomic_write_bytes(pair.private_key, private, mode=0o600)
    atomic_write_bytes(pair.public_key, public + f" {comment}\n".encode(), mode=0o644)
    return pair


def check_private_key(path: Path) -> None:
    """Check that ``path`` is a readable OpenSSH EC private key readable by its owner only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = path.expanduser()
    if not path.is_file():
        raise NeurofedError(
            f"--key {path}: file not found; make the site's key pair with `neurofed-site keygen`"
        )
    if (exposed := others_may_read(path)) is not None:
        raise NeurofedError(f"--key {path}: {exposed}")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise NeurofedError(
            f"--key {path}: not an unencrypted OpenSSH private key ({exc}); pass the site.key from "
            "`neurofed-site keygen`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NeurofedError(
            f"--key {path}: Flower needs an EC (NIST curve) key; make one with `neurofed-site keygen`"
        )


def key_fingerprint(private_key: Path) -> str:
    """The SHA-256 fingerprint of the public half of ``private_key``, as `ssh-keygen -lf site.pub` shows it
    (``SHA256:...``); ``"unreadable key"`` when it cannot be read."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private_key.expanduser().read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return "unreadable key"
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
