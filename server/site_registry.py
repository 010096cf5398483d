"""Which sites may join the federation: enrol, list and revoke them by name.

Flower decides who may connect: with SuperNode authentication on, the SuperLink accepts only SuperNodes
whose public key was registered through its Control API (`flwr supernode register`), and each gets a
node id. `SiteRegistry` calls that mechanism and keeps the name <-> public key <-> node id mapping in
``<state-dir>/sites.json``, so operators work with hospital names and the audit log can name sites. A
revoked site stays there, marked with the time of its revocation. Enrolments and revocations are also
written to the audit log (node ids as strings: JSON readers such as jq round 64-bit numbers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write
from models.errors import NeurofedError
from server.audit_log import AuditLog
from server.coordinator_state import Connection, CoordinatorState
from server.flower_control import CONNECTION_NAME, FlowerControl

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class EnrolledSite:
    """A site allowed to join: its name, its Flower node id and SuperNode public key (OpenSSH text)."""

    name: str
    node_id: int
    public_key: str
    enrolled_at: str
    status: str = "unknown"
    """Flower's view: ``registered`` (never connected), ``online``, ``offline``; ``unknown`` if not asked;
    ``revoked`` for a site revoked with `SiteRegistry.revoke` (kept in the list, never readmitted)."""
    revoked_at: str | None = None


class SiteRegistry:
    """The enrolled sites of one coordinator (its state directory and running SuperLink)."""

    def __init__(self, state: CoordinatorState, connection: Connection | None = None) -> None:
        self.state = state
        self._connection = connection

    @property
    def connection(self) -> Connection:
        return self._connection or self.state.read_connection()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.state.registry_path.is_file():
            return {}
        try:
            return json.loads(self.state.registry_path.read_text())
        except json.JSONDecodeError as exc:
            raise NeurofedError(
                f"{self.state.registry_path} is not valid JSON ({exc}); restore it from a backup"
            ) from exc

    def _write(self, sites: dict[str, dict[str, Any]]) -> None:
        text = json.dumps(sites, indent=2, sort_keys=True)
        atomic_write(self.state.registry_path, lambda tmp: tmp.write_text(text))

    def names_by_node_id(self) -> dict[int, str]:
        """Node id -> enrolled name of every site not revoked, from the local registry only (no call to the
        SuperLink): the nodes a run admits (server/site_admission.py)."""
        return {int(v["node_id"]): name for name, v in self._read().items() if not v.get("revoked_at")}

    def revocation(self, node_id: int) -> str | None:
        """``"revoked by the coordinator's operator at TIME"`` for a revoked site's node, else None."""
        for name, entry in self._read().items():
            if int(entry["node_id"]) == node_id and entry.get("revoked_at"):
                return f"{name} was revoked by the coordinator's operator at {entry['revoked_at']}"
        return None

    def enroll(self, public_key_file: Path, name: str) -> EnrolledSite:
        """Register the site's SuperNode public key with the SuperLink under ``name``."""
        if not _NAME_RE.fullmatch(name):
            raise NeurofedError(
                f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (e.g. hospital-a)"
            )
        sites = self._read()
        if name in sites and not sites[name].get("revoked_at"):
            raise NeurofedError(
                f"a site named {name!r} is already enrolled (node {sites[name]['node_id']}); revoke it first "
                "or choose another name"
            )
        public_key = _read_public_key(public_key_file)
        for other, entry in sites.items():
            if entry["public_key"] == public_key:
                if entry.get("revoked_at"):
                    raise NeurofedError(
                        f"{public_key_file}: this key was revoked (site {other!r}, {entry['revoked_at']}) and is "
                        "never admitted again; the site makes a new key pair (`neurofed-site keygen`)"
                    )
                raise NeurofedError(f"{public_key_file}: this key is already enrolled as {other!r}")
        with FlowerControl(self.connection) as control:
            answer = control.call_json(
                [
                    "supernode",
                    "register",
                    str(public_key_file.expanduser().resolve()),
                    CONNECTION_NAME,
                    "--name",
                    name,
                ],
                f"enrolling {name!r}",
            )
        site = EnrolledSite(
            name, int(answer["node-id"]), public_key, datetime.now(UTC).isoformat(timespec="seconds")
        )
        if name in sites:  # a revoked site comes back with a new key: its old entry stays, renamed
            old = sites.pop(name)
            sites[f"{name} (revoked {old['revoked_at']})"] = old
        sites[name] = {
            "node_id": site.node_id,
            "public_key": site.public_key,
            "enrolled_at": site.enrolled_at,
        }
        self._write(sites)
        AuditLog(self.state.audit_path).record("site-enrolled", site=name, node_id=str(site.node_id))
        return site

    def sites(self) -> list[EnrolledSite]:
        """Every enrolled site with Flower's current status of its SuperNode, and every revoked one, by name."""
        sites = self._read()
        status = node_statuses(self.connection)
        return [
            EnrolledSite(
                name,
                int(v["node_id"]),
                v["public_key"],
                v["enrolled_at"],
                "revoked" if v.get("revoked_at") else status.get(int(v["node_id"]), "not registered"),
                v.get("revoked_at"),
            )
            for name, v in sorted(sites.items())
        ]

    def revoke(self, name: str) -> EnrolledSite:
        """Unregister the site's SuperNode at the SuperLink (it can no longer connect) and forget it."""
        sites = self._read()
        if name not in sites or sites[name].get("revoked_at"):
            known = ", ".join(sorted(n for n, v in sites.items() if not v.get("revoked_at"))) or "none"
            what = "was already revoked" if name in sites else "is enrolled"
            raise NeurofedError(
                f"no site named {name!r} {what} (enrolled: {known}); see `neurofed coordinator sites`"
            )
        entry = sites[name]
        with FlowerControl(self.connection) as control:
            control.call_json(
                ["supernode", "unregister", str(entry["node_id"]), CONNECTION_NAME], f"revoking {name!r}"
            )
        # Kept, marked revoked: `sites` lists it, the audit log can name it, its key is never enrolled again.
        entry["revoked_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(sites)
        AuditLog(self.state.audit_path).record("site-revoked", site=name, node_id=str(entry["node_id"]))
        return EnrolledSite(
            name,
            int(entry["node_id"]),
            entry["public_key"],
            entry["enrolled_at"],
            "revoked",
            entry["revoked_at"],
        )


def node_statuses(connection: Connection) -> dict[int, str]:
    """Flower's status of every SuperNode the coordinator knows (``registered``, ``online``, ``offline``)."""
    with FlowerControl(connection) as control:
        answer = control.call_json(["supernode", "list", CONNECTION_NAME], "listing the sites")
    return {int(n["node-id"]): str(n.get("status", "unknown")) for n in answer.get("nodes", [])}


def _read_public_key(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = path.expanduser()
    if not path.is_file():
        raise NeurofedError(
            f"SITE_PUBKEY {path}: file not found; the site makes it with `neurofed-site keygen`"
        )
    text = path.read_text(errors="replace").strip()
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise NeurofedError(
            f"SITE_PUBKEY {path}: not an OpenSSH public key ({exc}); pass the site's *.pub file from "
            "`neurofed-site keygen`, never its private key"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise NeurofedError(
            f"SITE_PUBKEY {path}: Flower needs an EC (NIST curve) key; make one with `neurofed-site keygen`"
        )
    return text
