"""Prepare a site's data for training: discover, validate, preprocess (through the cache) every subject.

A subject that fails validation or preprocessing is skipped with its reasons logged and recorded in its
`SubjectCheck`; one bad scan never stops the site. Nothing in the data folder is modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from client.preprocessed_cache import PreprocessedCache
from client.preprocessing import PreprocessedSubject, PreprocessingPlan, preprocess_subject
from client.site_layout import discover_site
from client.subjects import Problem, SubjectCheck, SubjectFiles
from client.validation import validate_subject
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol

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
        progress: show a progress bar when on a terminal.
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
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(
        *columns, console=console, transient=True, disable=not (progress and console.is_terminal)
    ) as bar:
        task = bar.add_task("preparing", total=len(layout.subjects))
        for subject in layout.subjects:
            bar.update(task, description=f"preparing {subject.subject_id}")
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
            bar.advance(task)

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
