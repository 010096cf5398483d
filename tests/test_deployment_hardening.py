"""What a deployment refuses without any process running: a run directory outside the coordinator's state
folder, a coordinator key others may read, and a Fleet proxy that passes more than the sites' calls or
bodies far larger than a model. (The proxy with real traffic: tests/test_faults.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from contract.run_config import RunConfig
from models.errors import NeurofedError
from server.coordinator import TlsFiles, check_tls_files
from server.coordinator_state import CoordinatorState
from server.fleet_proxy import body_size_limit, model_bytes, nginx_size
from server.fleet_proxy import main as fleet_proxy_main

ROOT = Path(__file__).resolve().parents[1]
FLEET_CONF = ROOT / "deploy" / "nginx" / "neurofed-fleet.conf"


def test_a_deployed_run_dir_stays_inside_the_state_folder(tmp_path) -> None:
    state = CoordinatorState(tmp_path / "state")
    (tmp_path / "state" / "runs").mkdir(parents=True)
    assert state.resolve_run_dir("runs/a") == tmp_path / "state" / "runs" / "a"
    assert state.resolve_run_dir(str(tmp_path / "state" / "runs" / "b")) == tmp_path / "state" / "runs" / "b"
    (tmp_path / "state" / "runs" / "out").symlink_to(tmp_path)
    for bad in ("/etc/cron.d/x", str(tmp_path / "elsewhere"), "runs/../../x", "../x", "runs/out/x"):
        with pytest.raises(NeurofedError, match="writes only inside the coordinator's state folder"):
            state.resolve_run_dir(bad)


def test_the_coordinator_refuses_a_key_others_may_read(tmp_path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "make-certs.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    check_tls_files(tls)
    tls.key.chmod(0o640)
    with pytest.raises(
        NeurofedError, match=r"--key .*server.key: other users may read .*mode 640.*chmod 600"
    ):
        check_tls_files(tls)


def test_the_fleet_proxy_passes_only_the_calls_of_an_authenticated_supernode() -> None:
    from flwr.superlink.routers.fleet.router import router

    text = FLEET_CONF.read_text()
    (allowed,) = re.findall(r"location ~ \^/v1/fleet/\(([a-z|-]+)\)\$", text)
    served = {route.path.removeprefix("/v1/fleet/") for route in router.routes}
    # With SuperNode authentication the SuperLink refuses self-registration: the sites never call these.
    assert set(allowed.split("|")) == served - {"register-node", "unregister-node"}
    assert all(route.methods == {"POST"} for route in router.routes)
    assert re.search(r"limit_except POST \{\s*deny all;\s*\}", text)
    assert re.search(r"location / \{\s*return 404;\s*\}", text)
    assert text.count("proxy_pass") == 1


def test_the_fleet_proxy_caps_bodies_at_about_twice_the_model(capsys) -> None:
    (cap,) = re.findall(r"client_max_body_size (\d+)m;", FLEET_CONF.read_text())
    default_unet = RunConfig(network_preset="default", architecture="unet")
    assert int(cap) * 1024**2 == pytest.approx(body_size_limit(default_unet), rel=0.15)
    assert nginx_size(body_size_limit(default_unet)) == f"{cap}m"
    tiny = RunConfig(network_preset="tiny")
    assert nginx_size(body_size_limit(tiny)) == f"{-(-2 * model_bytes(tiny) // 1024)}k"
    assert fleet_proxy_main(["--set", "network-preset=default"]) == 0
    assert capsys.readouterr().out.strip() == f"client_max_body_size {cap}m;"
