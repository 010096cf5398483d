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

from client.site_split import split_subjects  # noqa: E402
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


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_state_round_trips_through_a_checkpoint(name: str, tmp_path, node_grid) -> None:
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
    assert set(checkpoint.strategy_state) == {"m_t", "v_t"}
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


def test_site_split_is_deterministic_disjoint_and_independent_of_order() -> None:
    ids = [f"sub-{i:02d}" for i in range(10)]
    split = split_subjects(ids, 0.25, seed=3)
    assert split == split_subjects(list(reversed(ids)), 0.25, seed=3)
    assert len(split.test) == 3 and not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == ids
    assert split_subjects(ids, 0.25, seed=4) != split  # another seed, another split (10 choose 3 ways)
    assert split_subjects(ids[:2], 0.25, seed=0).train  # a small site still trains
    assert split_subjects(ids, 1.0, seed=0).train == ()  # an unseen site only tests


def test_pyproject_declares_a_valid_flower_app_with_every_run_setting() -> None:
    import tomllib
    from pathlib import Path

    from flwr.common.config import validate_config

    from server.app import RESUME_KEY, RESUME_ROUNDS_KEY

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(pyproject, check_module=True, project_dir=root)
    assert valid, errors
    settings = dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert settings.pop(RESUME_KEY) is False
    assert settings.pop(RESUME_ROUNDS_KEY) == 0  # only a resume that extends the run sets it
    # Every RunConfig field is declared, with the same default, so `flwr run .` and `neurofed simulate` agree.
    assert set(settings) == set(RunConfig().to_flower())
    assert RunConfig.from_flower(settings) == RunConfig()
