"""The DP noise of a site's release comes from the site's own secret, never from what the coordinator
knows (run seed, round, site id): the same message to two fresh sites gives two different releases, and
replaying it to the same site gives the same one (a retried round reuses its draws)."""

from __future__ import annotations

import os
import stat
import tempfile

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-flwr-home-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import (  # noqa: E402
    ConfigRecord,  # noqa: E402
    Message,
)
from test_federation import _fake_site_data, _initial_state, deployed_site_context  # noqa: E402

import client.app as site_app  # noqa: E402
import client.site_handlers as site_handlers  # noqa: E402
from client.privacy_budget import init_site  # noqa: E402
from client.site_secret import SECRET_FILE, SiteSecret  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402
from contract.site_task import site_task_record  # noqa: E402
from server.strategies import make_strategy, state_dict_to_arrays  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")
TORCH_THREADS = 1


@pytest.fixture()
def dp_release(monkeypatch, tmp_path, node_grid):
    """``dp_release(state, ledger, **run_changes)``: the arrays a DP site with state folder ``state`` and
    ledger file ``ledger`` sends back for one identical round-1 message."""
    monkeypatch.setattr(site_handlers, "load_site_data", lambda setup, run: _fake_site_data(run))
    initial = _initial_state()

    def release(state: str, ledger: str, **changes) -> dict[str, np.ndarray]:
        run = RunConfig(
            num_sites=2,
            unseen_sites=1,
            local_steps=2,
            patch_size=16,
            batch_size=1,
            run_dir=str(tmp_path),
            dp_max_grad_norm=1.0,  # as a coordinator sends it, resolved (server/global_model.py)
            **changes,
        )
        if not (tmp_path / ledger).exists():
            init_site(tmp_path / ledger, 100.0, 1e-3)  # what the operator runs once: budget --init
        context = deployed_site_context(
            tmp_path, state, ledger=str(tmp_path / ledger), **{"budget-epsilon": 100.0, "budget-delta": 1e-3}
        )
        record = ConfigRecord(site_task_record(run, server_round=1, run_id="run-1"))
        (message,) = make_strategy(run).configure_train(
            1, state_dict_to_arrays(initial), record, node_grid([7])
        )
        reply: Message = site_app.app(message, context)
        assert not reply.has_error(), reply.error
        assert reply.content["metrics"]["epsilon"] > 0  # a DP release, recorded in the ledger
        return {k: v.numpy() for k, v in reply.content["arrays"].items()}

    return release


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_fresh_sites_release_different_updates_and_one_site_repeats_its_own(dp_release, tmp_path) -> None:
    first = dp_release("state-1", "ledger-1.json")
    other_site = dp_release("state-2", "ledger-2.json")
    assert not _same(first, other_site)
    # The same site state (its secret) answers the same message identically: a retried round reuses its
    # draws, so the coordinator never sees one round released twice with independent noise.
    assert _same(first, dp_release("state-1", "ledger-3.json"))
    mode = stat.S_IMODE((tmp_path / "state-1" / SECRET_FILE).stat().st_mode)
    assert mode == 0o600


def test_nothing_the_coordinator_sends_seeds_the_noise(dp_release) -> None:
    # The run seed is the coordinator's: changing it changes nothing in the release of a DP round.
    assert _same(
        dp_release("state-1", "ledger-1.json", seed=0), dp_release("state-1", "ledger-2.json", seed=12345)
    )


def test_seeds_differ_by_run_round_and_purpose_and_depend_on_the_secret_only() -> None:
    secret = SiteSecret(bytes(range(32)))
    seeds = {secret.seed(run, r, p) for run in ("a", "b") for r in (1, 2) for p in ("patches", "dropout")}
    assert len(seeds) == 8
    assert SiteSecret(bytes(range(32))).seed("a", 1, "patches") == secret.seed("a", 1, "patches")
    assert SiteSecret(bytes(32)).seed("a", 1, "patches") != secret.seed("a", 1, "patches")
    assert "hidden" in repr(secret)
    with pytest.raises(ValueError):
        secret.seed("a", 1, "seed-from-the-run-config")
