"""The Flower app's ServerApp: what ``flwr run .`` runs (pyproject's ``serverapp = "study.flower_app:app"``).

Deployed (started by `neurofed coordinator start`, or any Flower deployment whose sites hold their own
data) it is the coordinator's run and nothing else (`server.app.run_federation`): the coordinator has no
scans, so it never synthesizes data or evaluates baselines, and its report comes from the sites'
metrics. In Flower's simulation engine (``flwr run .`` on the local SuperLink; every site runs on this
machine) it does what `neurofed simulate` does:

1. with an empty ``data-root``, synthesizes ``num-sites`` x ``simulated-subjects-per-site`` subjects into
   ``<run-dir>/data`` (study/simulated_run.py) and runs the sites on them;
2. runs the federation (server/app.py), showing its progress;
3. ends with the full report: the local-only and pooled baselines, every model on every site's test
   split, the membership audit (study/study_evaluation.py), then report.md / report.html.
"""

from __future__ import annotations

import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from models.errors import NeurofedError
from server.app import run_federation, run_settings
from server.coordinator_state import CoordinatorState
from server.run_directory import RunDirectory
from study.simulated_run import evaluate_and_report, with_run_data


def is_simulation(grid: Grid) -> bool:
    """Whether Flower's simulation engine runs the sites, in processes of this machine (Flower 1.41 hands
    the ServerApp an in-memory grid there, and a networked one in a deployment)."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) and CoordinatorState.from_environment() is None


def check_simulated_sites(grid: Grid, num_sites: int, wait_s: float = 60.0) -> None:
    """Refuse a simulation whose SuperNodes are not the run's ``num_sites``: the run would wait for sites
    that never come (or hand sites no data). The engine registers all its nodes at once, as it starts."""
    deadline = time.monotonic() + wait_s
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.2)  # the rest of the nodes, registered in the same loop
    nodes = len(list(grid.get_node_ids()))
    if nodes != num_sites:
        raise NeurofedError(
            f"the simulation runs {nodes} SuperNode(s) but the run setting num-sites is {num_sites}: "
            f'pass --federation-config "num-supernodes={num_sites}" to `flwr run` (or --run-config '
            f'"num-sites={nodes}")'
        )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, resume = run_settings(dict(context.run_config))
    if not is_simulation(grid):
        run_federation(grid, context, config, resume)
        return
    stored = RunDirectory(config.run_dir).read_config() if resume else config
    check_simulated_sites(grid, stored.num_sites)
    if not resume:  # a resumed run keeps the data root stored with it
        config = with_run_data(config)
    run_dir = run_federation(grid, context, config, resume)
    evaluate_and_report(run_dir)
