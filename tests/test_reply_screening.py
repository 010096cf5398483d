"""One faulty or malicious site cannot break or steer the coordinator: every reply is checked against the
run's reply schema, weights are capped, robust strategies aggregate, and only enrolled sites take part.

The run-level tests drive `FederatedRun` over a scripted grid whose sites answer at once (no training):
an honest site returns the global model moved a little, a malicious one returns what the test makes it
send. Real processes over Flower's transport are tests/test_faults.py's.
"""

from __future__ import annotations

import os
import tempfile

# Flower writes into FLWR_HOME (default ~/.flwr) when imported: keep tests out of the user's folder.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import math  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedMedian  # noqa: E402

from bench.faulty_site.malformed_replies import (  # noqa: E402
    INFLATED_WEIGHT,
    KINDS,
    honest_training_content,
    malformed_training_reply,
)
from contract.reply_schema import (  # noqa: E402
    ArraySpec,
    evaluation_reply_schema,
    training_reply_schema,
)
from contract.run_config import ROBUST_STRATEGIES, RunConfig  # noqa: E402
from contract.version import CONTRACT_VERSION  # noqa: E402
from models.errors import NeurofedError  # noqa: E402
from server.audit_log import AuditLog  # noqa: E402
from server.federated_run import FederatedRun  # noqa: E402
from server.reply_checks import check_reply, update_norm  # noqa: E402
from server.run_directory import RunDirectory  # noqa: E402
from server.strategies import make_strategy, round_aggregator, too_few_updates  # noqa: E402
from server.update_screening import aggregation_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")

CLASSES = ("csf", "grey_matter", "white_matter")
Tamper = Callable[[Message, Message], Message | None]
"""``tamper(instruction, honest_reply) -> the reply sent`` (None: the honest one)."""


def _honest(instruction: Message, node_id: int) -> Message:
    """What an honest site of the scripted grid answers (no training: the model moved a little)."""
    kind = instruction.metadata.message_type
    if kind == "query":
        site = ConfigRecord(
            {
                "site-id": f"site-{node_id}",
                "role": "train",
                "contract-version": CONTRACT_VERSION,
                "plan": "{}",
            }
        )
        content = RecordDict({"site": site, "metrics": MetricRecord({"num-train": 3, "num-test": 2})})
    elif kind == "train":
        content = honest_training_content(instruction)
        content["metrics"]["train-loss"] = 0.5
    else:
        metrics = {"num-examples": 2, "dice-mean": 0.5}
        metrics.update({f"{m}-{c}": 0.5 for c in CLASSES for m in ("dice", "hd95", "assd")})
        content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=instruction)


class ScriptedGrid:
    """The part of a Flower Grid `FederatedRun` uses; node ``n``'s replies go through ``tampers[n]``."""

    def __init__(self, nodes: list[int], tampers: dict[int, Tamper] | None = None) -> None:
        self.nodes = list(nodes)
        self.tampers = tampers or {}
        self.sent: list[tuple[int, str, int]] = []
        """(node, message type, round) of every message sent."""

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        from flwr.supercore.task_identity import TaskIdentity

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = m.object_id  # what the real Grid does when it sends
            self.sent.append((node, m.metadata.message_type, int(m.content["config"]["server-round"])))
            TaskIdentity.node_id = node  # a reply's sender is the process's node identity
            try:
                honest = _honest(m, node)
                tamper = self.tampers.get(node)
                replies.append((tamper(m, honest) if tamper else None) or honest)
            finally:
                TaskIdentity.node_id = 0
        return replies


def _config(tmp_path, **changes) -> RunConfig:
    settings = {
        "num_rounds": 2,
        "num_sites": 4,
        "unseen_sites": 0,
        "eval_every": 2,
        "dp": False,
        "initial_model": "none",  # the scripted sites' plan is no real preprocessing
        "run_dir": str(tmp_path / "run"),
        **changes,
    }
    return RunConfig(**settings)


def _run(tmp_path, tampers: dict[int, Tamper], nodes=(1, 2, 3, 4), **changes):
    config = _config(tmp_path, num_sites=len(nodes), **changes)
    grid = ScriptedGrid(list(nodes), tampers)
    final = FederatedRun(config, grid).execute()
    return final, RunDirectory(config.run_dir).read_events(), grid


def _train_only(change: Callable[[Message, Message], Message]) -> Tamper:
    return lambda m, honest: change(m, honest) if m.metadata.message_type == "train" else None


def _metrics(**values) -> Tamper:
    def tamper(m: Message, honest: Message) -> Message:
        metrics = {**dict(honest.content["metrics"]), **values}
        metrics = {k: v for k, v in metrics.items() if v is not None}
        content = RecordDict({"arrays": honest.content["arrays"], "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=m)

    return _train_only(tamper)


def _malformed(kind: str) -> Tamper:
    return _train_only(lambda m, honest: malformed_training_reply(kind, m, honest.content))


REJECTED_KINDS = sorted(k for k in KINDS if k != INFLATED_WEIGHT)


@pytest.mark.parametrize("kind", REJECTED_KINDS)
def test_a_malformed_training_reply_is_rejected_and_the_run_finishes(tmp_path, kind) -> None:
    final, events, _ = _run(tmp_path, {2: _malformed(kind)})
    says = KINDS[kind]
    rejected = [e for e in events if e["event"] == "rejected"]
    assert [(e["site"], e["round"], e["stage"]) for e in rejected] == [
        ("site-2", 1, "training"),
        ("site-2", 2, "training"),
    ]
    assert says in rejected[0]["reason"], rejected[0]["reason"]
    assert all(np.isfinite(v.numpy()).all() for v in final.values())
    trained = {(e["site"], e["round"]) for e in events if e["event"] == "train"}
    assert trained == {(f"site-{n}", r) for n in (1, 3, 4) for r in (1, 2)}
    assert [e["round"] for e in events if e["event"] == "aggregate-train" and not e.get("skipped")] == [1, 2]
    assert events[-1]["event"] == "finished"


def test_withheld_metrics_are_allowed_and_the_others_aggregated(tmp_path) -> None:
    _, events, _ = _run(tmp_path, {3: _metrics(**{"train-loss": None, "seconds": None})})
    assert not [e for e in events if e["event"] == "rejected"]
    aggregated = [e for e in events if e["event"] == "aggregate-train"]
    # Flower's FedAvg averages the metrics every accepted reply sent.
    assert set(aggregated[0]["metrics"]) == {"steps"}


def test_an_inflated_weight_is_capped_at_twice_the_median_of_the_others(tmp_path) -> None:
    _, events, _ = _run(tmp_path, {2: _malformed(INFLATED_WEIGHT)})
    weights = {e["site"]: e["weight"] for e in events if e["event"] == "train" and e["round"] == 1}
    # The others report 3; the site declared 3 training subjects at discovery: 3 (not 2 x 3, not 1e9).
    assert weights == {"site-1": 3.0, "site-2": 3.0, "site-3": 3.0, "site-4": 3.0}
    assert aggregation_weights([3, 3, 1e9], [None, None, None], "capped") == [3.0, 3.0, 6.0]
    assert aggregation_weights([3, 4, 1e9], [3, 4, 50], "uniform") == [1.0, 1.0, 1.0]
    assert aggregation_weights([1e9, 2], [None, None], "capped") == [4.0, 2.0]


def test_a_huge_update_alone_is_rejected_by_the_absolute_cap(tmp_path) -> None:
    # One training site: no other update to compare with, the absolute cap still applies; with no usable
    # update left the round cannot be aggregated and the run stops, naming the site and the cap.
    with pytest.raises(
        NeurofedError, match=r"site-1 rejected: update norm .* above the cap of 1000 \(update-norm-cap\)"
    ):
        _run(tmp_path, {1: _malformed("scaled x1e6")}, nodes=(1,))
    events = RunDirectory(str(tmp_path / "run")).read_events()
    (rejected,) = [e for e in events if e["event"] == "rejected"]
    assert "update-norm-cap" in rejected["reason"] and rejected["update_norm"] > 1000
    assert not [e for e in events if e["event"] == "aggregate-train"]


def test_update_norm_does_not_overflow_and_check_reply_names_dtype_and_shape() -> None:
    site = {"w": np.full((1000,), 1e200)}
    assert update_norm(site, {"w": np.zeros(1000, np.float32)}) == pytest.approx(1e200 * math.sqrt(1000))
    assert update_norm({"w": np.array([1.7e308, -1.7e308])}, {"w": np.array([-1.7e308, 1.7e308])}) == math.inf
    schema = training_reply_schema(_config_plain(), {"w": ArraySpec((2, 2), "float32")})
    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})

    def reply(values: np.ndarray, **metrics) -> Message:
        from flwr.app import MessageType

        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(values)}),
                "metrics": MetricRecord({"num-examples": 2, **metrics}),
            }
        )
        return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)

    assert check_reply(reply(np.ones((2, 2), np.float32)), schema, global_arrays).accepted
    wrong_dtype = check_reply(reply(np.ones((2, 2), np.float64)), schema, global_arrays)
    assert "float64 (2, 2)" in wrong_dtype.reason and "float32 (2, 2)" in wrong_dtype.reason
    assert "float32 (4,)" in check_reply(reply(np.ones(4, np.float32)), schema, global_arrays).reason
    big = check_reply(reply(np.full((2, 2), 1e30, np.float32)), schema, global_arrays)
    assert not big.accepted and big.update_norm == pytest.approx(2e30, rel=1e-6)


def _config_plain(**changes) -> RunConfig:
    return RunConfig(dp=False, **changes)


def test_evaluation_metrics_have_ranges_and_undefined_distances_are_allowed() -> None:
    schema = evaluation_reply_schema(_config_plain())
    good = {"num-examples": 2, "dice-csf": 0.4, "hd95-csf": math.nan}
    assert schema.metrics_problem(good) is None
    assert "outside" in schema.metrics_problem({**good, "dice-csf": 1.5})
    assert "is NaN" in schema.metrics_problem({**good, "num-examples": math.nan})
    assert "does not allow" in schema.metrics_problem({**good, "personal-dice-csf": 0.4})
    assert (
        evaluation_reply_schema(_config_plain(), personal=True).metrics_problem(
            {**good, "personal-dice-csf": 0.4}
        )
        is None
    )


def test_a_malformed_evaluation_is_rejected_and_left_out_of_the_aggregate(tmp_path) -> None:
    def bad_evaluation(m: Message, honest: Message) -> Message | None:
        if m.metadata.message_type != "evaluate":
            return None
        metrics = {**dict(honest.content["metrics"]), "dice-csf": 7.0, "num-examples": 10**9}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=m)

    audit = AuditLog(tmp_path / "audit.jsonl")
    config = _config(tmp_path)
    FederatedRun(config, ScriptedGrid([1, 2, 3, 4], {4: bad_evaluation}), audit=audit).execute()
    events = RunDirectory(config.run_dir).read_events()
    (rejected,) = [e for e in events if e["event"] == "rejected"]
    assert (rejected["site"], rejected["stage"], rejected["round"]) == ("site-4", "evaluation", 2)
    assert "dice-csf" in rejected["reason"]
    (aggregate,) = [e for e in events if e["event"] == "aggregate-evaluate"]
    assert aggregate["metrics"]["dice-csf"] == pytest.approx(0.5)
    assert {e["site"] for e in events if e["event"] == "evaluate"} == {"site-1", "site-2", "site-3"}
    # The audit log names it too, and does not count it among the evaluated sites.
    entries = audit.read()
    (logged,) = [e for e in entries if e["event"] == "site-rejected"]
    assert (logged["site"], logged["stage"], logged["round"]) == ("site-4", "evaluation", 2)
    (evaluated,) = [e for e in entries if e["event"] == "round-evaluated"]
    assert (
        evaluated["evaluated"] == ["site-1", "site-2", "site-3"]
        and evaluated["rejected"][0]["site"] == "site-4"
    )


def test_no_site_moves_a_layer_the_run_does_not_train(tmp_path) -> None:
    sent: dict[str, np.ndarray] = {}

    def moves_everything(m: Message, honest: Message) -> Message | None:
        if m.metadata.message_type != "train":
            return None
        if int(m.content["config"]["server-round"]) == 1:
            sent.update({k: a.numpy().copy() for k, a in m.content["arrays"].items()})
        arrays = ArrayRecord(
            {k: Array(a.numpy() + np.float32(0.05)) for k, a in honest.content["arrays"].items()}
        )
        return Message(RecordDict({"arrays": arrays, "metrics": honest.content["metrics"]}), reply_to=m)

    final, _, _ = _run(tmp_path, {1: moves_everything}, trainable_layers="norm")
    from models.networks import build_network
    from models.trainable import trainable_names

    network = build_network(_config(tmp_path, trainable_layers="norm").network_config())
    trained = trainable_names(network, "norm")
    frozen = {name for name, _ in network.named_parameters()} - trained
    assert frozen and trained
    for name in frozen:
        # The global values (up to the mean's float32 round-off), not the 0.05 the malicious site added.
        np.testing.assert_allclose(final[name].numpy(), sent[name], rtol=0, atol=1e-6, err_msg=name)
    assert any(not np.array_equal(final[name].numpy(), sent[name]) for name in trained)


def test_with_two_training_sites_a_tiny_update_cannot_get_the_honest_one_rejected() -> None:
    from server.update_screening import norm_outliers

    assert norm_outliers([1.0, 1e-4], 10.0) == [None, None]  # each would be the other's only yardstick
    assert norm_outliers([1.0, 1.1, 100.0], 10.0)[2] is not None and norm_outliers([1.0, 1.1, 100.0], 10.0)[
        :2
    ] == [None, None]


def test_a_malformed_site_description_leaves_that_site_out_of_the_run(tmp_path) -> None:
    def no_site_record(m: Message, honest: Message) -> Message | None:
        if m.metadata.message_type != "query":
            return None
        return Message(RecordDict({"metrics": honest.content["metrics"]}), reply_to=m)

    def other_plan(m: Message, honest: Message) -> Message | None:
        if m.metadata.message_type != "query":
            return None
        site = ConfigRecord(
            {
                "site-id": "site-3",
                "role": "train",
                "contract-version": CONTRACT_VERSION,
                "plan": '{"grid": 2}',
            }
        )
        return Message(RecordDict({"site": site, "metrics": honest.content["metrics"]}), reply_to=m)

    _, events, grid = _run(tmp_path, {2: no_site_record, 3: other_plan})
    rejected = {e["site"]: e["reason"] for e in events if e["event"] == "rejected"}
    assert set(rejected) == {"node 2", "site-3"}
    assert "records" in rejected["node 2"] and "plan" in rejected["site-3"]
    (sites,) = [e["sites"] for e in events if e["event"] == "sites"]
    assert [s["site"] for s in sites] == ["site-1", "site-4"]
    assert {node for node, kind, _ in grid.sent if kind == "train"} == {1, 4}


def test_only_enrolled_nodes_under_their_enrolled_name_take_part_and_a_revoked_one_leaves(tmp_path) -> None:
    enrolled = {1: "site-1", 2: "site-2", 3: "hospital-c"}  # node 3 declares site-3; node 4 is not enrolled
    audit = AuditLog(tmp_path / "audit.jsonl")
    grid = ScriptedGrid([1, 2, 3, 4])
    config = _config(tmp_path, num_sites=3, num_rounds=3, eval_every=3)
    run = FederatedRun(config, grid, audit=audit, enrolment=lambda: dict(enrolled))
    original = run._send

    def send(messages, what, server_round, required=None):
        replies = original(messages, what, server_round, required)
        if what == "training" and server_round == 1:
            del enrolled[2]  # `neurofed coordinator revoke site-2` while the site is online
        return replies

    run._send = send  # type: ignore[method-assign]
    run.execute()
    assert {n for n, kind, _ in grid.sent if kind == "query"} == {1, 2, 3}  # node 4 is never asked anything
    trained = {(n, r) for n, kind, r in grid.sent if kind == "train"}
    assert trained == {(1, 1), (2, 1), (1, 2), (1, 3)}
    assert {n for n, kind, _ in grid.sent if kind == "evaluate"} == {1}
    events = RunDirectory(config.run_dir).read_events()
    rejected = {(e["site"], e["stage"], e["round"]): e["reason"] for e in events if e["event"] == "rejected"}
    assert set(rejected) == {
        ("node 4", "discovery", 0),
        ("hospital-c", "discovery", 0),
        ("site-2", "enrolment", 2),
    }
    assert "not enrolled" in rejected[("node 4", "discovery", 0)]
    assert "enrolled as 'hospital-c'" in rejected[("hospital-c", "discovery", 0)]
    assert "revoked" in rejected[("site-2", "enrolment", 2)]
    logged = [(e["site"], e["stage"]) for e in audit.read() if e["event"] == "site-rejected"]
    assert sorted(logged) == [("hospital-c", "discovery"), ("node 4", "discovery"), ("site-2", "enrolment")]


def _poisoned_round(strategy_name: str, n: int = 7, **changes):
    """Aggregate n updates of which the last is the honest mean moved by 100 in every coordinate."""
    from contract.reply_schema import declined_reply_schema
    from server.update_screening import TrainingSchemas, screen_training_replies

    config = RunConfig(
        strategy=strategy_name, num_sites=n, unseen_sites=0, dp=False, update_norm_limit=0, **changes
    )
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(50,)).astype(np.float32)}
    global_arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
    replies = []
    from flwr.app import MessageType

    for i in range(n):
        shift = 100.0 if i == n - 1 else rng.normal(0, 0.01, size=50)
        arrays = ArrayRecord({"w": Array((base["w"] + shift).astype(np.float32))})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3})})
        replies.append(Message(content=content, dst_node_id=i + 1, message_type=MessageType.TRAIN))
    schemas = TrainingSchemas(
        training_reply_schema(config, {"w": ArraySpec((50,), "float32")}),
        declined_reply_schema(config),
        norm_limit=0,
    )
    screened = screen_training_replies(
        1, replies, global_arrays, schemas, lambda r: {"site": "s", "role": "train"}
    )
    assert len(screened.accepted) == n  # no norm rule: only the strategy stands between
    arrays, _ = make_strategy(config).aggregate_train(1, screened.accepted)
    return float(np.max(np.abs(arrays["w"].numpy() - base["w"])))


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_strategies_withstand_one_update_moved_by_100(name) -> None:
    assert _poisoned_round("fedavg") > 10  # the plain mean is dragged by 100/7
    assert _poisoned_round(name) < 0.1


def test_robust_strategy_settings_are_checked_and_too_few_updates_skip_a_round() -> None:
    with pytest.raises(NeurofedError, match="needs at least 5 training sites"):
        RunConfig(strategy="krum", num_sites=4, unseen_sites=0)
    with pytest.raises(NeurofedError, match="needs at least 7 training sites"):
        RunConfig(strategy="bulyan", num_sites=7, unseen_sites=1)
    with pytest.raises(NeurofedError, match="site-level DP"):
        RunConfig(strategy="fedmedian", server_dp="fixed")
    with pytest.raises(NeurofedError, match="trimmed-fraction"):
        RunConfig(strategy="fedtrimmedavg", trimmed_fraction=0.5)
    config = RunConfig(strategy="bulyan", num_sites=8, unseen_sites=1)
    assert "needs at least 7" in too_few_updates(config, 6)
    assert too_few_updates(config, 7) is None
    assert too_few_updates(RunConfig(strategy="fedavg"), 1) is None


def test_a_robust_round_the_screening_left_short_is_aggregated_by_the_median_not_skipped() -> None:
    """Bulyan with f = 1 needs 7 updates; the screening rejected one of 7, and the 6 left (one of them
    still malicious) are aggregated by the coordinate-wise median, which withstands it."""
    config = RunConfig(strategy="bulyan", num_sites=8, unseen_sites=1, byzantine_sites=1)
    bulyan = make_strategy(config)
    assert round_aggregator(bulyan, config, 7) == (bulyan, None)
    median, why = round_aggregator(bulyan, config, 6)
    assert isinstance(median, FedMedian) and "6 accepted" in why and "fedmedian" in why
    from flwr.app import MessageType

    updates = [np.full(4, 1.0 + 0.01 * i, np.float32) for i in range(5)] + [np.full(4, 100.0, np.float32)]
    replies = [
        Message(
            content=RecordDict(
                {"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"num-examples": 3})}
            ),
            dst_node_id=i + 1,
            message_type=MessageType.TRAIN,
        )
        for i, w in enumerate(updates)
    ]
    arrays, _ = median.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 1.025, atol=0.01)  # the median of the honest five and the 100
    assert round_aggregator(bulyan, config, 2)[0] is None  # the median needs 2f + 1 = 3
    assert "global model is unchanged" in round_aggregator(bulyan, config, 2)[1]
    assert round_aggregator(make_strategy(RunConfig()), RunConfig(), 1)[1] is None


def test_a_run_whose_last_training_site_is_revoked_stops_with_a_reason_instead_of_waiting(tmp_path) -> None:
    enrolled = {1: "site-1"}
    config = _config(tmp_path, num_sites=1, num_rounds=2)
    run = FederatedRun(config, ScriptedGrid([1]), enrolment=lambda: dict(enrolled))
    original = run._send

    def send(messages, what, server_round, required=None):
        replies = original(messages, what, server_round, required)
        if what == "training":
            enrolled.clear()  # revoked after round 1
        return replies

    run._send = send  # type: ignore[method-assign]
    with pytest.raises(NeurofedError, match=r"round 2: 0 enrolled training site\(s\) left"):
        run.execute()
