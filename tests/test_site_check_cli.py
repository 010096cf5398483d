"""`neurofed-site check`: exit status, the table's reasons, and a data folder left as it was."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def add_subject(root: Path, sid: str, label: bool = True) -> tuple[Path, Path]:
    rng = np.random.default_rng(len(sid))
    image = write_nifti(root / sid / "anat" / f"{sid}_T1w.nii.gz", rng.normal(size=SHAPE).astype(np.float32))
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[4:12, 4:12, 4:12] = 3  # cortex
    labels[6:10, 6:10, 6:10] = 2  # white matter
    label_path = root / "derivatives" / "labels" / sid / "anat" / f"{sid}_dseg.nii.gz"
    if label:
        write_nifti(label_path, labels)
    return image, label_path


def snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def site(tmp_path) -> Path:
    """sub-01 and sub-02 usable; sub-03's label is truncated."""
    root = tmp_path / "site"
    add_subject(root, "sub-01")
    add_subject(root, "sub-02")
    _, bad_label = add_subject(root, "sub-03")
    raw = bad_label.read_bytes()
    bad_label.write_bytes(raw[: len(raw) // 2])
    return root


def test_check_reports_bad_subject_and_exits_0(site, capsys):
    before = snapshot(site)
    assert main(["check", str(site)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert "OK" in rows["sub-01"] and "OK" in rows["sub-02"] and "SKIP" in rows["sub-03"]
    assert "derivatives/labels/sub-03/anat/sub-03_dseg.nii.gz" in out  # relative to the data folder
    assert str(site) + "/derivatives" not in out
    assert "truncated" in out
    assert "2 of 3 subjects usable" in out
    assert snapshot(site) == before


def test_check_exits_1_when_no_subject_is_usable(tmp_path, capsys):
    root = tmp_path / "site"
    image, _ = add_subject(root, "sub-01")
    image.write_text("not an image")
    add_subject(root, "sub-02", label=False)
    before = snapshot(root)
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "sub-01/anat/sub-01_T1w.nii.gz" in out and "not a NIfTI file" in out
    assert "no label map" in out
    assert "0 of 2 subjects usable" in out
    assert snapshot(root) == before


def test_unlabelled_ok_accepts_subjects_without_labels(tmp_path, capsys):
    root = tmp_path / "site"
    add_subject(root, "sub-01", label=False)
    assert main(["check", str(root)]) == 1
    assert main(["check", str(root), "--unlabelled-ok"]) == 0
    assert "1 of 1 subjects usable" in capsys.readouterr().out


def test_layout_problems_and_label_choice(site, capsys):
    second = write_nifti(
        site / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_dseg.nii.gz", np.zeros(SHAPE)
    )
    orphan = write_nifti(
        site / "derivatives" / "labels" / "sub-09" / "anat" / "sub-09_dseg.nii.gz", np.zeros(SHAPE)
    )
    assert main(["check", str(site)]) == 0
    out = capsys.readouterr().out
    assert "candidate label maps" in out and "derivatives/other/sub-01/anat/sub-01_dseg.nii.gz" in out
    assert "1 of 3 subjects usable" in out
    assert "Files not used (1)" in out and str(orphan.relative_to(site)) in out

    assert main(["check", str(site), "--derivatives", "labels"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 subjects usable" in out and str(second.relative_to(site)) not in out


def test_unknown_protocol_names_the_known_ones(site, capsys):
    assert main(["check", str(site), "--protocol", "dkt"]) == 2
    err = capsys.readouterr().err
    assert "--protocol 'dkt'" in err and "aseg, tissue" in err
    assert "Traceback" not in err


def test_unknown_contrast(site, capsys):
    assert main(["check", str(site), "--contrast", "T1"]) == 2
    assert "--contrast 'T1'" in capsys.readouterr().err


def test_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_protocol_option_changes_what_is_accepted(tmp_path, capsys):
    root = tmp_path / "site"
    _, label_path = add_subject(root, "sub-01")
    labels = np.asarray(nib.load(label_path).dataobj)
    labels[0, 0, 0] = 72  # choroid plexus area: a tissue class member, not an aseg structure; both accept it
    labels[0, 0, 1] = 1  # accepted by neither protocol
    write_nifti(label_path, labels)
    for protocol in ("tissue", "aseg"):
        assert main(["check", str(root), "--protocol", protocol]) == 1
        out = capsys.readouterr().out
        assert "label values 1 " in out and f"'{protocol}'" in out


def test_entry_point_runs_as_a_program(site):
    before = snapshot(site)
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "check", str(site)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "2 of 3 subjects usable" in result.stdout
    assert "sub-03_dseg.nii.gz" in result.stdout
    assert snapshot(site) == before


def test_files_resolving_outside_the_data_folder_are_warned_about(tmp_path, capsys):
    from client.site_check import outside_data_folder

    root = tmp_path / "site"
    add_subject(root, "sub-01")
    linked, _ = add_subject(root, "sub-02")
    elsewhere, _ = add_subject(tmp_path / "elsewhere", "sub-02")
    linked.unlink()
    linked.symlink_to(elsewhere)
    inside = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    (warning,) = outside_data_folder([linked, inside], root)
    assert (
        warning.startswith("sub-02/anat/sub-02_T1w.nii.gz resolves to")
        and str(elsewhere.resolve()) in warning
    )
    assert main(["check", str(root)]) == 0  # a warning only: the subject stays usable
    out = capsys.readouterr().out
    # The table folds long reasons onto several lines, where depends on the paths: compare without layout.
    flat = re.sub(r"[\s│]+", "", out)
    assert "warning:sub-02/anat/sub-02_T1w.nii.gzresolvesto" in flat and "outsidethedatafolder" in flat
    assert "2 of 2 subjects usable" in out
