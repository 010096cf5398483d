"""What the report reads from a run directory: config.json, the events of metrics.jsonl and
evaluation.json, and the per-subject results of evaluation.json indexed by model and site."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.evaluation import FEDERATED, LOCAL_PREFIX, NATIVE_CEILING, NATIVE_RESULTS, PERSONALISED, POOLED
from contract.run_layout import CONFIG_FILE, EVALUATION_FILE, METRICS_FILE
from contract.wire import ROLE_HOLDOUT
from models.errors import NeurofedError

LEFT_OUT_EVENTS: dict[str, str] = {
    "refused": "declined by the site (e.g. its privacy budget, or DP required)",
    "rejected": "left out by the coordinator: a reply outside the run's reply schema (records, metrics, "
    "array shapes and dtypes, NaN/Inf, norm above update-norm-cap or far above the other sites'), or a "
    "node not enrolled, declaring another name, or revoked",
    "dropped": "failed or did not answer in time",
}
"""The metrics.jsonl events that leave a site out of a round, and what each means."""


@dataclass(frozen=True)
class RunRecords:
    """What the report reads: config.json, the events of metrics.jsonl, evaluation.json (None if absent)."""

    root: Path
    document: dict[str, Any]
    events: list[dict[str, Any]]
    evaluation: dict[str, Any] | None

    @property
    def run_config(self) -> dict[str, Any]:
        return self.document["run_config"]

    def sites(self) -> list[dict[str, Any]]:
        return list(self.document.get("sites", []))

    def training_sites(self) -> list[str]:
        """The sites that trained, in config.json's order."""
        return [s["site"] for s in self.sites() if s["role"] != ROLE_HOLDOUT]

    def unseen_sites(self) -> list[str]:
        """The holdout sites (never trained), in config.json's order."""
        return [s["site"] for s in self.sites() if s["role"] == ROLE_HOLDOUT]

    def how_to_build(self, re_evaluate: bool = False) -> str:
        """How the evaluation-based parts are (re)built, where the sites' data is: a study's run by
        `neurofed report` beside its data root; a deployed run's scans never reach the coordinator."""
        again = " --re-evaluate" if re_evaluate else ""
        if self.run_config.get("data_root"):
            return f"build it with `neurofed report {self.root}{again}`"
        return (
            "a deployed run's scans stay at the hospitals, so the coordinator cannot build it; only where "
            f"every site's data is together (a study), `neurofed report {self.root}{again} --data-root DIR` "
            "can; the sites' own evaluations of the global model are shown instead"
        )


def read_run(run_dir: Path) -> RunRecords:
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise NeurofedError(
            f"{run_dir} is not a run directory ({CONFIG_FILE} is missing): pass the folder a run wrote with "
            "--out"
        )
    events = []
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
    evaluation_path = run_dir / EVALUATION_FILE
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.is_file() else None
    return RunRecords(run_dir, json.loads(config_path.read_text()), events, evaluation)


def _epsilon_series(events: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Per site, the ``(round, ε)`` points its events report, in round order (the last one of a round)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if "site" not in e:
            continue
        eps = e.get("epsilon", (e.get("metrics") or {}).get("epsilon"))
        if isinstance(eps, int | float) and math.isfinite(eps):
            series.setdefault(str(e["site"]), []).append((int(e["round"]), float(eps)))
    return {site: sorted(dict(points).items()) for site, points in series.items()}


class EvaluationResults:
    """Per-subject results of evaluation.json, indexed by (model, site)."""

    def __init__(self, evaluation: Mapping[str, Any]) -> None:
        self.evaluation = evaluation
        self.classes: list[str] = list(evaluation["classes"])
        self.metrics: list[str] = list(evaluation["metrics"])
        self.models: list[str] = [m["name"] for m in evaluation["models"]]
        self.kinds: dict[str, str] = {m["name"]: str(m.get("kind", m["name"])) for m in evaluation["models"]}
        """Each model's kind: ``federated``, ``local-only``, ``pooled`` or ``personalised``."""
        self.local_models = [m for m in self.models if m.startswith(LOCAL_PREFIX)]
        self.pooled = [m for m in self.models if m == POOLED]
        """``[POOLED]`` when the pooled model was scored, else ``[]``."""
        self.personalised = [m for m in self.models if m == PERSONALISED]
        """``[PERSONALISED]`` when FedBN's personalised models were scored, else ``[]``."""
        known = {FEDERATED, POOLED, PERSONALISED, *self.local_models}
        self.other_models = [m for m in self.models if m not in known]
        """Any further model evaluation.json scored (e.g. the starting model, or the run without DP)."""
        self.by = _by_model_and_site(evaluation["results"])
        native = evaluation.get(NATIVE_RESULTS)
        self.own_grid = (
            EvaluationResults({**evaluation, "results": native, NATIVE_RESULTS: None}) if native else None
        )
        """The same models scored on the unseen sites' scans' own grids (`NATIVE_RESULTS`); None without them."""
        self.ceiling_by = _by_model_and_site(evaluation.get(NATIVE_CEILING) or [])
        """`NATIVE_CEILING` (no model: keyed by (None, site))."""

    def mean_dice(self, model: str, site: str) -> list[float]:
        return [r["mean_dice"] for r in self.by.get((model, site), [])]

    def metric(self, model: str, site: str, cls: str, metric: str) -> list[float | None]:
        return [r["metrics"][cls][metric] for r in self.by.get((model, site), [])]

    def native_mean_dice(self, model: str, site: str) -> list[float]:
        """Per-subject mean Dice of ``model`` on each of ``site``'s scans' own grid (empty if not scored)."""
        return self.own_grid.mean_dice(model, site) if self.own_grid is not None else []

    def native_ceiling(self, site: str) -> list[float]:
        """Per-subject mean Dice of a segmentation perfect on the working grid, on each scan's own grid."""
        return [r["mean_dice"] for r in self.ceiling_by.get((None, site), [])]

    def own_grid_differs(self, site: str) -> bool:
        """Whether scoring ``site``'s scans on their own grid changed anything the report shows (3 decimals):
        not where the scans already lie on the working grid (the partial-volume limit 1, every model's Dice
        the same up to the float32 mapping's rounding)."""
        if self.own_grid is None or not self.native_ceiling(site):
            return False
        if min(self.native_ceiling(site)) < 1.0 - 1e-9:
            return True
        for model in self.models:
            grid, own = self.mean_dice(model, site), self.native_mean_dice(model, site)
            if own and (
                len(grid) != len(own) or any(abs(a - b) > 5e-4 for a, b in zip(grid, own, strict=False))
            ):
                return True
        return False

    def native_spacings(self) -> set[tuple[float, ...]]:
        """The voxel sizes (mm) of the scans scored on their own grid."""
        rows = self.evaluation.get(NATIVE_RESULTS) or []
        return {tuple(round(float(z), 3) for z in r["spacing_mm"]) for r in rows}

    def chance(self, site: str) -> list[float]:
        for s in self.evaluation["sites"]:
            if s["site"] == site:
                return list((s.get("chance_mean_dice") or {}).values())
        return []

    def qc(self, site: str) -> list[dict[str, Any]]:
        """The QC images evaluation.json lists for a site."""
        return [qc for qc in self.evaluation.get("qc", []) if qc["site"] == site]


def _by_model_and_site(rows: list[dict[str, Any]]) -> dict[tuple[str | None, str], list[dict[str, Any]]]:
    """Records indexed by (model, site) (model None for records without one), each list sorted by subject."""
    by: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r.get("model"), r["site"]), []).append(r)
    for group in by.values():
        group.sort(key=lambda r: r["subject"])
    return by
