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
        # Pushed and pulled here, every 50 ms: Grid.send_and_receive would wait 3 s between its checks.
        (sent,) = grid.push_messages([Message(RecordDict(), dst_node_id=nodes[0], message_type="query")])
        replies: list[Message] = []
        while not replies:
            time.sleep(0.05)
            replies = list(grid.pull_messages([sent]))
        if replies[0].has_error():
            raise RuntimeError(f"the empty ClientApp failed: {replies[0].error}")
        seconds.append(time.perf_counter() - started)
    Path(str(context.run_config["timings-file"])).write_text(json.dumps(seconds))
