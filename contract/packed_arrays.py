"""A message's model arrays as one Array each way, so that a deployed message costs a few requests, not
two per tensor.

Flower 1.41 moves every Array of a message as objects of its own (the Array and its chunks): a deployed
site pulls each from the SuperLink, and pushes each of its reply's, in a request of its own over TLS,
about 15 ms apiece on loopback. The tiny network's 37 tensors made 74 requests each way, 3.4 s of every
message (BENCHMARKS.md, "Seconds per message, deployed"). So the coordinator packs each ArrayRecord it
sends into two arrays, `PACKED_DATA` (every tensor's bytes back to back) and `PACKED_LAYOUT` (their
names, dtypes and shapes, as JSON), the site's ClientApp unpacks the message before anything reads it and
packs its reply the same way, and the coordinator unpacks the replies before anything reads them
(server/site_replies.py, client/app.py). Both ends belong to the same app bundle; the site's worker, the
handlers, the screening and every strategy see the ordinary ArrayRecord, tensor by tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from contract.wire import PACKED_DATA, PACKED_LAYOUT


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_LAYOUT in record


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one ArrayRecord of two arrays (`PACKED_DATA`, `PACKED_LAYOUT`), keys in their order."""
    tensors = {name: array.numpy() for name, array in record.items()}  # tobytes() writes C order
    layout = [[name, t.dtype.str, list(t.shape)] for name, t in tensors.items()]
    data = np.frombuffer(b"".join(t.tobytes() for t in tensors.values()), dtype=np.uint8)
    encoded = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED_DATA: Array(data), PACKED_LAYOUT: Array(encoded)})


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord `pack_arrays` packed; ValueError when the layout does not describe the data."""
    try:
        layout = json.loads(record[PACKED_LAYOUT].numpy().tobytes())
        data = record[PACKED_DATA].numpy()
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"a packed array record without a readable layout ({exc})") from None
    arrays: dict[str, Array] = {}
    offset = 0
    for name, dtype, shape in layout:
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise ValueError(f"packed array {name!r}: dtype {dtype} holds objects")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > data.size:
            raise ValueError(f"packed array {name!r} runs past the end of the packed data")
        arrays[name] = Array(data[offset : offset + size].view(dtype).reshape(shape))
        offset += size
    if offset != data.size:
        raise ValueError(f"the packed data holds {data.size - offset} bytes its layout does not describe")
    return ArrayRecord(arrays)


def any_packed(content: RecordDict) -> bool:
    return any(isinstance(r, ArrayRecord) and is_packed(r) for r in content.values())


PackedRecords = dict[int, tuple[ArrayRecord, ArrayRecord]]
"""ArrayRecords already packed: ``id(original) -> (original, packed)`` (the original kept, so its id stays its)."""


def packed_content(content: RecordDict, packed: PackedRecords | None = None) -> RecordDict:
    """A new RecordDict: ``content`` with every ArrayRecord packed (the other records as they are).

    ``packed``: records packed before, filled in here: the messages of one round all carry the same global
    model, which is then packed once, not once per site."""
    packed = {} if packed is None else packed
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and len(record):
            if id(record) not in packed:
                packed[id(record)] = (record, pack_arrays(record))
            record = packed[id(record)][1]
        out[key] = record
    return out


def unpacked_content(content: RecordDict) -> RecordDict:
    """A new RecordDict: ``content`` with every packed ArrayRecord unpacked; ValueError when one is malformed."""
    return RecordDict(
        {
            k: unpack_arrays(r) if isinstance(r, ArrayRecord) and is_packed(r) else r
            for k, r in content.items()
        }
    )


def answer_as_sent(msg: Message, answer: Callable[[Message], Message]) -> Message:
    """``answer(msg)`` with ``msg``'s arrays unpacked first, and the reply's packed when ``msg``'s were:
    a site's side of the packed transport."""
    packed = msg.has_content() and any_packed(msg.content)
    if packed:
        msg.content = unpacked_content(msg.content)
    reply = answer(msg)
    if packed and reply.has_content():
        reply.content = packed_content(reply.content)
    return reply
