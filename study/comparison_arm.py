"""The without-DP arm of a simulated study: the same run's configuration trained without DP.

A DP run's report shows what DP costs only beside the same configuration without it. The arm is a second
federation in ``RUN_DIR/without-dp/`` (contract/run_layout.py `WITHOUT_DP_DIR`) on the same data, with the
same settings except ``dp``, the same site secrets (so every site keeps the split it had in the DP run: the
models are scored on the same test subjects) and a copy of the preprocessed cache (so nothing is
preprocessed twice). Its final model is scored beside the others by study/study_evaluation.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from client.site_secret import SECRET_FILE
from contract.run_config import RunConfig
from contract.run_layout import FINAL_MODEL_FILE, SITE_CACHE_DIR, SITE_STATE_DIR, WITHOUT_DP_DIR

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def without_dp_config(config: RunConfig) -> RunConfig:
    """``config`` without DP, writing into its run directory's `WITHOUT_DP_DIR`."""
    return config.replace(dp=False, run_dir=str(Path(config.run_dir) / WITHOUT_DP_DIR))


def _share_site_state(run_dir: Path, arm_dir: Path) -> None:
    """Give the arm's sites the DP run's site secrets (same splits) and its preprocessed cache (hard links)."""
    for secret in sorted((run_dir / SITE_STATE_DIR).glob(f"*/{SECRET_FILE}")):
        target = arm_dir / SITE_STATE_DIR / secret.parent.name / SECRET_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(secret, target)
        os.chmod(target, 0o600)
    cache = run_dir / SITE_CACHE_DIR
    if cache.is_dir() and not (arm_dir / SITE_CACHE_DIR).exists():
        shutil.copytree(cache, arm_dir / SITE_CACHE_DIR, copy_function=os.link)


def run_without_dp_arm(
    config: RunConfig, client_app: ClientApp, *, progress: bool = True, ray_address: str | None = None
) -> Path:
    """Run (or finish) the without-DP arm of the DP run ``config`` (already finished) on this machine or
    the Ray cluster at ``ray_address``; returns its folder."""
    from server.run_directory import RunDirectory
    from study.simulation import run_simulation

    arm = without_dp_config(config)
    arm_dir = Path(arm.run_dir)
    if (arm_dir / FINAL_MODEL_FILE).is_file():
        return arm_dir
    resume = RunDirectory(arm_dir).config_path.is_file()
    if not resume:
        _share_site_state(Path(config.run_dir), arm_dir)
    run_simulation(arm, client_app, resume=resume, progress=progress, ray_address=ray_address)
    return arm_dir
