"""The model's arrays travel packed between the coordinator and a site's ClientApp, and arrive unchanged.

Packing is a transport matter (contract/packed_arrays.py): everything on either side (handlers, worker,
screening, strategies) sees the ordinary ArrayRecord. The deployment tests (tests/test_deployment.py) run
whole jobs through it; these check its parts.
"""

from __future__ import annotations

import os
import tempfile

# Flower writes into FLWR_HOME (default ~/.flwr) when imported: keep tests out of the user's folder.
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-test-flwr-"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

import client.app as client_app  # noqa: E402
from contract.packed_arrays import (  # noqa: E402
    any_packed,
    pack_arrays,
    packed_content,
    unpack_arrays,
    unpacked_content,
)
from contract.reply_schema import ArraySpec, training_reply_schema  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402
from contract.wire import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, PACKED_DATA, PACKED_LAYOUT  # noqa: E402
from models.networks import build_network  # noqa: E402
from server.reply_checks import check_reply  # noqa: E402
from server.site_replies import send_and_wait  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")


def _network_arrays() -> ArrayRecord:
    """The default network's state dict, plus tensors of other dtypes and shapes."""
    state = build_network(RunConfig().network_config(), seed=0).state_dict()
    record = ArrayRecord(state)
    record["a-scalar"] = Array(np.array(7, dtype=np.int64))
    record["empty"] = Array(np.zeros((0, 3), dtype=np.float32))
    record["half"] = Array(np.arange(6, dtype=np.float16).reshape(2, 3))
    return record


def _assert_same(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got.keys()) == list(expected.keys())
    for name in expected:
        a, b = got[name].numpy(), expected[name].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_packing_makes_two_arrays_of_any_record_and_unpacking_gives_it_back_bit_for_bit() -> None:
    record = _network_arrays()
    packed = pack_arrays(record)
    assert list(packed.keys()) == [PACKED_DATA, PACKED_LAYOUT]
    assert packed[PACKED_DATA].numpy().nbytes == sum(a.numpy().nbytes for a in record.values())
    _assert_same(unpack_arrays(packed), record)


def test_only_array_records_are_packed_and_the_original_content_is_left_alone() -> None:
    arrays = _network_arrays()
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: ConfigRecord({"server-round": 3})})
    packed = packed_content(content)
    assert any_packed(packed) and not any_packed(content)
    assert list(content[ARRAYS_RECORD].keys()) == list(arrays.keys())  # not changed in place
    assert packed[CONFIG_RECORD]["server-round"] == 3
    unpacked = unpacked_content(packed)
    _assert_same(unpacked[ARRAYS_RECORD], arrays)
    assert unpacked[CONFIG_RECORD]["server-round"] == 3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data, layout: (data[:-4], layout), "runs past the end"),
        (lambda data, layout: (np.concatenate([data, np.zeros(4, np.uint8)]), layout), "does not describe"),
        (lambda data, layout: (data, np.frombuffer(b"not json", np.uint8)), "readable layout"),
        (lambda data, layout: (data, np.frombuffer(b'[["x", "|O", [1]]]', np.uint8)), "holds objects"),
    ],
)
def test_a_malformed_packed_record_is_refused(damage, message) -> None:
    packed = pack_arrays(ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}))
    data, layout = damage(packed[PACKED_DATA].numpy(), packed[PACKED_LAYOUT].numpy())
    with pytest.raises(ValueError, match=message):
        unpack_arrays(ArrayRecord({PACKED_DATA: Array(data), PACKED_LAYOUT: Array(layout)}))


def _instruction(arrays: ArrayRecord) -> Message:
    content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=5, message_type="train")


def test_the_site_app_unpacks_for_its_handler_and_packs_its_reply(monkeypatch) -> None:
    from client import site_handlers

    seen: list[list[str]] = []

    def doubling_handler(msg: Message, context: Context) -> Message:
        arrays = msg.content[ARRAYS_RECORD]
        seen.append(list(arrays.keys()))
        doubled = ArrayRecord({k: Array(v.numpy() * 2) for k, v in arrays.items()})
        return Message(
            RecordDict({ARRAYS_RECORD: doubled, METRICS_RECORD: MetricRecord({"x": 1})}), reply_to=msg
        )

    monkeypatch.setitem(site_handlers.HANDLERS, "train", doubling_handler)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    arrays = ArrayRecord(
        {"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.arange(3, dtype=np.float32))}
    )

    plain = client_app.train(_instruction(arrays), context)
    packed = client_app.train(
        Message(packed_content(_instruction(arrays).content), dst_node_id=5, message_type="train"), context
    )
    assert seen == [["w", "b"], ["w", "b"]]  # the handler saw the tensors either way
    assert not any_packed(plain.content) and any_packed(packed.content)  # the reply travels as it came
    _assert_same(unpacked_content(packed.content)[ARRAYS_RECORD], plain.content[ARRAYS_RECORD])


class _RecordingGrid(Grid):
    """A Flower Grid whose one site answers through ``answer``; keeps what was pushed."""

    def __init__(self, answer) -> None:
        self.answer, self.pushed, self.replies = answer, [], {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed.append(m)
            self.replies[f"m{i}"] = self.answer(m)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def create_message(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self):  # pragma: no cover - not used
        return [5]

    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - must not be used
        raise AssertionError("send_and_wait must push and pull")


def test_the_coordinator_sends_packed_and_reads_replies_unpacked() -> None:
    arrays = ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})

    def site(m: Message) -> Message:
        got = unpacked_content(m.content)[ARRAYS_RECORD]
        return Message(packed_content(RecordDict({ARRAYS_RECORD: got})), reply_to=m)

    grid = _RecordingGrid(site)
    (reply,) = send_and_wait(grid, [_instruction(arrays)], timeout_s=5)
    assert list(grid.pushed[0].content[ARRAYS_RECORD].keys()) == [PACKED_DATA, PACKED_LAYOUT]
    _assert_same(reply.content[ARRAYS_RECORD], arrays)


def test_the_global_model_every_site_gets_is_packed_once(monkeypatch) -> None:
    import contract.packed_arrays as packing

    packs: list[int] = []
    pack = packing.pack_arrays
    monkeypatch.setattr(packing, "pack_arrays", lambda record: packs.append(id(record)) or pack(record))
    shared, own = (
        ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}),
        ArrayRecord({"w": Array(np.zeros(3))}),
    )
    grid = _RecordingGrid(lambda m: Message(RecordDict({}), reply_to=m))
    send_and_wait(grid, [_instruction(shared), _instruction(shared), _instruction(own)], timeout_s=5)
    assert packs == [id(shared), id(own)]
    pushed = [m.content[ARRAYS_RECORD] for m in grid.pushed]
    assert pushed[0] is pushed[1] and pushed[2] is not pushed[0]
    _assert_same(unpacked_content(grid.pushed[2].content)[ARRAYS_RECORD], own)


def test_a_reply_with_broken_packing_reaches_the_screening_as_it_came_and_is_rejected() -> None:
    arrays = ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})

    def broken_site(m: Message) -> Message:
        packed = pack_arrays(arrays)
        packed[PACKED_DATA] = Array(packed[PACKED_DATA].numpy()[:-4])
        return Message(
            RecordDict({ARRAYS_RECORD: packed, METRICS_RECORD: MetricRecord({"num-examples": 2})}), reply_to=m
        )

    (reply,) = send_and_wait(_RecordingGrid(broken_site), [_instruction(arrays)], timeout_s=5)
    schema = training_reply_schema(RunConfig(dp=False), {"w": ArraySpec(shape=(2, 3), dtype="float32")})
    check = check_reply(reply, schema, arrays)
    assert not check.accepted and PACKED_DATA in check.reason
