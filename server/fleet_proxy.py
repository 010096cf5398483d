"""The request-body cap of the coordinator's Fleet proxy (deploy/nginx/neurofed-fleet.conf).

A site uploads its model one object per request (Flower 1.41: each array, or each 5 MiB chunk of a larger
one, in its own ``/v1/fleet/push-object``), so no honest request body is larger than the model itself;
the proxy refuses bodies above twice the model of the federation's network (`body_size_limit`).

``python -m server.fleet_proxy [JOB.toml] [--set KEY=VALUE ...]`` prints the ``client_max_body_size``
line for those run settings (defaults: `contract.run_config.RunConfig`'s).
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from pathlib import Path

from contract.run_config import RunConfig

BODY_SIZE_FACTOR = 2
"""The proxy's cap, in models: room for framing and for a model a little larger than planned."""


def model_bytes(config: RunConfig) -> int:
    """Bytes of the parameters and buffers of the run's network (what one training reply carries)."""
    from models.networks import build_network

    state = build_network(config.network_config()).state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def body_size_limit(config: RunConfig) -> int:
    """The largest request body the proxy should pass for this run's network, in bytes."""
    return BODY_SIZE_FACTOR * model_bytes(config)


def nginx_size(size: int) -> str:
    """``size`` bytes as nginx writes a size, rounded up: ``300k``, ``10m``."""
    if size > 1024**2:
        return f"{math.ceil(size / 1024**2)}m"
    return f"{math.ceil(size / 1024)}k"


def main(argv: list[str] | None = None) -> int:
    from server.job_submission import parse_setting

    parser = argparse.ArgumentParser(
        prog="python -m server.fleet_proxy",
        description="Print the client_max_body_size of deploy/nginx/neurofed-fleet.conf for a run's network: "
        "twice the size of its model.",
    )
    parser.add_argument("config", type=Path, nargs="?", metavar="JOB.toml", help="TOML file of run settings")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    settings = tomllib.loads(args.config.read_text()) if args.config else {}
    settings.update(parse_setting(a) for a in args.settings)
    network = {k: v for k, v in settings.items() if k in ("network-preset", "architecture", "protocol")}
    config = RunConfig.from_flower(network)
    print(f"client_max_body_size {nginx_size(body_size_limit(config))};")
    return 0


if __name__ == "__main__":
    sys.exit(main())
