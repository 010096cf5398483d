"""The run directory's layout: every file and folder name a federated run leaves behind.

::

    RUN_DIR/config.json                     the resolved RunConfig, network, plan and sites
    RUN_DIR/metrics.jsonl                   one JSON object per event (per site, per round)
    RUN_DIR/checkpoints/round-003.pt        global model after round 3 (+ round-003.state.pt)
    RUN_DIR/final-model.pt                  global model after the last round
    RUN_DIR/evaluation.json                 the cross-site study evaluation (contract/evaluation.py)
    RUN_DIR/baselines/                      local-only and pooled comparison models
    RUN_DIR/qc/                             QC images of unseen-site subjects
    RUN_DIR/report.md, report.html          the report, figures under RUN_DIR/figures/
    RUN_DIR/cache/                          simulated sites' preprocessed cache
    RUN_DIR/sites/<site>/                   a simulated site's state (ledger, personalised layers)
    RUN_DIR/without-dp/                     a study's same run without DP (a run directory of its own)
"""

from __future__ import annotations

from pathlib import Path

from models.errors import NeurofedError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_MODEL_FILE = "final-model.pt"
EVALUATION_FILE = "evaluation.json"
BASELINES_DIR = "baselines"
QC_DIR = "qc"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
SITE_CACHE_DIR = "cache"
SITE_STATE_DIR = "sites"
WITHOUT_DP_DIR = "without-dp"


def site_folders(data_root: Path) -> list[Path]:
    """The site folders of a simulation's data root, in name order: partition i is the i-th of them."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise NeurofedError(f"data root {data_root} is not a folder; give a folder of site folders")
    return sorted(p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
