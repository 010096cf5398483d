"""`neurofed-site check`: discover a site's subjects, validate each, and print what can be used."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.site_layout import discover_site
from client.subjects import STRUCTURAL_CONTRASTS, Problem, SubjectCheck
from client.validation import validate_subject
from common.progress import Progress
from models.errors import NeurofedError
from models.label_protocols import PROTOCOLS, get_protocol

PLAIN_OUTPUT_WIDTH = 200
"""Columns of the table when output goes to a file or pipe, where nothing should wrap mid-path."""


def run_site_check(
    data_dir: Path,
    protocol: str = "tissue",
    contrast: str = "T1w",
    require_label: bool = True,
    console: Console | None = None,
    derivatives: str | None = None,
    label_desc: str | None = None,
) -> int:
    """Validate every subject in ``data_dir`` and print a table of subject, status (OK/SKIP) and reasons.

    Nothing in ``data_dir`` is modified. ``derivatives`` and ``label_desc`` choose among several
    candidate label maps (see ``discover_site``).

    Returns:
        0 when at least one subject is usable, 1 when none is.

    Raises:
        NeurofedError: unknown protocol or contrast, or ``data_dir`` holds no recognised layout.
    """
    try:
        label_protocol = get_protocol(protocol)
    except KeyError:
        raise NeurofedError(
            f"--protocol {protocol!r} is not a known label protocol; known: {', '.join(sorted(PROTOCOLS))}"
        ) from None
    if contrast not in STRUCTURAL_CONTRASTS:
        raise NeurofedError(
            f"--contrast {contrast!r} is not a structural contrast; use one of {', '.join(STRUCTURAL_CONTRASTS)}"
        )
    root = Path(data_dir)
    layout = discover_site(root, derivatives=derivatives, label_desc=label_desc)
    console = console or _default_console()

    checks: list[SubjectCheck] = []
    # A bar on a terminal only: elsewhere the table below lists every subject anyway.
    with Progress("checking", len(layout.subjects), show=console.is_terminal, stream=console.file) as bar:
        for subject in layout.subjects:
            bar.working_on(subject.subject_id)
            tied = layout.subject_problems.get(subject.subject_id, [])
            # A subject whose label is ambiguous already says so; "no label" would only contradict it.
            check = validate_subject(
                subject,
                label_protocol,
                contrast=contrast,
                require_label=require_label and not (tied and subject.label is None),
            )
            check.problems[:0] = tied
            check.warnings.extend(outside_data_folder(subject.all_files(), root))
            checks.append(check)
            bar.advance(subject.subject_id)

    table = Table(title=f"Subjects in {root}", title_justify="left", show_lines=True)
    table.add_column("subject", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for check in checks:
        reasons = Text()
        for problem in check.problems:
            reasons.append(_describe(problem, root) + "\n")
        for warning in check.warnings:
            reasons.append(f"warning: {warning}\n", style="yellow")
        reasons.rstrip()
        status = Text("OK", style="green") if check.usable else Text("SKIP", style="bold red")
        table.add_row(check.subject_id, status, reasons)
    if checks:
        console.print(table)

    unused = layout.layout_only_problems()
    if unused:
        console.print(Text(f"Files not used ({len(unused)}):", style="bold"))
        for problem in unused:
            console.print(Text(f"  {_describe(problem, root)}"))
    if layout.participants:
        console.print(Text(f"participants.tsv lists {len(layout.participants)} participant(s)"))

    usable = sum(check.usable for check in checks)
    labels = "labels required" if require_label else "labels optional"
    console.print(
        Text(
            f"{usable} of {len(checks)} subjects usable ({layout.kind} layout, protocol {label_protocol.name}, "
            f"contrast {contrast}, {labels})",
            style="bold green" if usable else "bold red",
        )
    )
    if not checks:
        console.print(
            Text(f"no subjects found in {root}; see `neurofed-site check --help` for the expected layouts")
        )
    return 0 if usable else 1


def outside_data_folder(files: list[Path], root: Path) -> list[str]:
    """A warning for each file that resolves (through a symbolic link) outside the data folder ``root``:
    the site would read, and train on, data its operator did not put in the folder they reviewed."""
    folder = root.resolve()
    warnings = []
    for path in files:
        target = path.resolve()
        if not target.is_relative_to(folder):
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            warnings.append(
                f"{shown} resolves to {target}, outside the data folder {folder}; copy the file into the folder "
                "or check that the link is meant"
            )
    return warnings


def _describe(problem: Problem, root: Path) -> str:
    """The problem with its file shown relative to the data folder."""
    if problem.path is None:
        return problem.reason
    try:
        shown = problem.path.relative_to(root)
    except ValueError:
        shown = problem.path
    return f"{shown}: {problem.reason}"


def _default_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, PLAIN_OUTPUT_WIDTH))
    return console
