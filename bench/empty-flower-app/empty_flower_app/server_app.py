"""Sends ``messages`` queries, one after another, to the first SuperNode; writes each round trip's seconds."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes: list[int] = []
    while not nodes:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.1)
    seconds = []
    for _ in range(int(context.run_config["messages"])):
        started = time.perf_counter()
        (reply,) = grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=nodes[0], message_type="query")], timeout=300
        )
        if reply.has_error():
            raise RuntimeError(f"the empty ClientApp failed: {reply.error}")
        seconds.append(time.perf_counter() - started)
    Path(str(context.run_config["timings-file"])).write_text(json.dumps(seconds))
