"""Differential privacy in the federation: site-side DP-SGD with the site's privacy ledger, budget refusal,
update sanity at aggregation, and site-level DP at the coordinator.

The DP simulation runs through Flower's simulation engine (2 training sites + 1 unseen, 2 rounds, tiny
network on 20^3 phantoms). The coordinator-side tests run `FederatedRun` over an in-process grid that
calls the sites' ClientApp directly, so a site's reply can be tampered with.
"""

from __future__ import annotations

import os
import tempfile

# Flower writes into FLWR_HOME (default ~/.flwr) when imported: keep tests out of the user's folder.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message  # noqa: E402
from test_federation import _tiny_run_config, _write_tiny_sites  # noqa: E402

import client.app as site_app  # noqa: E402
from bench.in_process_grid import InProcessGrid  # noqa: E402
from client.site_setup import LEDGER_FILE  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402
from privacy.accounting import epsilon_for  # noqa: E402
from privacy.dp_sgd import DPConfig  # noqa: E402
from privacy.privacy_ledger import PrivacyLedger  # noqa: E402
from server.federated_run import FederatedRun  # noqa: E402
from server.strategies import state_dict_to_arrays  # noqa: E402

SITES, UNSEEN, ROUNDS, LOCAL_STEPS = 3, 1, 2, 3
TRAIN_SUBJECTS = 2  # of 3 per site, test fraction 0.25
DELTA = 1e-5
TARGET_EPSILON = 8.0


def _config(root: Path, **changes) -> RunConfig:
    # DP is on by default; the subject-level DP run asks for it explicitly.
    return _tiny_run_config(root, **{"local_steps": LOCAL_STEPS, "test_fraction": 0.25, **changes})


def _planned_noise() -> tuple[float, float]:
    """The sample rate and noise multiplier every site derives for the run's target ε."""
    sample_rate = 1 / TRAIN_SUBJECTS
    dp = DPConfig(target_epsilon=TARGET_EPSILON, delta=DELTA)
    return sample_rate, dp.resolve_noise_multiplier(sample_rate, ROUNDS * LOCAL_STEPS)


PUBLIC_CLIPPING_NORM = 0.37
"""The median public gradient norm the stand-in starting model records for the run's trainable layers."""


def write_public_starting_model(path: Path, config: RunConfig) -> Path:
    """A stand-in for `neurofed pretrain`'s output: the run's network (random weights) with public-data
    provenance and measured public gradient norms."""
    from client.site_data import run_preprocessing_plan
    from models.label_protocols import get_protocol
    from models.model_file import save_model
    from models.networks import build_network
    from models.starting_model import PRETRAINED_KIND

    norms = {layers: {"p50": PUBLIC_CLIPPING_NORM * (1 + i)} for i, layers in enumerate(("norm", "norm+head", "all"))}
    save_model(
        path,
        build_network(config.network_config(), seed=99).state_dict(),
        network=config.network_config(),
        protocol=get_protocol(config.protocol),
        plan=run_preprocessing_plan(config).to_dict(),
        training={"kind": PRETRAINED_KIND, "public_data_only": True, "site_epsilon": 0.0, "anatomy": [],
                  "public_gradient_norms": norms},
    )
    return path


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """A DP simulation from a public starting model, training its normalization layers only, in which
    site-02's ledger budget allows round 1 but not round 2."""
    from study.simulation import run_simulation

    root = tmp_path_factory.mktemp("federation-dp")
    _write_tiny_sites(root / "data", SITES, 3)
    starting = write_public_starting_model(root / "start.pt", _config(root))
    sample_rate, noise = _planned_noise()
    one_round = epsilon_for(LOCAL_STEPS, sample_rate, noise, DELTA)
    two_rounds = epsilon_for(2 * LOCAL_STEPS, sample_rate, noise, DELTA)
    small_ledger = PrivacyLedger(root / "run" / "sites" / "site-02" / LEDGER_FILE)
    small_ledger.path.parent.mkdir(parents=True)
    small_ledger.set_budget((one_round + two_rounds) / 2, 1e-4)
    config = _config(
        root,
        dp=True,
        dp_target_epsilon=TARGET_EPSILON,
        dp_delta=DELTA,
        initial_model=str(starting),
        trainable_layers="norm",
        dp_max_grad_norm=0.0,
    )
    run_dir = run_simulation(config, site_app.app, progress=False)
    return {
        "root": root,
        "run_dir": run_dir,
        "events": run_dir.read_events(),
        "budget_one": one_round,
        "starting": starting,
    }


@pytest.mark.slow
def test_a_run_from_a_starting_model_records_it_and_trains_only_the_chosen_layers(dp_run) -> None:
    from models.model_file import load_model
    from models.starting_model import file_digest
    from models.trainable import trainable_names

    document = dp_run["run_dir"].read_document()
    assert document["starting_model"]["sha256"] == file_digest(dp_run["starting"])
    assert document["starting_model"]["public_data_only"] is True
    # dp-max-grad-norm 0: the coordinator set it from the starting model's public gradient norms.
    assert document["run_config"]["dp_max_grad_norm"] == PUBLIC_CLIPPING_NORM
    assert document["dp_clipping"]["norm"] == PUBLIC_CLIPPING_NORM
    start = load_model(dp_run["starting"]).model
    final = load_model(dp_run["run_dir"].final_model_path).model.state_dict()
    trained = trainable_names(start, "norm")
    for name, value in start.state_dict().items():
        if name in trained:
            continue
        assert torch.equal(final[name], value), name  # frozen layers keep the starting model's weights
    assert any(not torch.equal(final[n], start.state_dict()[n]) for n in trained)


def test_baselines_start_from_the_starting_model_and_train_the_same_layers(dp_run) -> None:
    from models.model_file import load_model
    from study.study_baselines import train_baseline

    config = dp_run["run_dir"].read_config()
    start = load_model(dp_run["starting"]).model.state_dict()
    rng = np.random.default_rng(0)
    subjects = [("s", rng.normal(size=(1, 16, 16, 16)).astype(np.float32), rng.integers(0, 4, (16,) * 3).astype(np.uint8))]
    model, _ = train_baseline(config, subjects, 2, "local-only:site-01")
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, start[n])}
    assert changed and changed <= {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_reported_epsilon_is_the_site_ledgers_cumulative_epsilon_for_the_run(dp_run) -> None:
    events = dp_run["events"]
    sample_rate, noise = _planned_noise()
    (sites,) = [e["sites"] for e in events if e["event"] == "sites"]
    assert {s["site"]: s["num_train"] for s in sites if s["role"] == "train"} == {
        "site-01": TRAIN_SUBJECTS,
        "site-02": TRAIN_SUBJECTS,
    }
    trained = [e for e in events if e["event"] == "train" and e["site"] == "site-01"]
    assert [e["round"] for e in trained] == [1, 2]
    ledger = PrivacyLedger(dp_run["root"] / "run" / "sites" / "site-01" / LEDGER_FILE)
    (run_id,) = {r.run_id for r in ledger.releases()}
    releases = ledger.releases(run_id)
    assert [(r.server_round, r.status, r.steps) for r in releases] == [
        (1, "committed", LOCAL_STEPS),
        (2, "committed", LOCAL_STEPS),
    ]
    for event, release in zip(trained, releases, strict=True):
        assert event["epsilon"] == pytest.approx(release.epsilon_run, rel=1e-9)
        assert event["epsilon"] == pytest.approx(
            epsilon_for(event["round"] * LOCAL_STEPS, sample_rate, noise, DELTA), rel=1e-6
        )
        assert event["delta"] == DELTA and event["metrics"]["sample-rate"] == pytest.approx(sample_rate)
        assert event["metrics"]["noise-multiplier"] == pytest.approx(noise)
    assert trained[-1]["epsilon"] == pytest.approx(ledger.run_epsilon(run_id), rel=1e-9)
    # ε is cumulative, and the run stays within its target.
    assert trained[0]["epsilon"] < trained[1]["epsilon"] <= TARGET_EPSILON * 1.01
    stored = dp_run["run_dir"].read_document()
    assert stored["run_id"] == run_id


@pytest.mark.slow
def test_the_report_states_the_epsilon_the_site_ledgers_recorded(dp_run) -> None:
    from server.report import write_report

    markdown, _ = write_report(dp_run["run_dir"].root)
    text = markdown.read_text()
    spent = []
    for site in ("site-01", "site-02"):
        ledger = PrivacyLedger(dp_run["root"] / "run" / "sites" / site / LEDGER_FILE)
        (run_id,) = {r.run_id for r in ledger.releases()}
        spent.append(ledger.run_epsilon(run_id))
    dp_line = next(line for line in text.splitlines() if line.startswith("Differential privacy:"))
    assert dp_line.startswith("Differential privacy: ON")
    assert f"largest final ε over sites {max(spent):.3g}" in dp_line and f"δ = {DELTA:g}" in dp_line


@pytest.mark.slow
def test_a_site_over_its_budget_is_refused_and_the_run_goes_on_without_it(dp_run) -> None:
    events = dp_run["events"]
    (refused,) = [e for e in events if e["event"] == "refused"]
    assert (refused["site"], refused["round"]) == ("site-02", 2)
    assert "above the lifetime budget" in refused["reason"]
    assert refused["epsilon"] == pytest.approx(dp_run["budget_one"], rel=1e-6)
    round_two = {e["site"] for e in events if e["event"] == "train" and e["round"] == 2}
    assert round_two == {"site-01"}
    # The refused round is not recorded as spent in the site's ledger.
    ledger = PrivacyLedger(dp_run["root"] / "run" / "sites" / "site-02" / LEDGER_FILE)
    assert [r.server_round for r in ledger.releases()] == [1]
    assert dp_run["run_dir"].final_model_path.is_file()
    assert any(e["event"] == "aggregate-train" and e["round"] == 2 for e in events)


# --- the coordinator, over an in-process grid ------------------------------------------------------------


def _nan_update(site_index: int, instruction: Message, reply: Message) -> Message:
    if site_index != 0:
        return reply
    arrays = reply.content["arrays"]
    poisoned = {}
    for i, (key, array) in enumerate(arrays.items()):
        values = array.numpy().copy()
        if i == 0:
            values.flat[0] = np.nan
        poisoned[key] = Array(values)
    reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


@pytest.mark.slow
def test_a_nan_update_is_rejected_and_the_round_aggregates_the_others(tmp_path, task_identity) -> None:
    _write_tiny_sites(tmp_path / "data", SITES, 3)
    config = _config(tmp_path, num_rounds=1, local_steps=2)
    messages: list[tuple[str, Message]] = []
    final = FederatedRun(
        config, InProcessGrid(SITES, _nan_update), on_message=lambda d, m: messages.append((d, m))
    ).execute()
    from server.run_directory import RunDirectory

    events = RunDirectory(config.run_dir).read_events()
    (rejected,) = [e for e in events if e["event"] == "rejected"]
    assert (rejected["site"], rejected["round"]) == ("site-01", 1)
    assert "NaN" in rejected["reason"]
    assert all(np.isfinite(v.numpy()).all() for v in final.values())
    # The global model is site-02's update alone (the only accepted one).
    (site_two,) = [
        m
        for d, m in messages
        if d == "from-site" and m.metadata.message_type == "train" and m.metadata.src_node_id == 101
    ]
    for key, value in final.items():
        np.testing.assert_allclose(value.numpy(), site_two.content["arrays"][key].numpy(), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_site_level_dp_wrapper_runs_two_rounds_and_logs_its_epsilon(tmp_path, task_identity, mode) -> None:
    _write_tiny_sites(tmp_path / "data", SITES, 3)
    config = _config(
        tmp_path, local_steps=1, server_dp=mode, server_dp_noise_multiplier=0.5, server_dp_clipping_norm=0.05
    )
    initial = state_dict_to_arrays(
        __import__("server.global_model", fromlist=["x"]).initial_state_dict(config)
    )
    assert all(np.issubdtype(a.numpy().dtype, np.floating) for a in initial.values())
    final = FederatedRun(config, InProcessGrid(SITES)).execute()
    from server.run_directory import RunDirectory

    events = RunDirectory(config.run_dir).read_events()
    aggregated = [e for e in events if e["event"] == "aggregate-train"]
    assert [e["round"] for e in aggregated] == [1, 2]
    for e in aggregated:
        assert e["site_level_epsilon"] == pytest.approx(epsilon_for(e["round"], 1.0, 0.5, config.dp_delta))
    assert aggregated[0]["site_level_epsilon"] < aggregated[1]["site_level_epsilon"]
    changed = [k for k in final if not np.array_equal(final[k].numpy(), initial[k].numpy())]
    assert changed and all(np.isfinite(v.numpy()).all() for v in final.values())
