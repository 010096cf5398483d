"""The federation end to end through Flower's simulation engine, and the site's ClientApp in process.

The simulation test runs 2 training sites + 1 unseen site for 2 rounds with the tiny network on tiny
phantom volumes (20^3 voxels, written here), watches every message, then resumes a copy of the run cut after round 1 and
checks it ends with the same weights.
"""

from __future__ import annotations

import os
import tempfile

# Flower writes into FLWR_HOME (default ~/.flwr) when imported: keep tests out of the user's folder.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402

import client.app as site_app  # noqa: E402
import client.site_handlers as site_handlers  # noqa: E402
from bench.tiny_sites import write_tiny_site  # noqa: E402
from client.site_data import SiteData, run_preprocessing_plan  # noqa: E402
from client.site_model import build_model  # noqa: E402
from client.site_state import normalization_keys  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY  # noqa: E402
from contract.wire import REFUSED_KEY  # noqa: E402
from server.federated_run import site_config  # noqa: E402
from server.strategies import make_strategy, state_dict_to_arrays  # noqa: E402

SITES, UNSEEN, ROUNDS = 3, 1, 2


# --- the site's ClientApp, in process, on made-up arrays ----------------------------------------------


def _fake_site_data(run: RunConfig, persons: tuple[str, ...] = ("sub-01", "sub-02")) -> SiteData:
    """Made-up training subjects of ``persons`` (one session each, unless a person is named twice) and one
    test subject."""
    rng = np.random.default_rng(0)
    subjects = []
    for _ in range(len(persons) + 1):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:12, 4:12, 4:12] = 1 + rng.integers(0, 3, size=(8, 8, 8))
        image = (label.astype(np.float32) + rng.normal(0, 0.3, label.shape).astype(np.float32))[None]
        subjects.append((image, label))
    return SiteData(
        train=subjects[:-1],
        test=subjects[-1:],
        plan=run_preprocessing_plan(run),
        spacing_mm=(2.0, 2.0, 2.0),
        train_persons=persons,
        test_persons=1,
    )


@pytest.fixture()
def site(monkeypatch, tmp_path, task_identity, node_grid):
    """Calls the real ClientApp handlers of a deployed training site, with made-up site data."""
    monkeypatch.setattr(site_handlers, "load_site_data", lambda setup, run: _fake_site_data(run))
    seen: list[dict] = []
    real_train_steps = __import__("models.training", fromlist=["train_steps"]).train_steps

    def spy_train_steps(model, subjects, config, steps, **kwargs):
        seen.append({"state": {k: v.clone() for k, v in model.state_dict().items()}, **kwargs})
        return real_train_steps(model, subjects, config, steps, **kwargs)

    monkeypatch.setattr("models.training.train_steps", spy_train_steps)
    # This site opts in to runs without DP (the tests below are non-DP) and reports metrics of its
    # one-person test split (its own choice, for this test).
    context = deployed_site_context(tmp_path, "state", **{"require-dp": False, "min-test-subjects": 1})
    config = RunConfig(
        num_sites=SITES,
        unseen_sites=UNSEEN,
        local_steps=2,
        patch_size=16,
        batch_size=1,
        run_dir=str(tmp_path),
        dp=False,  # these tests look into the plain training loop
    )

    def call(strategy_name: str, server_round: int, state_dict, kind: str = "train", **changes) -> Message:
        run_config = config.replace(strategy=strategy_name, **changes)
        strategy = make_strategy(run_config)
        configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
        # Strategies address every training site (train) or every site (evaluate); this site is node 7.
        nodes = node_grid([7, 8] if kind == "train" else [7, 8, 9])
        messages = configure(
            server_round, state_dict_to_arrays(state_dict), site_config(run_config, server_round), nodes
        )
        (message,) = [m for m in messages if m.metadata.dst_node_id == 7]
        return site_app.app(message, context)

    call.seen = seen  # type: ignore[attr-defined]
    call.context = context  # type: ignore[attr-defined]
    call.tmp_path = tmp_path  # type: ignore[attr-defined]
    return call


def deployed_site_context(tmp_path: Path, state: str, **node_config) -> Context:
    """The Flower context of deployed site ``site-a`` (node 7): its data folder and state folder under
    ``tmp_path``, and further node-config settings."""
    return Context(
        run_id=1,
        node_id=7,
        node_config={
            "data-dir": str(tmp_path / "site-a"),
            "site-id": "site-a",
            "state-dir": str(tmp_path / state),
            CONTRACT_VERSION_KEY: CONTRACT_VERSION,  # as `neurofed-site start` writes it
            **node_config,
        },
        state=RecordDict(),
        run_config={},
    )


def _initial_state() -> dict[str, torch.Tensor]:
    recipe_config = RunConfig()
    from server.global_model import initial_state_dict

    return initial_state_dict(recipe_config)


def test_a_deployed_site_refuses_to_train_without_dp_unless_its_operator_allows_it(site) -> None:
    state = _initial_state()
    del site.context.node_config["require-dp"]  # a site started without --allow-no-dp
    reply = site("fedavg", 1, state)
    assert not reply.has_error()
    assert reply.content["metrics"][REFUSED_KEY] == 1
    reason = str(reply.content["refusal"]["reason"])
    assert "site-a" in reason and "dp=false" in reason and "--allow-no-dp" in reason
    assert site.seen == []  # nothing was trained
    site.context.node_config["require-dp"] = "false"
    reply = site("fedavg", 1, state)
    assert "refusal" not in reply.content and len(site.seen) == 1


def test_the_site_daemon_asks_for_dp_unless_allow_no_dp() -> None:
    from client.site_daemon import SiteDaemonConfig, node_config

    base = SiteDaemonConfig(
        coordinator="c:9092",
        ca_cert=Path("ca.crt"),
        private_key=Path("k"),
        data_dir=Path("d"),
        budget_epsilon=5,
    )
    assert "require-dp='true'" in node_config(base)
    assert "require-dp='false'" in node_config(base.__class__(**{**base.__dict__, "allow_no_dp": True}))


def test_a_site_whose_installed_neurofed_speaks_another_contract_refuses_and_logs_it(site, capsys) -> None:
    from client.approved_apps import AUDIT_LOG_FILE, read_audit_events
    from models.errors import NeurofedError

    site.context.node_config[CONTRACT_VERSION_KEY] = CONTRACT_VERSION + 1
    both = rf"contract version {CONTRACT_VERSION}, site site-a's installed neurofed version {CONTRACT_VERSION + 1}"
    with pytest.raises(NeurofedError, match=both):
        site("fedavg", 1, _initial_state())
    assert site.seen == []
    (event,) = read_audit_events(site.tmp_path / "state" / AUDIT_LOG_FILE)
    assert event["event"] == "run-refused" and "contract version" in event["reason"]
    assert "neurofed: REFUSED the run" in capsys.readouterr().out  # the site's own log says why


def test_a_deployed_site_keeps_the_final_model_and_logs_its_hash(site, capsys) -> None:
    from client.approved_apps import AUDIT_LOG_FILE, read_audit_events
    from models.model_file import load_model, weights_sha256

    state = _initial_state()
    # The last round's evaluation brings the final model: kept even where the site declines to evaluate.
    reply = site("fedavg", 2, state, kind="evaluate", num_rounds=2)
    assert "did not train in round 2" in str(reply.content["refusal"]["reason"])
    events = {e["event"]: e for e in read_audit_events(site.tmp_path / "state" / AUDIT_LOG_FILE)}
    received = events["model-received"]
    assert received["weights_sha256"] == weights_sha256(state)
    assert load_model(received["model_file"]).weights_sha256 == weights_sha256(state)  # segment reads it
    assert "did not train in round 2" in events["evaluation-refused"]["reason"]
    out = capsys.readouterr().out
    assert f"weights sha256 {weights_sha256(state)}" in out and "REFUSED evaluation" in out


def test_fedprox_mu_and_global_weights_reach_the_sites_training_loop(site) -> None:
    state = _initial_state()
    reply = site("fedprox", 1, state, proximal_mu=0.37)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (call,) = site.seen
    assert call["proximal_mu"] == pytest.approx(0.37)
    for key, tensor in state.items():
        torch.testing.assert_close(call["proximal_to"][key], tensor)
    # FedAvg sends no proximal term.
    site("fedavg", 1, state)
    assert site.seen[-1]["proximal_mu"] == 0.0 and site.seen[-1]["proximal_to"] is None


def test_fedbn_site_keeps_its_normalization_layers_and_sends_the_rest(site) -> None:
    state = _initial_state()
    model = build_model(RunConfig())
    norm_keys = normalization_keys(model)
    norm_modules = {k.rsplit(".", 1)[0] for k in norm_keys}
    assert norm_keys and all(
        isinstance(model.get_submodule(m), torch.nn.modules.instancenorm._InstanceNorm) for m in norm_modules
    )

    reply = site("fedbn", 1, state)
    sent = set(reply.content["arrays"])
    assert sent == set(state) - norm_keys
    # Round 2 starts from the global shared arrays but the site's own normalization layers of round 1.
    site("fedbn", 2, state)
    round_two_start = site.seen[-1]["state"]
    own = torch.load(site.tmp_path / "state" / "personal-layers-round-001.pt", weights_only=True)
    assert set(own) == norm_keys
    assert any(not torch.equal(own[k], state[k]) for k in norm_keys)  # they trained
    for key in norm_keys:
        torch.testing.assert_close(round_two_start[key], own[key])
    for key in set(state) - norm_keys:
        torch.testing.assert_close(round_two_start[key], state[key])

    evaluation = site("fedbn", 2, state, kind="evaluate")
    metrics = evaluation.content["metrics"]
    assert {"dice-mean", "personal-dice-mean", "num-examples"} <= set(metrics)


# --- the whole federation through Flower's simulation engine --------------------------------------------


def _write_tiny_sites(root: Path, n_sites: int, n_subjects: int) -> None:
    """BIDS site folders ``root/site-01`` ... of 20^3-voxel (4 mm) spherical head phantoms
    (bench/tiny_sites.py), one intensity profile per site."""
    rng = np.random.default_rng(0)  # one stream for all sites
    for s in range(n_sites):
        write_tiny_site(root / f"site-{s + 1:02d}", n_subjects, gain=1.0 + 0.3 * s, seed=rng)


def _tiny_run_config(root: Path, **changes) -> RunConfig:
    """A FedAvg run on the `_write_tiny_sites` phantoms in ``root/data`` (tiny network, 16^3 patches,
    4 mm), into ``root/run``, without DP (on by default), with ``changes``."""
    settings = dict(
        num_rounds=ROUNDS,
        strategy="fedavg",
        local_steps=3,
        network_preset="tiny",
        patch_size=16,
        batch_size=1,
        test_fraction=0.34,
        num_sites=SITES,
        unseen_sites=UNSEEN,
        data_root=str(root / "data"),
        run_dir=str(root / "run"),
        spacing_mm=4.0,
        field_of_view_mm="64,64,64",
        round_timeout_s=300.0,
        dp=False,
        initial_model="none",
    )
    return RunConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """A 2-round FedAvg run (2 training sites + 1 unseen) with every message recorded."""
    from study.simulation import run_simulation

    root = tmp_path_factory.mktemp("federation")
    _write_tiny_sites(root / "data", SITES, 3)
    # Exact FedAvg arithmetic on plain updates; DP runs: test_federation_privacy.py.
    config = _tiny_run_config(root)
    messages: list[tuple[str, Message]] = []
    run_dir = run_simulation(
        config, site_app.app, on_message=lambda direction, m: messages.append((direction, m)), progress=False
    )
    return {"config": config, "run_dir": run_dir, "messages": messages, "root": root}


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    from models.model_file import load_model

    return load_model(path).model.state_dict()


@pytest.mark.slow
def test_fedavg_global_weights_are_the_sample_weighted_mean_of_site_updates(simulated_run) -> None:
    run_dir = simulated_run["run_dir"]
    train_replies = [
        m for d, m in simulated_run["messages"] if d == "from-site" and m.metadata.message_type == "train"
    ]
    assert len(train_replies) == ROUNDS * (SITES - UNSEEN)
    round_one = train_replies[: SITES - UNSEEN]
    weights = np.array([float(m.content["metrics"]["num-examples"]) for m in round_one])
    weights = weights / weights.sum()
    global_after_one = _model_state(run_dir.checkpoint_path(1))
    initial = _initial_state_for(simulated_run["config"])
    changed = 0
    for key, value in global_after_one.items():
        expected = sum(w * m.content["arrays"][key].numpy() for w, m in zip(weights, round_one, strict=True))
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, initial[key])
    assert changed > 0  # the sites did train


def _initial_state_for(config: RunConfig) -> dict[str, torch.Tensor]:
    from server.global_model import initial_state_dict

    return initial_state_dict(config)


@pytest.mark.slow
def test_metrics_of_every_site_and_the_unseen_site_are_logged(simulated_run) -> None:
    events = simulated_run["run_dir"].read_events()
    sites = next(e for e in events if e["event"] == "sites")["sites"]
    roles = {s["site"]: s["role"] for s in sites}
    assert sorted(roles.values()) == ["holdout"] + ["train"] * (SITES - UNSEEN)
    for server_round in range(1, ROUNDS + 1):
        evaluated = {e["site"]: e for e in events if e["event"] == "evaluate" and e["round"] == server_round}
        assert set(evaluated) == set(roles)
        for name, event in evaluated.items():
            assert event["role"] == roles[name] and event["split"] == "test"
            assert 0.0 <= event["metrics"]["dice-mean"] <= 1.0
            assert event["metrics"]["num-examples"] >= 1
        trained = {e["site"] for e in events if e["event"] == "train" and e["round"] == server_round}
        assert trained == {s for s, r in roles.items() if r == "train"}


@pytest.mark.slow
def test_nothing_voxel_shaped_or_larger_than_a_parameter_leaves_a_site(simulated_run) -> None:
    config = simulated_run["config"]
    initial = _initial_state_for(config)
    largest_parameter = max(t.numel() for t in initial.values())
    parameter_shapes = {k: tuple(t.shape) for k, t in initial.items()}
    # The preprocessed grid (64 mm at 4 mm) and the native scans (20^3 voxels).
    volume_shapes = {(16, 16, 16), (20, 20, 20)}
    replies = [m for d, m in simulated_run["messages"] if d == "from-site"]
    assert len(replies) == SITES + ROUNDS * (SITES - UNSEEN) + ROUNDS * SITES
    for reply in replies:
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        for record in content.array_records.values():
            for key, array in record.items():
                assert key in parameter_shapes and tuple(array.shape) == parameter_shapes[key]
                assert int(np.prod(array.shape)) <= largest_parameter
                assert tuple(array.shape[-3:]) not in volume_shapes, f"{key} is shaped like a volume"
        for record in content.metric_records.values():
            for value in record.values():
                assert isinstance(value, int | float), "metrics must be scalars"
        for record in content.config_records.values():
            assert set(record) == {"site-id", "role", "contract-version", "plan"}


@pytest.mark.slow
def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(simulated_run) -> None:
    from server.run_directory import RunDirectory
    from study.simulation import run_simulation

    original = simulated_run["run_dir"]
    copy = RunDirectory(simulated_run["root"] / "interrupted")
    shutil.copytree(original.root, copy.root)
    # As if the run was stopped during round 2: its checkpoint and the final model never got written.
    copy.checkpoint_path(2).unlink()
    copy.strategy_state_path(2).unlink()
    copy.final_model_path.unlink()
    config = simulated_run["config"].replace(run_dir=str(copy.root))
    run_simulation(config, site_app.app, resume=True, progress=False)

    resumed, uninterrupted = _model_state(copy.final_model_path), _model_state(original.final_model_path)
    assert set(resumed) == set(uninterrupted)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    rounds = [e["round"] for e in copy.read_events() if e["event"] == "aggregate-train"]
    assert rounds == [1, 2]  # round 2 logged once, not twice


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused(simulated_run) -> None:
    from models.errors import NeurofedError
    from study.simulation import run_simulation

    with pytest.raises(NeurofedError, match="--resume"):
        run_simulation(simulated_run["config"], site_app.app, progress=False)


# --- `neurofed simulate` options, refused before anything runs ---------------------------------------


def test_simulate_refuses_a_bad_dp_setting_naming_it_and_writes_nothing(tmp_path, capsys) -> None:
    from study.cli import main

    assert main(["simulate", "--dp", "--delta", "2", "--out", str(tmp_path / "run")]) == 2
    assert "'dp-delta'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_simulate_refuses_a_folder_that_holds_a_run(tmp_path, capsys) -> None:
    from server.run_directory import RunDirectory
    from study.cli import main

    RunDirectory(tmp_path / "run").start(RunConfig())
    assert main(["simulate", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "--resume" in err


def test_resume_of_a_folder_without_a_run_names_the_folder(tmp_path, capsys) -> None:
    from study.cli import main

    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "config.json" in err
