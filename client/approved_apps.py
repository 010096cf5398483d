"""Which app bundles this site runs: the hashes its operator approved, the check, and its audit log.

Flower's SuperLink ships the coordinator's app bundle (a FAB: a zip of the app's code and its
pyproject.toml) to every SuperNode, and the SuperNode's ClientApp runs that code next to the site's
scans. So a site runs only bundles whose SHA-256 its operator approved, one a line in
``approved-apps.txt`` (``neurofed-site approve``); the SuperNode checks every bundle before storing it
(client/approved_supernode.py) and records each accepted and refused one in the site's audit log.

How Flower names a bundle (1.41): its hash is the SHA-256 of the FAB's bytes, computed by ``flwr run`` /
``flwr build`` and again by the SuperLink when the run is submitted. ``flwr build`` is byte-reproducible:
every zip entry gets the fixed date ``FAB_DATE``, files are added in sorted order with their bytes as they
are (no file modes), and pyproject.toml is re-serialised. So one source tree builds to one hash on every
machine with the same Python and zlib, and a site can approve the bundle that its own installed neurofed
builds to (``--installed``) instead of receiving a file. What changes the hash: any byte of an included
file (``*.py``, ``*.toml``, ``*.md``, ``*.json``, ``*.yaml`` ... not ignored by .gitignore), a file
more or less, and a different zlib (e.g. zlib-ng) or ``zipfile`` writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write
from contract.version import CONTRACT_VERSION, VERSION_FILE, bundled_contract_version, contract_mismatch
from models.errors import NeurofedError

APPROVED_APPS_FILE = "approved-apps.txt"
"""The approved bundle hashes, by default in the site's state folder."""
AUDIT_LOG_FILE = "audit.jsonl"
"""The site's audit log (JSON lines, append-only), in its state folder."""
APPROVE_COMMAND = "neurofed-site approve"
ACCEPTED_EVENT = "app-accepted"
REFUSED_EVENT = "app-refused"
FAB_SUFFIX = ".fab"
_FAB_MEMBERS = ("pyproject.toml", ".info/CONTENT")
"""Members every bundle `flwr build` writes has."""
_HASH = re.compile(r"[0-9a-f]{64}")
_HEADER = (
    "# App bundles (Flower FABs) this neurofed site runs: one SHA-256 a line, `#` starts a comment.\n"
    f"# Written by `{APPROVE_COMMAND}`; the site refuses every other bundle (deploy/README.md).\n"
)


# --- the approved hashes -----------------------------------------------------------------------------


def approved_apps_path(state_dir: Path, approved_apps: Path | None = None) -> Path:
    """The approvals file: ``approved_apps`` when given, else ``<state_dir>/approved-apps.txt``."""
    return Path(approved_apps or Path(state_dir) / APPROVED_APPS_FILE).expanduser()


def normalized_hash(text: str, where: str) -> str:
    """``text`` as a lower-case SHA-256 hex digest (an optional ``sha256:`` prefix is dropped)."""
    value = text.strip().lower().removeprefix("sha256:")
    if not _HASH.fullmatch(value):
        raise NeurofedError(
            f"{where}: {text.strip()!r} is not a SHA-256 hash (64 hex digits, e.g. from `sha256sum BUNDLE.fab`)"
        )
    return value


def read_approved(path: Path) -> list[str]:
    """The approved hashes in ``path``, in file order ([] when there is no file).

    Raises:
        NeurofedError: a line that is not a hash, naming the file and line.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise NeurofedError(f"{path}: cannot read the approved app bundles ({exc.strerror})") from exc
    hashes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            value = normalized_hash(entry.split()[0], f"{path} line {number}")
            if value not in hashes:
                hashes.append(value)
    return hashes


def approve(path: Path, fab_hash: str, source: str, *, replace: bool = False) -> list[str]:
    """Add ``fab_hash`` to the approved bundles in ``path`` (``replace``: make it the only one).

    The line names where the hash came from and when; the file is replaced atomically (mode 0644: the
    hashes are no secret, and the site daemon reads them). Returns the approved hashes now.
    """
    path = Path(path).expanduser()
    fab_hash = normalized_hash(fab_hash, "the bundle's hash")
    kept = [] if replace else read_approved(path)
    old_lines = [] if replace or not path.is_file() else path.read_text(encoding="utf-8").splitlines()
    body = [line for line in old_lines if line not in _HEADER.splitlines()]
    if fab_hash not in kept:
        when = datetime.now(UTC).isoformat(timespec="seconds")
        body.append(f"{fab_hash}  # {source}, approved {when}")
    text = _HEADER + "".join(f"{line}\n" for line in body)
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=0o644)
    except OSError as exc:
        raise NeurofedError(
            f"{path}: cannot write the approved app bundles ({exc.strerror}); run the command as the "
            "file's owner (e.g. with sudo), or pass --approved-apps with a file you may write"
        ) from exc
    return read_approved(path)


# --- a bundle's hash ---------------------------------------------------------------------------------


def bundle_file_hash(path: Path) -> str:
    """The SHA-256 of a bundle file (``flwr build`` output), after checking that it is one."""
    path = Path(path).expanduser()
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise NeurofedError(f"BUNDLE {path}: cannot read it ({exc.strerror})") from exc
    try:
        names = set(zipfile.ZipFile(io.BytesIO(content)).namelist())
    except zipfile.BadZipFile:
        names = set()
    missing = [m for m in _FAB_MEMBERS if m not in names]
    if missing:
        raise NeurofedError(
            f"BUNDLE {path}: not a Flower app bundle (no {', '.join(missing)} inside); pass the .fab file "
            "that `flwr build` writes, or use --installed or --hash"
        )
    return hashlib.sha256(content).hexdigest()


def installed_app_dir() -> Path:
    """The source folder of this neurofed installation (its pyproject.toml declares the Flower app)."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise NeurofedError(
            f"--installed: no Flower app beside this neurofed installation ({pyproject} missing); install "
            f"neurofed editable from its source folder (deploy/README.md), or approve a bundle file: "
            f"`{APPROVE_COMMAND} BUNDLE.fab`"
        )
    return root


def hash_to_approve(bundle: Path | None, fab_hash: str | None, installed: bool) -> tuple[str, str]:
    """(hash, where it came from) of what ``neurofed-site approve`` is given: one of the three."""
    if sum((bundle is not None, fab_hash is not None, installed)) != 1:
        raise NeurofedError("approve one bundle: give BUNDLE.fab, --hash SHA256 or --installed")
    if bundle is not None:
        return bundle_file_hash(bundle), f"bundle file {Path(bundle).expanduser().resolve()}"
    if fab_hash is not None:
        return normalized_hash(fab_hash, "--hash"), "hash given with --hash"
    from importlib.metadata import version

    app_dir = installed_app_dir()
    return app_dir_bundle_hash(app_dir), f"neurofed {version('neurofed')} installed from {app_dir}"


def app_dir_bundle_hash(app_dir: Path) -> str:
    """The SHA-256 of the bundle Flower's ``flwr build`` / ``flwr run`` makes of ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()
    except (ValueError, OSError) as exc:
        raise NeurofedError(f"{app_dir}: Flower cannot build an app bundle from it ({exc})") from exc


# --- the check and the audit log ---------------------------------------------------------------------


class BundleRefused(Exception):
    """A bundle the site does not run; ``reason`` is what the coordinator is told."""

    def __init__(self, reason: str, run_id: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_id = run_id


def append_audit_event(path: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event (``time`` in UTC, ``unix``, ``event``, ``fields``) as a JSON line, flushed to disk."""
    now = time.time()
    entry = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "unix": round(now, 3),
        "event": event,
        **fields,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read_audit_events(path: Path) -> list[dict[str, Any]]:
    """Every event of the site's audit log, in order (a torn last line from a crash is skipped)."""
    if not Path(path).is_file():
        return []
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def bundle_contract_version(content: bytes) -> int | None:
    """The contract version a bundle's code speaks (its ``contract/version.py``); None if it declares none."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            text = bundle.read(VERSION_FILE).decode("utf-8", errors="replace")
    except (KeyError, zipfile.BadZipFile):
        return None
    return bundled_contract_version(text)


def refusal_reason(
    content_hash: str, claimed_hashes: set[str], approved: list[str], content: bytes = b""
) -> str | None:
    """Why a bundle must not run (None: it may). ``claimed_hashes``: what the SuperLink says it is.

    An approved bundle must also speak this installation's contract version (contract/version.py).
    """
    wrong = sorted(h for h in claimed_hashes if h and h != content_hash)
    if wrong:
        return (
            f"the app bundle's content hashes to {content_hash}, not to {', '.join(wrong)} as the SuperLink "
            "says; the site runs no bundle whose content does not match its hash"
        )
    if content_hash not in approved:
        return (
            f"app bundle {content_hash} is not approved on this site (approved: "
            f"{', '.join(approved) or 'none'}); the site's operator approves a bundle with `{APPROVE_COMMAND}`"
        )
    mismatch = contract_mismatch(bundle_contract_version(content), CONTRACT_VERSION, "this site")
    if mismatch is not None:
        return f"app bundle {content_hash}: {mismatch}"
    return None


@dataclass(frozen=True)
class AppApproval:
    """The site's check of every bundle before the SuperNode stores it.

    Attributes:
        approved_apps: the file of approved hashes, read again for every new bundle (an approval takes
            effect without a restart; a file that cannot be read refuses everything).
        audit_log: the site's audit log (``app-accepted`` / ``app-refused`` events).
    """

    approved_apps: Path
    audit_log: Path

    def admit(self, run_id: int, claimed_hashes: set[str], content: bytes) -> str:
        """Record and return the bundle's hash when it is approved; raise BundleRefused otherwise."""
        content_hash = hashlib.sha256(content).hexdigest()
        try:
            approved = read_approved(self.approved_apps)
            reason = refusal_reason(content_hash, claimed_hashes, approved, content)
        except NeurofedError as exc:
            approved, reason = [], f"the site cannot read its approved app bundles: {exc}"
        # Flower's 64-bit run ids as strings: JSON readers such as jq round large numbers.
        fields: dict[str, Any] = {"fab_hash": content_hash, "run_id": str(run_id)}
        if reason is None:
            append_audit_event(self.audit_log, ACCEPTED_EVENT, **fields)
            return content_hash
        claimed = sorted(h for h in claimed_hashes if h and h != content_hash)
        append_audit_event(
            self.audit_log,
            REFUSED_EVENT,
            **fields,
            **({"claimed_hash": claimed} if claimed else {}),
            reason=reason,
            approved=approved,
            approved_apps=str(self.approved_apps),
        )
        raise BundleRefused(reason, run_id)
