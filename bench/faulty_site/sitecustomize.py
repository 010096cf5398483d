"""Fault injection for real-process tests and benchmarks: Python imports this file at the start of every
process whose PYTHONPATH holds this folder (the ``sitecustomize`` hook), so a site or coordinator daemon
started with it passes it on to each process Flower starts. Nothing changes unless NEUROFED_FAULT is set:

- ``NEUROFED_FAULT=site:KIND,KIND,...`` (a malicious site): its ClientApp answers the training message of
  round r with the ((r - 1) mod n)-th malformed reply of that list (malformed_replies.py, built from the
  global arrays it was sent, without training) and every evaluation with a Dice of 7; it describes itself
  honestly at site discovery, so it takes part.
- ``NEUROFED_FAULT=checkpoint:DIR`` (the coordinator): the ServerApp, about to move the model file of round
  N's checkpoint into place (its strategy-state file already written), writes ``DIR/paused-round-N`` and
  waits for ever when ``DIR/pause-round-N`` exists, so that a test can kill it in mid-checkpoint.

The patches are applied when Flower's ``flwr.clientapp.client_app`` / neurofed's ``models.model_file`` is
first imported, wherever it is imported from (the site and the ServerApp import the app bundle's copy).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after the module ``name`` is executed."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        execute, patch = spec.loader.exec_module, self.patch

        def exec_module(module) -> None:
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _malicious_client_app(module) -> None:
    kinds = os.environ["NEUROFED_FAULT"].removeprefix("site:").split(",")
    honest_call = module.ClientApp.__call__

    def call(self, message, context):
        from flwr.app import Message, MetricRecord, RecordDict
        from malformed_replies import honest_training_content, malformed_training_reply

        kind = message.metadata.message_type
        if kind == "train":
            server_round = int(message.content["config"]["server-round"])
            chosen = kinds[(server_round - 1) % len(kinds)]
            print(f"faulty site: round {server_round} answered with {chosen!r}", flush=True)
            return malformed_training_reply(chosen, message, honest_training_content(message))
        if kind == "evaluate":
            metrics = MetricRecord({"num-examples": 2, "dice-mean": 7.0})
            return Message(RecordDict({"metrics": metrics}), reply_to=message)
        return honest_call(self, message, context)

    module.ClientApp.__call__ = call


def _pausing_checkpoints(module) -> None:
    control = Path(os.environ["NEUROFED_FAULT"].removeprefix("checkpoint:"))
    atomic_write = module.atomic_write

    def write(path, content, **kwargs):
        path = Path(path)
        if path.parent.name == "checkpoints" and (control / f"pause-{path.stem}").exists():
            content(path.with_name(f".{path.name}.partial"))  # half-way: written, not yet moved into place
            (control / f"paused-{path.stem}").touch()
            while True:
                time.sleep(1)
        return atomic_write(path, content, **kwargs)

    module.atomic_write = write


_FAULT = os.environ.get("NEUROFED_FAULT", "")
if _FAULT.startswith("site:"):
    sys.meta_path.insert(0, _PatchAfterImport("flwr.clientapp.client_app", _malicious_client_app))
elif _FAULT.startswith("checkpoint:"):
    sys.meta_path.insert(0, _PatchAfterImport("models.model_file", _pausing_checkpoints))
