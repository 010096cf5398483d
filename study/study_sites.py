"""The sites of a finished run, prepared and split as the run did, for its study evaluation.

Every site is preprocessed through the run's cache with the run's plan, and split by the federation's
own rule (`client.site_split.split_subjects` with the key from the site's secret in the run directory and
the role's test fraction), so each model of study/study_evaluation.py is scored on exactly the subjects
the federation held out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.run_config import RunConfig
from contract.run_layout import SITE_CACHE_DIR, SITE_STATE_DIR
from models.errors import NeurofedError

if TYPE_CHECKING:
    from client.preprocessing import NativeTransform


@dataclass(frozen=True)
class StudySite:
    """One site of the run: its folder, role and the preprocessed subjects of its two splits.

    ``train`` / ``test`` hold ``(subject_id, image (C, X, Y, Z) float32, label (X, Y, Z) uint8)``;
    ``transforms`` maps subject id -> where its grid sits on the scan (``grid_affine``: voxel -> world RAS
    mm), ``label_files`` subject id -> its label map on the scan's own grid (FreeSurfer values).
    """

    site_id: str
    role: str
    data_dir: Path
    train: list[tuple[str, np.ndarray, np.ndarray]]
    test: list[tuple[str, np.ndarray, np.ndarray]]
    transforms: dict[str, NativeTransform]
    label_files: dict[str, Path]


def load_study_sites(
    run_dir: Path,
    data_root: Path,
    settings: RunConfig,
    sites: Sequence[Mapping[str, Any]],
    *,
    progress: bool = True,
) -> list[StudySite]:
    """Prepare every site of the run (through the run's preprocessed cache) and split it as the run did;
    ``progress``: a step per subject of each site (common/progress.py)."""
    from client.preprocessed_cache import PreprocessedCache
    from client.site_data import (
        prepare_split_site,
        role_test_fraction,
        run_preprocessing_plan,
        site_split_key,
    )
    from client.site_layout import discover_site
    from client.site_policy import simulated_policy
    from client.site_setup import SiteSetup
    from models.label_protocols import get_protocol

    plan = run_preprocessing_plan(settings)
    protocol = get_protocol(settings.protocol)
    cache = PreprocessedCache(run_dir / SITE_CACHE_DIR)
    out = []
    for site in sites:
        site_id, role = str(site["site"]), str(site["role"])
        data_dir = data_root / site_id
        if not data_dir.is_dir():
            raise NeurofedError(
                f"site {site_id} of the run has no folder {data_dir}: pass the run's data root with --data-root"
            )
        setup = SiteSetup(site_id, role, data_dir, None, run_dir / SITE_STATE_DIR / site_id, True)
        split = prepare_split_site(
            data_dir,
            plan,
            protocol,
            test_fraction=role_test_fraction(role, simulated_policy(settings)),
            split_key=site_split_key(setup),
            cache=cache,
            progress=progress,
        )
        out.append(
            StudySite(
                site_id=site_id,
                role=role,
                data_dir=data_dir,
                train=[(s.subject_id, s.image, s.label) for s in split.train],
                test=[(s.subject_id, s.image, s.label) for s in split.test],
                transforms={s.subject_id: s.transform for s in split.train + split.test},
                label_files={s.subject_id: s.label for s in discover_site(data_dir).subjects if s.label},
            )
        )
    return out
