"""Prepare a site's data for training: discover, validate, preprocess (through the cache) every subject.

A subject that fails validation or preprocessing is skipped with its reasons logged and recorded in its
`SubjectCheck`; one bad scan never stops the site. Nothing in the data folder is modified.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from client.preprocessed_cache import PreprocessedCache, default_cache_dir
from client.preprocessing import PreprocessedSubject, PreprocessingPlan, preprocess_subject
from client.site_layout import discover_site
from client.site_split import split_subjects
from client.subjects import Problem, SubjectCheck, SubjectFiles, person_of
from client.validation import validate_subject
from common.progress import Progress
from contract.wire import ROLE_HOLDOUT
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol, get_protocol

if TYPE_CHECKING:
    import numpy as np

    from client.site_policy import SitePolicy
    from client.site_setup import SiteSetup
    from contract.run_config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedSite:
    """A site's data, ready for training.

    Attributes:
        root: the data folder.
        subjects: the usable subjects, preprocessed onto the plan's grid, in discovery order.
        checks: one per discovered subject (usable or not), with the reasons a subject was skipped.
    """

    root: Path
    subjects: list[PreprocessedSubject]
    checks: list[SubjectCheck]

    @property
    def skipped(self) -> list[SubjectCheck]:
        return [check for check in self.checks if not check.usable]


def prepare_site(
    data_dir: Path,
    plan: PreprocessingPlan,
    protocol: LabelProtocol,
    cache: PreprocessedCache | None = None,
    require_label: bool = True,
    progress: bool = True,
    *,
    derivatives: str | None = None,
    label_desc: str | None = None,
) -> PreparedSite:
    """Discover, validate and preprocess every subject of ``data_dir``.

    Args:
        plan: the federation's preprocessing plan; its first input contrast is the one validated as the
            reference image, the others must exist (their defects surface when preprocessing).
        cache: where preprocessed subjects are kept between runs; None preprocesses in memory only.
        require_label: skip subjects without a label map (training); False for inference-only sites.
        progress: show the progress, a step per subject (common/progress.py).
        derivatives, label_desc: choose among candidate label maps (see ``discover_site``).

    Raises:
        NeurofedError: ``data_dir`` holds no recognised layout, ``cache`` lies inside it, or no subject
            is usable.
    """
    root = Path(data_dir)
    if cache is not None and cache.root.resolve().is_relative_to(root.resolve()):
        raise NeurofedError(
            f"preprocessed cache folder {cache.root} lies inside the data folder {root}, which is never "
            "written to; choose a cache folder elsewhere (NEUROFED_CACHE_DIR)"
        )
    layout = discover_site(root, derivatives=derivatives, label_desc=label_desc)
    for problem in layout.layout_only_problems():
        log.warning("not used: %s", problem)

    prepared: list[PreprocessedSubject] = []
    checks: list[SubjectCheck] = []
    with Progress(f"preparing {root.name}", len(layout.subjects), show=progress) as bar:
        for subject in layout.subjects:
            bar.working_on(subject.subject_id)
            check = _check(
                subject, layout.subject_problems.get(subject.subject_id, []), plan, protocol, require_label
            )
            checks.append(check)
            if check.usable:
                try:
                    if cache is not None:
                        prepared.append(cache.get_or_build(subject, plan, protocol))
                    else:
                        prepared.append(preprocess_subject(subject, plan, protocol))
                except Exception as exc:  # one bad scan must not stop the site; the reason is kept
                    reason = str(exc) if isinstance(exc, NeurofedError) else f"{type(exc).__name__}: {exc}"
                    check.problems.append(Problem(None, f"preprocessing failed: {reason}"))
            if not check.usable:
                log.warning("skipping %s: %s", subject.subject_id, "; ".join(str(p) for p in check.problems))
            bar.advance(subject.subject_id if check.usable else f"{subject.subject_id} skipped")

    if not prepared:
        raise NeurofedError(
            f"no usable subject in {root} ({len(checks)} found, all skipped: see the log); run "
            f"`neurofed-site check {root}` to see what is wrong with each subject"
        )
    return PreparedSite(root=root, subjects=prepared, checks=checks)


def _check(
    subject: SubjectFiles,
    tied: list[Problem],
    plan: PreprocessingPlan,
    protocol: LabelProtocol,
    require_label: bool,
) -> SubjectCheck:
    """Validate ``subject`` for ``plan``: discovery's problems first, then validation's."""
    # A subject whose label is ambiguous already says so; "no label" would only contradict it.
    check = validate_subject(
        subject,
        protocol,
        contrast=plan.input_contrasts[0],
        require_label=require_label and not (tied and subject.label is None),
    )
    check.problems[:0] = tied
    for contrast in plan.input_contrasts[1:]:
        if contrast not in subject.images:
            check.problems.append(
                Problem(
                    None,
                    f"no {contrast} image for {subject.subject_id}, which the plan's input contrasts "
                    f"{list(plan.input_contrasts)} need; add it or use a plan without it",
                )
            )
    return check


@dataclass(frozen=True)
class SplitSite:
    """A site's usable labelled subjects, split by person as the site splits them (`split_subjects`)."""

    root: Path
    train: list[PreprocessedSubject]
    test: list[PreprocessedSubject]


def prepare_split_site(
    data_dir: Path,
    plan: PreprocessingPlan,
    protocol: LabelProtocol,
    *,
    test_fraction: float,
    split_key: bytes,
    cache: PreprocessedCache | None = None,
    require_label: bool = True,
    progress: bool = False,
) -> SplitSite:
    """`prepare_site`, then the train/test split of its labelled subjects by ``split_key``
    (`client.site_split`: the site's secret-derived key, or `seed_key` for a local baseline)."""
    prepared = prepare_site(
        data_dir, plan, protocol, cache=cache, require_label=require_label, progress=progress
    )
    by_id = {s.subject_id: s for s in prepared.subjects if s.label is not None}
    if not by_id:
        raise NeurofedError(
            f"no usable labelled subject in {data_dir}; run `neurofed-site check {data_dir}` to see why"
        )
    split = split_subjects(by_id, test_fraction, split_key)
    return SplitSite(
        root=prepared.root, train=[by_id[i] for i in split.train], test=[by_id[i] for i in split.test]
    )


def run_preprocessing_plan(run: RunConfig) -> PreprocessingPlan:
    """The federation's preprocessing plan, from the run settings every site gets."""
    spacing = (run.spacing_mm,) * 3
    fov = run.field_of_view()
    if fov is None:
        return PreprocessingPlan(input_contrasts=(run.contrast,), target_spacing_mm=spacing)
    return PreprocessingPlan(input_contrasts=(run.contrast,), target_spacing_mm=spacing, field_of_view_mm=fov)


def role_test_fraction(role: str, policy: SitePolicy) -> float:
    """A holdout site tests on every subject; a training site holds out its policy's test fraction."""
    return 1.0 if role == ROLE_HOLDOUT else policy.test_fraction


def site_split_key(setup: SiteSetup) -> bytes:
    """The key of the site's lifetime split: derived from the site's secret, unknown to the coordinator."""
    from client.site_secret import SiteSecret

    return SiteSecret.load_or_create(setup.state_dir).derived_key("split")


@dataclass(frozen=True)
class SiteData:
    """The site's preprocessed subjects, split by person; arrays as ``(image (C,X,Y,Z) float32, label
    (X,Y,Z) uint8)``; ``train_persons`` holds the person (`client.subjects.person_of`) of each of ``train``."""

    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray]]
    plan: PreprocessingPlan
    spacing_mm: tuple[float, float, float]
    train_persons: tuple[str, ...] = ()
    test_persons: int = 0

    def train_by_person(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """The training subjects grouped by person (the DP unit), in a fixed order."""
        groups: dict[str, list] = {}
        for person, subject in zip(self.train_persons, self.train, strict=True):
            groups.setdefault(person, []).append(subject)
        return [groups[p] for p in sorted(groups)]


_LOADED: OrderedDict[tuple, SiteData] = OrderedDict()
_MAX_LOADED = 4
"""Sites whose arrays one worker process keeps in memory (a simulation worker serves several sites)."""


def load_site_data(setup: SiteSetup, run: RunConfig) -> SiteData:
    """Preprocess (or read from the cache) the site's labelled subjects and split them by the site's own
    key and policy; kept in memory for the next message of the same worker."""
    plan = run_preprocessing_plan(run)
    fraction = role_test_fraction(setup.role, setup.policy)
    split_key = site_split_key(setup)
    key = (str(setup.data_dir), plan.fingerprint(), run.protocol, fraction, split_key)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    try:
        split = prepare_split_site(
            setup.data_dir,
            plan,
            get_protocol(run.protocol),
            test_fraction=fraction,
            split_key=split_key,
            cache=PreprocessedCache(setup.cache_dir or default_cache_dir()),
        )
    except NeurofedError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    data = SiteData(
        train=[(s.image, s.label) for s in split.train],
        test=[(s.image, s.label) for s in split.test],
        plan=plan,
        spacing_mm=tuple(plan.target_spacing_mm),
        train_persons=tuple(person_of(s.subject_id) for s in split.train),
        test_persons=len({person_of(s.subject_id) for s in split.test}),
    )
    _LOADED[key] = data
    while len(_LOADED) > _MAX_LOADED:
        _LOADED.popitem(last=False)
    return data
