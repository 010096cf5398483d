"""Answers every query at once, with one metric: what a message costs when the app does nothing."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"answer": MetricRecord({"ok": 1})}), reply_to=msg)
