"""`neurofed coordinator start`: run Flower's SuperLink as the federation's coordinator.

The SuperLink serves its Fleet API (the sites' SuperNodes), Control API (`neurofed run`, enrolment) and
Runtime API on one TLS port, with SuperNode authentication on: only SuperNodes whose public key was
enrolled (`neurofed coordinator enroll`) may join. Runtime installation of app dependencies is off (the
coordinator runs the neurofed installed beside it, offline), Flower's telemetry is off unless asked
for, and everything it keeps is in the state directory (server/coordinator_state.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.key_files import others_may_read
from models.errors import NeurofedError
from server.coordinator_state import STATE_DIR_ENV, Connection, CoordinatorState
from server.flower_control import flower_environment, flower_executable

# Loopback by default: Flower 1.41 serves its unauthenticated Control API (enrolment, runs, results) on the
# same port as the sites' Fleet API, so only a proxy that passes /v1/fleet/ (deploy/nginx) may face sites.
DEFAULT_ADDRESS = "127.0.0.1:9091"


@dataclass(frozen=True)
class TlsFiles:
    """The coordinator's TLS material (PEM files).

    Attributes:
        ca_cert: the federation's CA certificate (sites verify the coordinator with it).
        cert: the coordinator's certificate, signed by the CA, naming the host(s) sites connect to.
        key: the coordinator's private key for ``cert``.
    """

    ca_cert: Path
    cert: Path
    key: Path


def split_address(address: str, option: str = "--address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); NeurofedError naming ``option`` if malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NeurofedError(
            f"{option} {address!r}: expected HOST:PORT, e.g. 0.0.0.0:9092 or coordinator.example.org:9092"
        )
    return host, int(port)


def check_tls_files(tls: TlsFiles) -> None:
    """Check that the three files exist, parse, belong together and are in date, and that the key is readable
    by its owner only (like a site's key); NeurofedError if not."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    def read(path: Path, option: str) -> bytes:
        if not path.is_file():
            raise NeurofedError(
                f"{option} {path}: file not found; make the certificates with deploy/make-certs.sh"
            )
        try:
            return path.read_bytes()
        except OSError as exc:
            raise NeurofedError(
                f"{option} {path}: cannot be read ({exc.strerror}); check its permissions"
            ) from exc

    def certificate(path: Path, option: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(read(path, option))
        except ValueError as exc:
            raise NeurofedError(
                f"{option} {path}: not a PEM certificate ({exc}); pass the .crt/.pem file"
            ) from exc

    ca = certificate(tls.ca_cert, "--ca-cert")
    cert = certificate(tls.cert, "--cert")
    if tls.key.is_file() and (exposed := others_may_read(tls.key)) is not None:
        raise NeurofedError(f"--key {tls.key}: {exposed}")
    try:
        key = serialization.load_pem_private_key(read(tls.key, "--key"), password=None)
    except (ValueError, TypeError) as exc:
        raise NeurofedError(
            f"--key {tls.key}: not an unencrypted PEM private key ({exc}); pass the coordinator's .key file"
        ) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, public) != cert.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise NeurofedError(
            f"--key {tls.key} is not the private key of --cert {tls.cert}; pass the matching pair"
        )
    try:
        cert.verify_directly_issued_by(ca)
        signed = True
    except (ValueError, TypeError, InvalidSignature):
        signed = False
    if not signed:
        raise NeurofedError(
            f"--cert {tls.cert} was not issued by --ca-cert {tls.ca_cert} (issuer {cert.issuer.rfc4514_string()!r}, "
            "signature does not verify with that CA's key); sites could not verify it: pass the CA that signed it"
        )
    now = datetime.datetime.now(datetime.UTC)
    for path, option, c in ((tls.ca_cert, "--ca-cert", ca), (tls.cert, "--cert", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise NeurofedError(
                f"{option} {path} is valid from {c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d}, "
                "not now; issue a new certificate (deploy/README.md: rotate a certificate)"
            )


def superlink_command(address: str, state: CoordinatorState, tls: TlsFiles) -> list[str]:
    """The ``flower-superlink`` command line of the coordinator."""
    host, port = split_address(address)
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.cert),
        "--ssl-keyfile",
        str(tls.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        str(state.database_path),
        "--host",
        host,
        "--port",
        str(port),
    ]


def admin_address(address: str) -> str:
    """Where commands on this machine reach a coordinator listening on ``address`` (all interfaces: localhost)."""
    host, port = split_address(address)
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_coordinator(
    state_dir: Path, tls: TlsFiles, address: str = DEFAULT_ADDRESS, telemetry: bool = False
) -> None:
    """Check the TLS files, prepare the state directory, then become the SuperLink (never returns).

    The process is replaced by ``flower-superlink`` (``exec``), so a service manager's stop signal reaches
    the SuperLink itself.
    """
    split_address(address)
    tls = TlsFiles(*(p.expanduser().resolve() for p in (tls.ca_cert, tls.cert, tls.key)))
    check_tls_files(tls)
    state = CoordinatorState(state_dir.expanduser().resolve())
    try:
        state.create()
    except OSError as exc:
        raise NeurofedError(
            f"--state-dir {state_dir}: cannot create it ({exc.strerror}); choose a writable folder"
        ) from exc
    state.write_connection(Connection(admin_address(address), tls.ca_cert))
    env = flower_environment(state.flwr_home, telemetry=telemetry)
    env[STATE_DIR_ENV] = str(state.root)
    command = superlink_command(address, state, tls)
    print(
        f"neurofed coordinator: SuperLink on {address} (TLS, SuperNode authentication), state in {state.root}",
        flush=True,
    )
    os.chdir(state.root)
    os.execve(command[0], command, env)
