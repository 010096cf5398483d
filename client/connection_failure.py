"""Why the site's SuperNode could not join, in the site operator's words.

Flower's SuperNode ends with "Failed to initialize the connection to the SuperLink" and a code (e.g.
"[code: 2004] Failed to activate SuperNode"), which reads like a network problem. The coordinator says
no more than that on purpose; what it means, and what to check, is known here: `ConnectionFailureWatch`
keeps Flower's last error lines, and `explain` turns them into what the site's operator should check,
with the fingerprint of the site's key (what the coordinator's operator enrolled).

What Flower 1.41 does (flwr/supernode/fleet_http_connection.py): a key the coordinator does not admit
(never enrolled, revoked, or one whose previous SuperNode is still counted online) is refused with code
2004 and the SuperNode exits at once; a certificate the site cannot verify fails the TLS handshake and it
exits too; a coordinator that does not answer is retried without end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

KEY_REFUSED_CODE = "[code: 2004]"
"""Flower's error code of a SuperNode whose key the coordinator does not activate."""


class ConnectionFailureWatch(logging.Handler):
    """Keeps the text of Flower's error log lines (its exit message among them)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # a log line that cannot be formatted says nothing useful here
            pass

    @property
    def text(self) -> str:
        return "\n".join(self.lines[-20:])


def _option(arguments: Sequence[str], name: str) -> str | None:
    return arguments[arguments.index(name) + 1] if name in arguments[:-1] else None


def explain(flower_text: str, supernode_arguments: Sequence[str]) -> str | None:
    """What a failed connection means for this site and what to check; None when the text is none of the
    failures explained here."""
    from client.site_keys import key_fingerprint

    coordinator = _option(supernode_arguments, "--superlink") or "the coordinator"
    ca = _option(supernode_arguments, "--root-certificates") or "--ca"
    key = _option(supernode_arguments, "--auth-supernode-private-key")
    fingerprint = key_fingerprint(Path(key)) if key else "?"
    lowered = flower_text.lower()
    if KEY_REFUSED_CODE in flower_text or "failed to activate supernode" in lowered:
        return (
            f"the coordinator at {coordinator} refused this site's key ({fingerprint}, "
            f"{key or 'its private key'}). Either it is not enrolled (the coordinator's operator enrolls "
            "this site's site.pub and checks this fingerprint with `ssh-keygen -lf`), or it was revoked "
            "(`neurofed coordinator sites` lists it as revoked: make a new key pair with `neurofed-site "
            "keygen` and have it enrolled), or a SuperNode with this key is still connected (another daemon "
            "with the same key, or this one restarted less than a minute ago: start again in a minute). "
            "This is not a network problem: retrying does not help until one of these is fixed"
        )
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        mismatch = "hostname mismatch" in lowered or "doesn't match" in lowered or "not valid for" in lowered
        which = (
            f"the host in {coordinator} is not a name in the coordinator's certificate: dial a name it "
            "carries (`openssl x509 -in server.crt -noout -ext subjectAltName` at the coordinator), or have "
            "the certificate renewed with this name"
            if mismatch
            else f"{ca} is not the CA that signed the coordinator's certificate: check its fingerprint "
            f"(`openssl x509 -in {ca} -noout -fingerprint -sha256`) with the coordinator's operator; or the "
            "host you dial is not a name in that certificate"
        )
        return f"this site does not trust the certificate of {coordinator}: {which}"
    return None
