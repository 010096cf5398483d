"""The deployment kit in deploy/: certificates, systemd units, Fleet-only proxy, Docker files, operator guide.

The certificate script runs for real (openssl) and its output is checked with `cryptography`. Units,
proxy, Dockerfile and compose file cannot run here: they are linted (with systemd-analyze, nginx and
docker compose where installed), and every command they and the operator guide show is parsed by the
real `neurofed` / `neurofed-site` argument parsers, so a renamed flag fails here and not at a hospital.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MAKE_CERTS = DEPLOY / "make-certs.sh"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
INSTALLED_BIN = "/opt/neurofed/venv/bin/"
"""Where the units expect the installed project's commands (deploy/README.md)."""
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


# --- make-certs.sh -------------------------------------------------------------------------------------


def make_certs(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MAKE_CERTS), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def subject_alt_names(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    return set(dns) | set(ips)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA and coordinator certificate for two host names and an address, as a first run makes them."""
    out = tmp_path_factory.mktemp("deploy") / "certs"
    done = make_certs(out, "coordinator.example.org", "coordinator", "10.1.2.3")
    assert done.returncode == 0, done.stderr
    return out


def test_server_certificate_chains_to_the_ca(certs: Path) -> None:
    ca, server = load_certificate(certs / "ca.crt"), load_certificate(certs / "server.crt")
    server.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.crt"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_server_certificate_names_the_hosts_asked_for_and_loopback(certs: Path) -> None:
    names = subject_alt_names(load_certificate(certs / "server.crt"))
    assert names == {"coordinator.example.org", "coordinator", "10.1.2.3"} | LOOPBACK
    san = load_certificate(certs / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert ipaddress.ip_address("10.1.2.3") in san.value.get_values_for_type(x509.IPAddress)


def test_without_hosts_the_certificate_names_loopback_only(tmp_path: Path) -> None:
    assert make_certs(tmp_path / "c").returncode == 0
    assert subject_alt_names(load_certificate(tmp_path / "c" / "server.crt")) == LOOPBACK


def test_private_keys_are_readable_by_their_owner_only(certs: Path) -> None:
    for key in ("ca.key", "server.key"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600, key
    for cert in ("ca.crt", "server.crt"):
        assert (certs / cert).stat().st_mode & 0o022 == 0, f"{cert} is writable by others"
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]


def test_a_second_run_refuses_to_replace_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert make_certs(out, "a.example.org").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = make_certs(out, "b.example.org")
    assert again.returncode != 0
    assert str(out / "ca.key") in again.stderr and "--renew-server" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_renew_server_keeps_the_ca_and_the_previous_certificate(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert make_certs(out, "old.example.org").returncode == 0
    ca_key, ca_crt = (out / "ca.key").read_bytes(), (out / "ca.crt").read_bytes()
    old_crt, old_key = (out / "server.crt").read_bytes(), (out / "server.key").read_bytes()
    renewed = make_certs("--renew-server", out, "new.example.org")
    assert renewed.returncode == 0, renewed.stderr
    assert (out / "ca.key").read_bytes() == ca_key and (out / "ca.crt").read_bytes() == ca_crt
    assert (out / "server.key").read_bytes() != old_key
    server = load_certificate(out / "server.crt")
    server.verify_directly_issued_by(load_certificate(out / "ca.crt"))
    assert subject_alt_names(server) == {"new.example.org"} | LOOPBACK
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    kept = {p.read_bytes() for p in out.glob("server.crt.*")} | {
        p.read_bytes() for p in out.glob("server.key.*")
    }
    assert kept == {old_crt, old_key}


def test_renew_server_without_a_ca_names_what_is_missing(tmp_path: Path) -> None:
    renewed = make_certs("--renew-server", tmp_path, "a.example.org")
    assert renewed.returncode != 0
    assert str(tmp_path / "ca.key") in renewed.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_host_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    done = make_certs(tmp_path / "certs", "not a host")
    assert done.returncode != 0 and "'not a host'" in done.stderr
    assert not (tmp_path / "certs").exists()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_site_key_is_a_supernode_authentication_key(tmp_path: Path) -> None:
    done = make_certs("--site-key", tmp_path, "hospital-a")
    assert done.returncode == 0, done.stderr
    private_key = load_ssh_private_key((tmp_path / "hospital-a.key").read_bytes(), password=None)
    public_key = load_ssh_public_key((tmp_path / "hospital-a.pub").read_bytes())
    # Flower's SuperNode authentication reads OpenSSH keys on a NIST curve.
    assert isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == "secp384r1"
    assert private_key.public_key().public_numbers() == public_key.public_numbers()
    assert (tmp_path / "hospital-a.key").stat().st_mode & 0o777 == 0o600
    again = make_certs("--site-key", tmp_path, "hospital-a")
    assert again.returncode != 0 and str(tmp_path / "hospital-a.key") in again.stderr


def test_script_is_strict_and_passes_shellcheck() -> None:
    text = MAKE_CERTS.read_text()
    assert "set -euo pipefail" in text
    assert os.access(MAKE_CERTS, os.X_OK), "deploy/make-certs.sh must be executable"
    assert make_certs("--help").returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (the strict-mode and --help checks above passed)")
    lint = subprocess.run(["shellcheck", str(MAKE_CERTS)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


# --- the CLIs' parsers -------------------------------------------------------------------------------


def assert_cli_accepts(argv: list[str], where: str) -> None:
    """``argv`` (program name first) parses with the installed CLI's argparse parser; nothing is run."""
    from client.cli import build_parser as site_parser
    from study.cli import build_parser as coordinator_parser

    parsers = {"neurofed": coordinator_parser, "neurofed-site": site_parser}
    program = Path(argv[0]).name
    assert program in parsers, f"{where} runs {argv[0]!r}, not a neurofed command"
    errors = io.StringIO()
    exit_code = None
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parsers[program]().parse_args(argv[1:])
    except SystemExit as exc:
        exit_code = exc.code
    if exit_code not in (None, 0):  # 0: --help
        pytest.fail(
            f"{where}: `{shlex.join(argv)}` is rejected by the CLI (exit {exit_code}):\n{errors.getvalue()}"
        )


# --- systemd units -----------------------------------------------------------------------------------

UNITS = {
    "neurofed-coordinator.service": "coordinator.env",
    "neurofed-site.service": "site.env",
    "neurofed-site-worker.service": "site.env",
}


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (systemd allows repeated keys)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in section if k == key]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=value"
            pairs[key.strip()] = value.strip()
    return pairs


def expand_exec_line(line: str, env: dict[str, str], unit: str) -> list[str]:
    """An Exec*= command line as systemd expands it: ``$VAR`` alone splits into words, ``${VAR}`` is one."""
    line = line.replace("%d", f"/run/credentials/{unit}")
    argv: list[str] = []
    for word in shlex.split(line):
        alone = re.fullmatch(r"\$(\w+)", word)
        if alone:
            argv.extend(env[alone.group(1)].split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_hardened_as_a_dedicated_user(unit: str) -> None:
    sections = read_unit(SYSTEMD / unit)
    service = sections["Service"]
    assert values(service, "User") and values(service, "User")[0] not in ("root", "0")
    assert values(service, "Restart") == ["on-failure"]
    for key, wanted in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
    }.items():
        assert values(service, key) == [wanted], f"{unit}: {key}={wanted} missing"
    environment = values(service, "Environment")
    assert "FLWR_TELEMETRY_ENABLED=0" in environment
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in environment
    assert values(sections["Install"], "WantedBy") == ["multi-user.target"]
    assert "network-online.target" in " ".join(values(sections["Unit"], "After"))


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_may_write_the_state_dir_of_its_example_env_file(unit: str) -> None:
    service = read_unit(SYSTEMD / unit)["Service"]
    env_files = values(service, "EnvironmentFile")
    assert len(env_files) == 1 and Path(env_files[0]).name == UNITS[unit]
    env = read_env_file(SYSTEMD / UNITS[unit])
    writable = " ".join(values(service, "ReadWritePaths")).split()
    assert env["NEUROFED_STATE_DIR"] in writable
    state_directories = ["/var/lib/" + name for name in values(service, "StateDirectory")]
    assert env["NEUROFED_STATE_DIR"] in state_directories  # created with the service user as owner


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_commands_parse_with_the_cli(unit: str) -> None:
    service = read_unit(SYSTEMD / unit)["Service"]
    env = read_env_file(SYSTEMD / UNITS[unit])
    commands = values(service, "ExecStartPre") + values(service, "ExecStart")
    assert values(service, "ExecStart"), f"{unit} has no ExecStart"
    credentials = {value.split(":", 1)[0] for value in values(service, "LoadCredential")}
    for line in commands:
        for name in re.findall(r"\$\{?(\w+)\}?", line):
            assert name in env, f"{unit} uses ${name}, which {UNITS[unit]} does not set"
        for name in re.findall(r"%d/([\w.-]+)", line):
            assert name in credentials, (
                f"{unit} reads credential {name} but loads no LoadCredential={name}:..."
            )
        argv = expand_exec_line(line, env, unit)
        assert argv[0].startswith(INSTALLED_BIN), f"{unit}: {argv[0]} is not under {INSTALLED_BIN}"
        assert_cli_accepts(argv, f"{unit} ({line.split()[1]} ...)")


def test_site_unit_runs_only_bundles_approved_in_a_file_it_cannot_write() -> None:
    service = read_unit(SYSTEMD / "neurofed-site.service")["Service"]
    env = read_env_file(SYSTEMD / "site.env")
    (line,) = values(service, "ExecStart")
    argv = expand_exec_line(line, env, "neurofed-site.service")
    approved = Path(argv[argv.index("--approved-apps") + 1])
    writable = " ".join(values(service, "ReadWritePaths")).split()
    writable += ["/var/lib/" + name for name in values(service, "StateDirectory")]
    assert not any(approved.is_relative_to(w) for w in writable), f"the service may write {approved}"
    assert values(service, "ProtectSystem") == ["strict"]  # so /etc is read-only to it
    documented = [line for line in readme_command_lines() if " approve --installed " in line]
    assert any(str(approved) in line for line in documented), (
        "deploy/README.md: approve into NEUROFED_APPROVED_APPS"
    )


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verify_finds_nothing(unit: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # verify insists that the commands exist: point them at stand-ins in place of the installed project.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("neurofed", "neurofed-site"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace(INSTALLED_BIN, f"{bin_dir}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in done.stderr.splitlines() if unit in line]
    assert done.returncode == 0 and not complaints, done.stderr


# --- the fleet-only proxy ----------------------------------------------------------------------------

FLEET_PROXY_CONF = DEPLOY / "nginx" / "neurofed-fleet.conf"


def fleet_proxy_locations() -> dict[str, str]:
    """``location`` match (a prefix, or ``~ REGEX``) -> the block's body (nested blocks included), from
    deploy/nginx/neurofed-fleet.conf."""
    text = re.sub(r"#.*", "", FLEET_PROXY_CONF.read_text())
    return dict(re.findall(r"location\s+((?:~\s+)?\S+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text))


def fleet_proxy_ports() -> tuple[int, int]:
    """(the port the proxy listens on, the SuperLink's loopback port it passes requests to)."""
    text = re.sub(r"#.*", "", FLEET_PROXY_CONF.read_text())
    listens = set(re.findall(r"listen\s+(?:\S+:)?(\d+)\s+ssl", text))
    assert len(listens) == 1, f"{FLEET_PROXY_CONF.name}: one TLS port expected, got {listens}"
    upstreams = set(re.findall(r"proxy_pass\s+https://127\.0\.0\.1:(\d+)\s*;", text))
    assert len(upstreams) == 1, f"{FLEET_PROXY_CONF.name}: one https://127.0.0.1 upstream expected"
    return int(listens.pop()), int(upstreams.pop())


def test_fleet_proxy_passes_on_only_the_fleet_api() -> None:
    locations = fleet_proxy_locations()
    proxied = [match for match, body in locations.items() if "proxy_pass" in body]
    # One location, a regular expression allow-listing Fleet calls (tests/test_deployment_hardening.py).
    assert len(proxied) == 1 and proxied[0].startswith("~ ^/v1/fleet/(") and proxied[0].endswith(")$")
    assert re.search(r"return\s+404\s*;", locations["/"]), "everything else must be refused"
    fleet = locations[proxied[0]]
    assert re.search(r"proxy_ssl_verify\s+on\s*;", fleet), (
        "the hop to the SuperLink must verify its certificate"
    )
    assert "proxy_ssl_trusted_certificate /etc/neurofed/certs/ca.crt;" in fleet


def test_coordinator_env_listens_where_the_proxy_forwards() -> None:
    listen_port, upstream = fleet_proxy_ports()
    env = read_env_file(SYSTEMD / "coordinator.env")
    assert env["NEUROFED_ADDRESS"] == f"127.0.0.1:{upstream}"
    assert listen_port != upstream
    assert env["NEUROFED_CA_CERT"] == "/etc/neurofed/certs/ca.crt"


TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
"""nginx's spool folders, which a test run keeps in tmp_path rather than the packaged /var/lib/nginx."""


def test_nginx_accepts_the_fleet_proxy(tmp_path: Path, certs: Path) -> None:
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx not installed")
    # The packaged paths and ports, moved into tmp_path so that the check needs no root.
    server = FLEET_PROXY_CONF.read_text().replace("/etc/neurofed/certs/", f"{certs}/")
    (tmp_path / "fleet.conf").write_text(server)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        "http {\n  access_log off;\n"
        + "".join(f"  {kind}_temp_path {tmp_path}/{kind};\n" for kind in TEMP_PATHS)
        + f"  include {tmp_path}/fleet.conf;\n}}\n"
    )
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --- Dockerfile and compose file -----------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Build stage name -> the instructions of that stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        start = re.fullmatch(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, flags=re.IGNORECASE)
        if start:
            current = stages.setdefault(start.group(2), [line])
        else:
            current.append(line)
    return stages


def stage_entrypoint(stages: dict[str, list[str]], stage: str) -> list[str]:
    entrypoints = [line.split(None, 1)[1] for line in stages[stage] if line.startswith("ENTRYPOINT")]
    assert entrypoints, f"Dockerfile stage {stage} has no ENTRYPOINT"
    return json.loads(entrypoints[-1])


def test_dockerfile_installs_pinned_cpu_torch_and_runs_unprivileged() -> None:
    stages = dockerfile_stages()
    base = stages["base"]
    assert base[0].split()[1] == "python:3.11-slim"
    makefile_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert f"ARG TORCH_SPEC={makefile_spec.group(1)}" in base
    assert any(line.startswith("ARG TORCH_INDEX_URL=") and "/whl/cpu" in line for line in base)
    users = [line.split()[1] for line in base if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    environment = " ".join(line for line in base if line.startswith("ENV "))
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in environment
    assert "FLWR_TELEMETRY_ENABLED=0" in environment
    assert {"coordinator", "site"} <= set(stages)
    for stage in ("coordinator", "site"):
        assert stages[stage][0].split()[1] == "base"


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set()
    for line in dockerfile_stages()["base"]:
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            copied.update(sources)
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"
    assert packages <= copied and "pyproject.toml" in copied


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with its default, and ``${VAR:?message}`` with a stand-in path."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"/host/{m.group(1).lower()}", value)


def service_argv(service: dict, stages: dict[str, list[str]]) -> list[str]:
    entrypoint = service.get("entrypoint") or stage_entrypoint(stages, service["build"]["target"])
    command = service.get("command") or []
    return [interpolate(str(word)) for word in [*entrypoint, *command]]


def neurofed_services(compose: dict) -> dict[str, dict]:
    """The compose services built from deploy/docker/Dockerfile (the others run third-party images)."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def test_compose_commands_parse_with_the_cli(compose: dict) -> None:
    stages = dockerfile_stages()
    programs = set()
    for name, service in neurofed_services(compose).items():
        assert service["build"]["target"] in stages, f"service {name} builds a stage the Dockerfile lacks"
        argv = service_argv(service, stages)
        programs.add(tuple(argv[:2]))
        assert_cli_accepts(argv, f"compose service {name}")
    assert ("neurofed", "coordinator") in programs and ("neurofed-site", "start") in programs
    others = {name: s for name, s in compose["services"].items() if name not in neurofed_services(compose)}
    for name, service in others.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), (
            f"service {name}: pin its image to a version, not {image!r}"
        )


def test_compose_publishes_only_the_fleet_api(compose: dict) -> None:
    """Sites reach the proxy's port; the SuperLink (with its Control API) listens on loopback only."""
    stages = dockerfile_stages()
    services = compose["services"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert {name for name, ports in published.items() if ports} == {"coordinator"}
    proxy = next(s for s in services.values() if s.get("network_mode") == "service:coordinator")
    conf_mount = next(m for m in proxy["volumes"] if m.split(":")[1].startswith("/etc/nginx/"))
    assert (DOCKER / conf_mount.split(":")[0]).resolve() == FLEET_PROXY_CONF
    listen_port, upstream = fleet_proxy_ports()
    assert [interpolate(str(p)).rsplit(":", 1)[1] for p in published["coordinator"]] == [str(listen_port)]
    argv = service_argv(services["coordinator"], stages)
    host, port = argv[argv.index("--address") + 1].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == upstream
    sites = [
        s
        for s in services.values()
        if "build" in s and service_argv(s, stages)[:2] == ["neurofed-site", "start"]
    ]
    assert len(sites) >= 2
    for site in sites:
        argv = service_argv(site, stages)
        assert argv[argv.index("--coordinator") + 1].endswith(f":{listen_port}")


def test_compose_mounts_secrets_and_data_read_only_and_state_in_volumes(compose: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target, *options = interpolate(mount).split(":")
            assert "ca.key" not in source, f"{name} mounts the CA's private key"
            if source.startswith(("/", ".")):
                assert options == ["ro"], f"{name}: bind mount {mount} must be read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                assert target.startswith(("/var/lib/neurofed", "/var/cache/neurofed")), mount


def test_compose_paths_in_commands_are_mounted(compose: dict) -> None:
    stages = dockerfile_stages()
    for name, service in neurofed_services(compose).items():
        targets = [interpolate(m).split(":")[1] for m in service.get("volumes", [])]
        for word in service_argv(service, stages):
            if word.startswith("/"):
                assert any(word == t or word.startswith(t.rstrip("/") + "/") for t in targets), (
                    f"compose service {name} uses {word}, which none of its volumes provides"
                )


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_each_compose_site_forwards_to_its_own_worker_with_the_same_site_options(compose: dict) -> None:
    """A site's SuperNode (``--worker external``) and its worker service share the socket's volume, the
    worker runs with the site's own options (the ones it enforces), and the SuperNode waits for it."""
    stages = dockerfile_stages()
    argvs = {name: service_argv(s, stages) for name, s in neurofed_services(compose).items()}
    sites = {name: argv for name, argv in argvs.items() if argv[:2] == ["neurofed-site", "start"]}
    workers = {name: argv for name, argv in argvs.items() if argv[:2] == ["neurofed-site", "worker"]}
    assert sites and len(workers) == len(sites)
    for name, argv in sites.items():
        assert _option(argv, "--worker") == "external", name
        worker_name = f"{name}-worker"
        worker, service = workers[worker_name], compose["services"][name]
        for option in ("--data", "--site-id", "--budget", "--delta", "--state-dir", "--worker-dir", "--role"):
            assert _option(worker, option) == _option(argv, option), (name, option)
        folder = _option(argv, "--worker-dir")
        mounts = [set(compose["services"][n]["volumes"]) for n in (name, worker_name)]
        shared = {m for m in mounts[0] & mounts[1] if m.split(":")[1] == folder}
        assert shared, f"{name} and {worker_name} share no volume at {folder}"
        assert service["depends_on"][worker_name] == {"condition": "service_healthy"}
        assert folder + "/worker.sock" in compose["services"][worker_name]["healthcheck"]["test"]


def test_every_named_volume_of_a_neurofed_service_is_a_folder_the_image_gives_its_user(compose: dict) -> None:
    """Docker fills a new named volume from the image's folder, owner included: one the image lacks would
    be root's, and the unprivileged user could not write its ledger or socket there."""
    made = set()
    for line in (DOCKER / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        words = line.split()
        if "install" in words and "-d" in words and "neurofed" in words:
            made.update(w for w in words if w.startswith("/var/lib/neurofed/"))
    for name, service in neurofed_services(compose).items():
        for mount in service.get("volumes", []):
            source, target, *_ = interpolate(mount).split(":")
            if not source.startswith(("/", ".")):
                assert target in made, f"{name}: the image does not make {target} for its user"


def test_compose_sites_are_approved_in_their_state_volume(compose: dict) -> None:
    """The README's `docker compose run ... approve` writes where the site's `start` reads its approvals."""
    stages = dockerfile_stages()
    documented = {}
    for line in readme_command_lines():
        if not line.startswith("docker compose run ") or " approve " not in line:
            continue
        words = shlex.split(line, comments=True)
        if "--entrypoint" in words:
            service = words[words.index("--entrypoint") + 2]
            documented[service] = words[words.index("--state-dir") + 1]
    sites = {
        name: service_argv(service, stages)
        for name, service in neurofed_services(compose).items()
        if service_argv(service, stages)[:2] == ["neurofed-site", "start"]
    }
    assert documented, "deploy/README.md shows no `docker compose run ... approve` for a site"
    for name, state_dir in documented.items():
        argv = sites[name]
        assert "--approved-apps" not in argv and argv[argv.index("--state-dir") + 1] == state_dir, name


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    env = os.environ | {f"HOSPITAL_{x}_DATA": str(tmp_path) for x in "ABC"}
    done = subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --- the operator guide --------------------------------------------------------------------------------


def readme_command_lines() -> list[str]:
    """Shell lines of deploy/README.md's code blocks (continuation lines joined)."""
    blocks = re.findall(
        r"^ *```\n(.*?)^ *```", (DEPLOY / "README.md").read_text(), flags=re.MULTILINE | re.DOTALL
    )
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_commands_parse_with_the_cli() -> None:
    documented = set()
    for line in readme_command_lines():
        if not re.search(r"(^|\s)(\S*/bin/)?neurofed(-site)?\s", line):
            continue
        # The rehearsal's commands name free ports by variable (deploy/rehearse.sh): any port number will do.
        words = shlex.split(re.sub(r"\$[A-Z_]*PORT[A-Z_]*", "9094", line), comments=True)
        # A program word: not a user name (`sudo -u neurofed`, `useradd ... neurofed`) nor a folder.
        starts = [
            i
            for i, w in enumerate(words[:-1])
            if re.fullmatch(r"(\S*/bin/)?neurofed(-site)?", w) and words[i - 1] not in ("-u", "--user")
        ]
        if not starts:
            continue
        argv = words[starts[0] :]
        if words[starts[0] - 1] == "--entrypoint":  # docker compose run --entrypoint PROGRAM SERVICE ARGS
            argv = [argv[0], *argv[2:]]
        for i, word in enumerate(argv):
            if word in ("|", "&&", "||", ";", "&", ">", "<") or re.match(r"\d?>", word):  # redirections
                argv = argv[:i]
                break
        assert_cli_accepts(argv, "deploy/README.md")
        program = Path(argv[0]).name
        documented.add(" ".join([program, *argv[1:3]] if argv[1] == "coordinator" else [program, argv[1]]))
    tasks = {"neurofed coordinator enroll", "neurofed coordinator sites", "neurofed coordinator revoke"}
    tasks |= {"neurofed run", "neurofed-site keygen", "neurofed-site check", "neurofed-site budget"}
    tasks |= {"neurofed-site approve"}
    assert tasks <= documented, f"deploy/README.md shows no command line for {sorted(tasks - documented)}"
