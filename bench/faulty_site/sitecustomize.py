"""Fault injection for real-process tests and benchmarks: Python imports this file at the start of every
process whose PYTHONPATH holds this folder (the ``sitecustomize`` hook), so a site or coordinator daemon
started with it passes it on to each process Flower starts. Nothing changes unless NEUROFED_FAULT is set:

- ``NEUROFED_FAULT=site:DIR:KIND,KIND,...`` (a malicious site): its ClientApp answers its n-th training
  message (counted in ``DIR/site-training-messages``, over every run) with the (n mod len)-th malformed
  reply of that list (malformed_replies.py, built from the global arrays it was sent, without training)
  and every evaluation with a Dice of 7; it describes itself honestly at site discovery, so it takes part.
- ``NEUROFED_FAULT=checkpoint:DIR`` (the coordinator): while ``DIR/pause-round-NNN`` exists, the ServerApp,
  about to move the model file of round N's checkpoint into place (its strategy-state file already
  written, the model half-way in a temporary file), writes ``DIR/paused-round-NNN`` and waits; a test kills
  it there, or removes the pause file to let it go on.

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
    control, kinds = os.environ["NEUROFED_FAULT"].removeprefix("site:").rsplit(":", 1)
    counter = Path(control) / "site-training-messages"
    honest_call = module.ClientApp.__call__

    def call(self, message, context):
        from flwr.app import Message, MetricRecord, RecordDict
        from malformed_replies import honest_training_content, malformed_training_reply

        kind = message.metadata.message_type
        if kind == "train":
            # The app bundle is importable once Flower loaded it. The site speaks the bundle's transport: the
            # model arrives packed, and the malformed reply goes back packed, so the coordinator's screening
            # (not the unpacking) judges what the site did.
            from contract.packed_arrays import answer_as_sent

            sent = int(counter.read_text()) if counter.is_file() else 0
            counter.write_text(str(sent + 1))
            chosen = kinds.split(",")[sent % len(kinds.split(","))]

            def malformed(unpacked):
                server_round = int(unpacked.content["config"]["server-round"])
                print(f"faulty site: round {server_round} answered with {chosen!r}", flush=True)
                return malformed_training_reply(chosen, unpacked, honest_training_content(unpacked))

            return answer_as_sent(message, malformed)
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
        pause = control / f"pause-{path.stem}"
        if path.parent.name == "checkpoints" and pause.exists():
            partial = path.with_name(f".{path.name}.partial")
            content(partial)  # half-way: written, not yet moved into place
            (control / f"paused-{path.stem}").touch()
            while pause.exists():
                time.sleep(0.2)
            partial.unlink()
        return atomic_write(path, content, **kwargs)

    module.atomic_write = write


_FAULT = os.environ.get("NEUROFED_FAULT", "")
if _FAULT.startswith("site:"):
    sys.meta_path.insert(0, _PatchAfterImport("flwr.clientapp.client_app", _malicious_client_app))
elif _FAULT.startswith("checkpoint:"):
    sys.meta_path.insert(0, _PatchAfterImport("models.model_file", _pausing_checkpoints))
