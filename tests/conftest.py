"""Shared fixtures: where the real FreeSurfer label maps lie (../shared/data/label_maps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LABEL_MAPS_ENV = "NEUROFED_LABEL_MAPS"
DEFAULT_LABEL_MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "label_maps"


@pytest.fixture(scope="session")
def label_maps_dir() -> Path:
    """The folder of real label maps ``training_seg_*.nii.gz``; skips the test when it is absent."""
    folder = Path(os.environ.get(LABEL_MAPS_ENV, DEFAULT_LABEL_MAPS))
    if not folder.is_dir() or not any(folder.glob("training_seg_*.nii.gz")):
        pytest.skip(f"real label maps not found in {folder} (set {LABEL_MAPS_ENV} to their folder)")
    return folder
