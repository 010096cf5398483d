"""Server strategies, run config, run directory and site split, without the simulation engine.

Strategies are driven through Flower's configure/aggregate calls with hand-made reply messages, as the
ServerApp drives them.
"""

from __future__ import annotations

import os
import tempfile

# Flower writes into FLWR_HOME (default ~/.flwr) when imported: keep tests out of the user's folder.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from contract.run_config import RunConfig  # noqa: E402
from models.errors import NeurofedError  # noqa: E402
from server.run_directory import RunDirectory  # noqa: E402
from server.strategies import FedBN, make_strategy, restore_strategy_state, strategy_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")


def _reply(node_id: int, arrays: dict[str, np.ndarray], num_examples: int, loss: float = 1.0) -> Message:
    instruction = Message(content=RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=instruction)


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.normal(size=(4, 2, 3, 3, 3)).astype(np.float32),
        "norm.weight": rng.normal(size=(4,)).astype(np.float32),
        "norm.bias": rng.normal(size=(4,)).astype(np.float32),
    }


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _config(**changes: object) -> RunConfig:
    return RunConfig(num_sites=3, unseen_sites=1, **changes)


def test_fedavg_result_is_the_sample_weighted_mean_of_site_arrays(node_grid) -> None:
    rng = np.random.default_rng(0)
    strategy = make_strategy(_config(strategy="fedavg"))
    start = _arrays(rng)
    list(strategy.configure_train(1, _record(start), ConfigRecord(), node_grid([11, 12])))
    site_a, site_b = _arrays(rng), _arrays(rng)
    arrays, metrics = strategy.aggregate_train(1, [_reply(11, site_a, 3, 0.5), _reply(12, site_b, 1, 1.5)])
    for key in start:
        np.testing.assert_allclose(arrays[key].numpy(), 0.75 * site_a[key] + 0.25 * site_b[key], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(0.75 * 0.5 + 0.25 * 1.5)


def test_training_goes_to_training_sites_only_and_evaluation_to_all(node_grid) -> None:
    strategy = make_strategy(_config(strategy="fedavg"))
    arrays = _record(_arrays(np.random.default_rng(1)))
    train = list(strategy.configure_train(1, arrays, ConfigRecord(), node_grid([1, 2])))
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), node_grid([1, 2, 3])))
    assert sorted(m.metadata.dst_node_id for m in train) == [1, 2]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [1, 2, 3]


def test_fedprox_mu_travels_in_the_training_config(node_grid) -> None:
    strategy = make_strategy(_config(strategy="fedprox", proximal_mu=0.37))
    messages = list(
        strategy.configure_train(
            2, _record(_arrays(np.random.default_rng(2))), ConfigRecord(), node_grid([5, 6])
        )
    )
    assert {float(m.content["config"]["proximal-mu"]) for m in messages} == {0.37}


def test_fedbn_aggregates_shared_arrays_and_keeps_global_norm_layers(node_grid) -> None:
    rng = np.random.default_rng(3)
    strategy = make_strategy(_config(strategy="fedbn"))
    assert isinstance(strategy, FedBN)
    start = _arrays(rng)
    messages = list(strategy.configure_train(1, _record(start), ConfigRecord(), node_grid([1, 2])))
    assert messages[0].content["config"]["personal-layers"] == "norm"
    # Sites send everything but their normalization layers.
    site_a = {"conv.weight": _arrays(rng)["conv.weight"]}
    site_b = {"conv.weight": _arrays(rng)["conv.weight"]}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, site_a, 2), _reply(2, site_b, 2)])
    assert set(arrays) == set(start)
    np.testing.assert_allclose(
        arrays["conv.weight"].numpy(), 0.5 * site_a["conv.weight"] + 0.5 * site_b["conv.weight"], rtol=1e-6
    )
    for key in ("norm.weight", "norm.bias"):
        np.testing.assert_array_equal(arrays[key].numpy(), start[key])
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), node_grid([1, 2, 3])))
    assert evaluate[0].content["config"]["evaluate-personal"] is True


def test_fedavgm_steps_along_the_momentum_of_the_mean_updates(node_grid) -> None:
    rng = np.random.default_rng(5)
    lr, beta = 0.5, 0.9
    strategy = make_strategy(_config(strategy="fedavgm", server_learning_rate=lr, server_momentum=beta))
    start = _arrays(rng)
    arrays, momentum = _record(start), None
    expected = {k: v.astype(np.float64) for k, v in start.items()}
    for server_round in (1, 2, 3):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), node_grid([1, 2])))
        site_a, site_b = _arrays(rng), _arrays(rng)
        arrays, _ = strategy.aggregate_train(server_round, [_reply(1, site_a, 1), _reply(2, site_b, 3)])
        # By hand: the pseudo-gradient is the global model minus the weighted mean of the sites' models.
        step = {k: expected[k] - (0.25 * site_a[k] + 0.75 * site_b[k]) for k in start}
        momentum = step if momentum is None else {k: beta * momentum[k] + step[k] for k in start}
        expected = {k: expected[k] - lr * momentum[k] for k in start}
        for key in start:
            np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-4, atol=1e-5)


def test_the_server_step_size_defaults_to_the_strategys_own() -> None:
    assert _config(strategy="fedavgm").server_step_size() == 1.0
    assert _config(strategy="fedadam").server_step_size() == 0.01
    assert _config(strategy="fedadam", server_learning_rate=0.1).server_step_size() == 0.1


@pytest.mark.parametrize(
    ("name", "state_keys"),
    [("fedadam", {"m_t", "v_t"}), ("fedyogi", {"m_t", "v_t"}), ("fedavgm", {"momentum"})],
)
def test_server_optimizer_state_round_trips_through_a_checkpoint(
    name: str, state_keys: set[str], tmp_path, node_grid
) -> None:
    rng = np.random.default_rng(4)
    config = _config(strategy=name, server_learning_rate=0.05)
    start = _arrays(rng)
    updates = {r: [(_arrays(rng), 2), (_arrays(rng), 3)] for r in (1, 2, 3)}

    def one_round(strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), node_grid([1, 2])))
        replies = [_reply(i + 1, a, n) for i, (a, n) in enumerate(updates[server_round])]
        new, _ = strategy.aggregate_train(server_round, replies)
        return new

    straight = make_strategy(config)
    arrays = _record(start)
    for r in (1, 2, 3):
        arrays = one_round(straight, r, arrays)

    first = make_strategy(config)
    after_one = one_round(first, 1, _record(start))
    run_dir = RunDirectory(tmp_path / "run")

    def write_model(path, state_dict) -> None:
        torch.save({"state_dict": dict(state_dict)}, path)

    run_dir.save_checkpoint(1, after_one.to_torch_state_dict(), strategy_state(first), write_model)
    checkpoint = run_dir.latest_checkpoint(lambda p: torch.load(p, weights_only=True)["state_dict"])
    assert checkpoint is not None and checkpoint.server_round == 1
    assert set(checkpoint.strategy_state) == state_keys
    resumed = make_strategy(config)
    restore_strategy_state(resumed, checkpoint.strategy_state)
    arrays_resumed = ArrayRecord({k: Array(v.numpy()) for k, v in checkpoint.state_dict.items()})
    for r in (2, 3):
        arrays_resumed = one_round(resumed, r, arrays_resumed)
    for key in start:
        np.testing.assert_array_equal(arrays_resumed[key].numpy(), arrays[key].numpy())
    # Without the restored moments the result differs: the state matters.
    fresh = make_strategy(config)
    fresh_arrays = ArrayRecord({k: Array(v.numpy()) for k, v in checkpoint.state_dict.items()})
    for r in (2, 3):
        fresh_arrays = one_round(fresh, r, fresh_arrays)
    assert not np.allclose(fresh_arrays["conv.weight"].numpy(), arrays["conv.weight"].numpy())


def test_run_config_round_trips_through_flower_keys_and_json() -> None:
    config = RunConfig(num_rounds=7, strategy="fedprox", proximal_mu=0.1, field_of_view_mm="64,64,64")
    flat = config.to_flower()
    assert flat["num-server-rounds"] == 7 and flat["proximal-mu"] == 0.1
    assert RunConfig.from_flower(flat) == config
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.field_of_view() == (64.0, 64.0, 64.0)
    # TOML may give an int where a float is meant.
    assert RunConfig.from_flower({"learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"strategy": "fedmagic"}, "strategy"),
        ({"num-rounds": 3}, "num-rounds"),
        ({"num-sites": 2, "unseen-sites": 2}, "unseen-sites"),
        ({"local-steps": "many"}, "local-steps"),
        ({"dp": True, "dp-delta": 1.5}, "dp-delta"),
        ({"dp": True, "dp-target-epsilon": 0.0}, "dp-target-epsilon"),
        ({"dp-grad-sample-mode": "magic"}, "dp-grad-sample-mode"),
        ({"server-dp": "local"}, "server-dp"),
        ({"server-dp": "fixed", "strategy": "fedbn"}, "server-dp"),
        ({"field-of-view-mm": "64,64"}, "field-of-view-mm"),
        ({"server-momentum": 1.0}, "server-momentum"),
        ({"server-learning-rate": -0.1}, "server-learning-rate"),
    ],
)
def test_bad_run_settings_are_refused_naming_the_setting(settings: dict, named: str) -> None:
    with pytest.raises(NeurofedError, match=named):
        RunConfig.from_flower(settings)


def test_run_directory_refuses_to_overwrite_a_run_and_drops_events_of_an_interrupted_round(tmp_path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.start(RunConfig(), {"plan": {"a": 1}})
    with pytest.raises(NeurofedError, match="--resume"):
        run_dir.start(RunConfig())
    for r in (0, 1, 2, 3):
        run_dir.append_event({"event": "evaluate", "round": r, "metrics": {"hd95-csf": float("nan")}})
    assert run_dir.read_events()[0]["metrics"]["hd95-csf"] is None
    run_dir.drop_events_after(1)
    assert [e["round"] for e in run_dir.read_events()] == [0, 1]
    assert run_dir.read_config() == RunConfig()


def test_a_run_folder_holds_the_run_of_its_config_with_the_clipping_norm_resolved(tmp_path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.start(RunConfig(dp_max_grad_norm=1.0))  # what the run stores once it resolved the automatic norm
    assert run_dir.holds_run_of(RunConfig())
    assert run_dir.holds_run_of(RunConfig(dp_max_grad_norm=1.0))
    assert not run_dir.holds_run_of(RunConfig(dp_max_grad_norm=2.0))
    assert not run_dir.holds_run_of(RunConfig(seed=RunConfig().seed + 1))


def test_a_checkpoint_without_its_strategy_state_does_not_count(tmp_path) -> None:
    run_dir = RunDirectory(tmp_path / "run")

    def write_model(path, state_dict) -> None:
        torch.save({"state_dict": dict(state_dict)}, path)

    run_dir.save_checkpoint(1, {"w": torch.ones(2)}, {}, write_model)
    run_dir.save_checkpoint(2, {"w": torch.zeros(2)}, {}, write_model)
    run_dir.strategy_state_path(2).unlink()  # as if interrupted while writing round 2
    checkpoint = run_dir.latest_checkpoint(lambda p: torch.load(p, weights_only=True)["state_dict"])
    assert checkpoint.server_round == 1
    torch.testing.assert_close(checkpoint.state_dict["w"], torch.ones(2))


def test_pyproject_declares_a_valid_flower_app_with_every_run_setting() -> None:
    import tomllib
    from pathlib import Path

    from flwr.common.config import validate_config

    from contract.resume_settings import RESUME_SETTINGS_KEY
    from server.app import RESUME_KEY

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(pyproject, check_module=True, project_dir=root)
    assert valid, errors
    settings = dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert settings.pop(RESUME_KEY) is False
    assert settings.pop(RESUME_SETTINGS_KEY) == ""  # only a resume that changes settings sets it
    # Every RunConfig field is declared, with the same default, so `flwr run .` and `neurofed simulate` agree.
    assert set(settings) == set(RunConfig().to_flower())
    assert RunConfig.from_flower(settings) == RunConfig()


# --- site-level DP at the coordinator (server-dp) ------------------------------------------------------


def _dp_config(**changes: object) -> RunConfig:
    """Three training sites (and one unseen), site-level DP on."""
    settings = {"num_sites": 4, "unseen_sites": 1, "server_dp": "fixed", **changes}
    return RunConfig(**settings)


def _moved(start: dict[str, np.ndarray], rng: np.random.Generator, norm: float) -> dict[str, np.ndarray]:
    """``start`` plus an update of L2 norm ``norm`` over all arrays together."""
    step = {k: rng.normal(size=v.shape) for k, v in start.items()}
    scale = norm / np.sqrt(sum(np.sum(s**2) for s in step.values()))
    return {k: (start[k] + scale * step[k]).astype(np.float32) for k in start}


def _clipped_update(site: dict[str, np.ndarray], start: dict[str, np.ndarray], clip: float) -> dict:
    step = {k: site[k].astype(np.float64) - start[k] for k in start}
    norm = np.sqrt(sum(np.sum(s**2) for s in step.values()))
    return {k: s * min(1.0, clip / norm) for k, s in step.items()}


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_site_level_dp_weighs_every_site_alike_whatever_examples_it_claims(mode: str, node_grid) -> None:
    rng = np.random.default_rng(10)
    config = _dp_config(server_dp=mode, server_dp_noise_multiplier=0.0, server_dp_clipping_norm=1.0)
    strategy = make_strategy(config)
    start = _arrays(rng)
    list(strategy.configure_train(1, _record(start), ConfigRecord(), node_grid([1, 2, 3])))
    greedy, modest = _moved(start, rng, 5.0), _moved(start, rng, 0.5)  # clipped to 1, and within the norm
    replies = [_reply(1, greedy, 10**6, loss=0.5), _reply(2, modest, 1, loss=1.5)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    clipped = [_clipped_update(site, start, 1.0) for site in (greedy, modest)]
    for key in start:
        expected = start[key] + (clipped[0][key] + clipped[1][key]) / 2
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.0)  # the uniform mean too


def test_site_level_dp_noise_is_calibrated_to_the_sites_that_replied(node_grid) -> None:
    rng = np.random.default_rng(11)
    z, clip = 1.3, 0.5
    config = _dp_config(server_dp_noise_multiplier=z, server_dp_clipping_norm=clip, min_sites=2)
    strategy = make_strategy(config)
    start = {
        "conv.weight": rng.normal(size=(200_000,)).astype(np.float32),
        "norm.bias": np.zeros(4, np.float32),
    }
    list(strategy.configure_train(1, _record(start), ConfigRecord(), node_grid([1, 2, 3])))
    sites = [_moved(start, rng, 3.0), _moved(start, rng, 3.0)]  # 2 of the 3 training sites reply
    arrays, metrics = strategy.aggregate_train(1, [_reply(i + 1, a, 4) for i, a in enumerate(sites)])
    clipped = [_clipped_update(site, start, clip) for site in sites]
    noise = np.concatenate(
        [arrays[k].numpy() - start[k] - (clipped[0][k] + clipped[1][k]) / 2 for k in start]
    )
    assert np.std(noise) == pytest.approx(z * clip / 2, rel=0.03)
    assert abs(np.mean(noise)) < 0.01 * z * clip
    assert metrics["server-dp-sites"] == 2 and metrics["server-dp-noise-std"] == pytest.approx(z * clip / 2)
    # One reply is fewer than min-sites: nothing is released, and the round says why.
    list(strategy.configure_train(2, arrays, ConfigRecord(), node_grid([1, 2, 3])))
    assert strategy.aggregate_train(2, [_reply(1, _moved(start, rng, 0.1), 4)]) == (None, None)
    from server.strategies import released_rounds, unreleased_reason

    assert "fewer than the 2" in unreleased_reason(strategy, 2)
    assert unreleased_reason(strategy, 1) is None and released_rounds(strategy) == 1


def test_site_level_dp_noises_the_mean_before_the_server_optimizer(node_grid) -> None:
    rng = np.random.default_rng(12)
    config = _dp_config(strategy="fedadam", server_dp_noise_multiplier=1.0, server_learning_rate=0.01)
    strategy = make_strategy(config)
    start = _arrays(rng)
    list(strategy.configure_train(1, _record(start), ConfigRecord(), node_grid([1, 2, 3])))
    replies = [_reply(i + 1, _moved(start, rng, 2.0), 3) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Adam moves each parameter by at most about its learning rate, noise or not: the noise (std 1/3
    # here) went into its input, the mean update, not onto the model it returned.
    for key in start:
        assert np.max(np.abs(arrays[key].numpy() - start[key])) <= config.server_learning_rate


def _google_epsilon(noise_multiplier: float, sample_rate: float, releases: int, delta: float) -> float:
    """ε of ``releases`` site-level releases, by Google's dp-accounting RDP accountant."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from privacy.accounting import RDP_ORDERS

    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("mode", "noise"), [("fixed", 0.8), ("adaptive", 1.5)])
def test_site_level_epsilon_counts_released_rounds_as_dp_accounting_does(
    mode: str, noise: float, node_grid, caplog
) -> None:
    import logging

    caplog.set_level(logging.ERROR)  # dp-accounting logs each fractional order it cannot evaluate
    rng = np.random.default_rng(13)
    config = _dp_config(server_dp=mode, server_dp_noise_multiplier=noise, min_sites=2)
    strategy = make_strategy(config)
    arrays, released = _record(_arrays(rng)), []
    for server_round, replying in [(1, 3), (2, 1), (3, 2), (4, 3)]:  # round 2: too few sites, not released
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), node_grid([1, 2, 3])))
        start = {k: v.numpy() for k, v in arrays.items()}
        new, _ = strategy.aggregate_train(
            server_round, [_reply(i + 1, _moved(start, rng, 1.0), 2) for i in range(replying)]
        )
        released.append(new is not None)
        arrays = new if new is not None else arrays
    assert released == [True, False, True, True]
    from server.strategies import released_rounds, server_dp_epsilon, site_sample_rate

    assert released_rounds(strategy) == 3 and site_sample_rate(config) == 1.0
    ours = server_dp_epsilon(config, released_rounds(strategy))
    assert ours == pytest.approx(
        _google_epsilon(noise, site_sample_rate(config), 3, config.dp_delta), rel=0.01
    )
    assert ours < 0.95 * server_dp_epsilon(config, 4)  # a skipped round spends nothing

    # A resumed run continues the count; a checkpoint from before the count counts every completed round.
    state = strategy_state(strategy)
    resumed = make_strategy(config)
    restore_strategy_state(resumed, state, completed_rounds=4)
    assert released_rounds(resumed) == 3
    older = make_strategy(config)
    restore_strategy_state(
        older, {k: v for k, v in state.items() if k != "released_rounds"}, completed_rounds=4
    )
    assert released_rounds(older) == 4
    if mode == "adaptive":
        assert resumed.clipping_norm == float(state["clipping_norm"]) == strategy.clipping_norm
        assert strategy.clipping_norm != config.server_dp_clipping_norm  # it moved, and the move was kept


def test_adaptive_clipping_norm_moves_towards_the_median_update_norm(node_grid) -> None:
    rng = np.random.default_rng(14)
    config = _dp_config(server_dp="adaptive", server_dp_noise_multiplier=0.0, server_dp_clipping_norm=1.0)
    strategy = make_strategy(config)
    arrays = _record(_arrays(rng))
    for server_round in range(1, 6):  # every update is far within the norm: the norm shrinks towards them
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), node_grid([1, 2, 3])))
        start = {k: v.numpy() for k, v in arrays.items()}
        arrays, _ = strategy.aggregate_train(
            server_round, [_reply(i + 1, _moved(start, rng, 0.05), 2) for i in range(3)]
        )
    assert 0.05 < strategy.clipping_norm < 0.75
