"""discover_site: BIDS and flat layouts, matching labels and masks, and files that fit no subject.

Discovery reads names only, so the files here are empty placeholders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site_layout import discover_site, parse_bids_name
from models.errors import NeurofedError


def touch(root: Path, *relative: str) -> list[Path]:
    paths = []
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        paths.append(path)
    return paths


def by_id(layout) -> dict:
    return {s.subject_id: s for s in layout.subjects}


def problems_for(layout, path: Path) -> list[str]:
    return [p.reason for p in layout.problems if p.path == path]


def test_bids_without_sessions(tmp_path):
    touch(
        tmp_path,
        "dataset_description.json",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T1w.json",
        "sub-01/anat/sub-01_FLAIR.nii.gz",
        "sub-02/anat/sub-02_T1w.nii",
        "derivatives/labels/sub-01/anat/sub-01_dseg.nii.gz",
        "derivatives/labels/sub-02/anat/sub-02_dseg.nii.gz",
    )
    layout = discover_site(tmp_path)
    assert layout.kind == "bids" and layout.root == tmp_path and layout.problems == []
    subjects = by_id(layout)
    assert list(subjects) == ["sub-01", "sub-02"]
    assert subjects["sub-01"].images == {
        "T1w": tmp_path / "sub-01/anat/sub-01_T1w.nii.gz",
        "FLAIR": tmp_path / "sub-01/anat/sub-01_FLAIR.nii.gz",
    }
    assert subjects["sub-02"].images == {"T1w": tmp_path / "sub-02/anat/sub-02_T1w.nii"}
    assert subjects["sub-02"].label == tmp_path / "derivatives/labels/sub-02/anat/sub-02_dseg.nii.gz"
    assert subjects["sub-01"].mask is None


def test_bids_with_sessions_matches_labels_per_session(tmp_path):
    touch(
        tmp_path,
        "sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz",
        "sub-01/ses-post/anat/sub-01_ses-post_T1w.nii.gz",
        "derivatives/synthseg/sub-01/ses-pre/anat/sub-01_ses-pre_dseg.nii.gz",
        "derivatives/synthseg/sub-01/ses-post/anat/sub-01_ses-post_dseg.nii.gz",
    )
    subjects = by_id(discover_site(tmp_path))
    assert list(subjects) == ["sub-01_ses-post", "sub-01_ses-pre"]
    for session in ("pre", "post"):
        subject = subjects[f"sub-01_ses-{session}"]
        assert subject.images["T1w"].name == f"sub-01_ses-{session}_T1w.nii.gz"
        assert subject.label.name == f"sub-01_ses-{session}_dseg.nii.gz"


def test_bids_entities_and_masks_in_anat_and_derivatives(tmp_path):
    touch(
        tmp_path,
        "sub-01/anat/sub-01_acq-mprage_run-1_T1w.nii.gz",
        "sub-01/anat/sub-01_acq-mprage_run-1_mask.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "derivatives/seg/sub-01/anat/sub-01_acq-mprage_run-1_desc-aseg_dseg.nii.gz",
        "derivatives/seg/sub-02/anat/sub-02_desc-aseg_dseg.nii.gz",
        "derivatives/seg/sub-02/anat/sub-02_desc-brain_mask.nii.gz",
        # a template-space copy is not on the subject's grid and is no candidate
        "derivatives/seg/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-aseg_dseg.nii.gz",
        "derivatives/seg/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
    )
    layout = discover_site(tmp_path)
    assert layout.problems == []
    subjects = by_id(layout)
    assert subjects["sub-01"].mask == tmp_path / "sub-01/anat/sub-01_acq-mprage_run-1_mask.nii.gz"
    assert subjects["sub-01"].label.name == "sub-01_acq-mprage_run-1_desc-aseg_dseg.nii.gz"
    assert subjects["sub-02"].mask == tmp_path / "derivatives/seg/sub-02/anat/sub-02_desc-brain_mask.nii.gz"
    assert subjects["sub-02"].label.name == "sub-02_desc-aseg_dseg.nii.gz"


def test_label_of_another_run_is_not_attached(tmp_path):
    (other_run,) = touch(tmp_path, "derivatives/seg/sub-01/anat/sub-01_run-2_dseg.nii.gz")
    touch(tmp_path, "sub-01/anat/sub-01_run-1_T1w.nii.gz")
    layout = discover_site(tmp_path)
    assert by_id(layout)["sub-01"].label is None
    (reason,) = problems_for(layout, other_run)
    assert "entities do not match" in reason and "sub-01_run-1_T1w.nii.gz" in reason


def test_two_candidate_labels_are_a_problem_and_can_be_chosen(tmp_path):
    a, b = touch(
        tmp_path,
        "derivatives/freesurfer/sub-01/anat/sub-01_desc-aseg_dseg.nii.gz",
        "derivatives/synthseg/sub-01/anat/sub-01_desc-synthseg_dseg.nii.gz",
    )
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz")
    layout = discover_site(tmp_path)
    assert by_id(layout)["sub-01"].label is None
    (problem,) = layout.subject_problems["sub-01"]
    assert layout.problems == [problem] and layout.layout_only_problems() == []
    assert "2 candidate label maps" in problem.reason
    assert all(str(p.relative_to(tmp_path)) in problem.reason for p in (a, b))
    assert "--derivatives" in problem.reason and "--label-desc" in problem.reason

    assert by_id(discover_site(tmp_path, derivatives="synthseg"))["sub-01"].label == b
    assert by_id(discover_site(tmp_path, label_desc="aseg"))["sub-01"].label == a
    with pytest.raises(NeurofedError, match="derivatives/fmriprep does not exist.*freesurfer, synthseg"):
        discover_site(tmp_path, derivatives="fmriprep")


def test_mask_in_anat_and_in_derivatives_is_ambiguous(tmp_path):
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz")
    in_anat, in_deriv = touch(
        tmp_path,
        "sub-01/anat/sub-01_mask.nii.gz",
        "derivatives/masks/sub-01/anat/sub-01_desc-brain_mask.nii.gz",
    )
    layout = discover_site(tmp_path)
    assert by_id(layout)["sub-01"].mask is None
    (problem,) = layout.subject_problems["sub-01"]
    assert "2 candidate masks" in problem.reason
    assert all(str(p.relative_to(tmp_path)) in problem.reason for p in (in_anat, in_deriv))


def test_orphan_label_is_reported(tmp_path):
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "derivatives/labels/sub-01/anat/sub-01_dseg.nii.gz")
    (orphan,) = touch(tmp_path, "derivatives/labels/sub-09/anat/sub-09_dseg.nii.gz")
    layout = discover_site(tmp_path)
    assert list(by_id(layout)) == ["sub-01"]
    (reason,) = problems_for(layout, orphan)
    assert "label with no image" in reason and "sub-09/anat/" in reason


def test_second_run_of_a_contrast_is_reported_not_silently_dropped(tmp_path):
    first, second = touch(
        tmp_path, "sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz"
    )
    layout = discover_site(tmp_path)
    assert by_id(layout)["sub-01"].images["T1w"] == first
    (reason,) = problems_for(layout, second)
    assert "several T1w images" in reason and first.name in reason


def test_misnamed_file_in_subject_folder(tmp_path):
    (wrong_subject,) = touch(tmp_path, "sub-01/anat/sub-02_T1w.nii.gz")
    (wrong_suffix,) = touch(tmp_path, "sub-03/anat/sub-03_T1.nii.gz")
    layout = discover_site(tmp_path)
    assert by_id(layout)["sub-01"].images == {}
    assert "another subject" in problems_for(layout, wrong_subject)[0]
    (reason,) = problems_for(layout, wrong_suffix)
    assert "not recognised" in reason and "sub-03_T1w.nii.gz" in reason


def test_subjects_in_natural_order(tmp_path):
    touch(tmp_path, *(f"sub-{n}/anat/sub-{n}_T1w.nii.gz" for n in (10, 2, 1)))
    assert [s.subject_id for s in discover_site(tmp_path).subjects] == ["sub-1", "sub-2", "sub-10"]


def test_participants_tsv_is_read(tmp_path):
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz")
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("participant_id\tage\tsex\nsub-01\t45\tF\nsub-02\t61\nsub-03\t30\tM\n")
    layout = discover_site(tmp_path)
    assert layout.participants == {
        "sub-01": {"participant_id": "sub-01", "age": "45", "sex": "F"},
        "sub-03": {"participant_id": "sub-03", "age": "30", "sex": "M"},
    }
    (reason,) = problems_for(layout, tsv)
    assert "line 3" in reason


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"\xff\xfe\x00garbage\x80", "cannot be read"), (b"id\tage\n01\t3\n", "no participant_id column")],
)
def test_bad_participants_tsv_is_a_problem(tmp_path, content, expected):
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz")
    tsv = tmp_path / "participants.tsv"
    tsv.write_bytes(content)
    layout = discover_site(tmp_path)
    assert layout.participants == {}
    assert expected in problems_for(layout, tsv)[0]


def test_flat_layout(tmp_path):
    touch(
        tmp_path,
        "images/case01.nii.gz",
        "images/case02_T1w.nii.gz",
        "images/case02_FLAIR.nii.gz",
        "images/case03.nii",
        "labels/case01_seg.nii.gz",
        "labels/case02.nii.gz",
        "labels/case03_labels.nii",
        "masks/case01_mask.nii.gz",
    )
    layout = discover_site(tmp_path)
    assert layout.kind == "flat" and layout.problems == []
    subjects = by_id(layout)
    assert list(subjects) == ["case01", "case02", "case03"]
    assert subjects["case01"].images == {"T1w": tmp_path / "images/case01.nii.gz"}
    assert subjects["case01"].label == tmp_path / "labels/case01_seg.nii.gz"
    assert subjects["case01"].mask == tmp_path / "masks/case01_mask.nii.gz"
    assert set(subjects["case02"].images) == {"T1w", "FLAIR"}
    assert subjects["case02"].label == tmp_path / "labels/case02.nii.gz"
    assert subjects["case03"].label == tmp_path / "labels/case03_labels.nii"
    assert subjects["case03"].mask is None


def test_flat_layout_without_labels_folder(tmp_path):
    touch(tmp_path, "images/a.nii.gz")
    (subject,) = discover_site(tmp_path).subjects
    assert subject.label is None


def test_flat_orphans_and_foreign_files(tmp_path):
    touch(
        tmp_path, "images/case01.nii.gz", "labels/case01.nii.gz", "images/.DS_Store", "images/._case01.nii.gz"
    )
    orphan, notes, mgz = touch(tmp_path, "labels/case09_seg.nii.gz", "images/notes.txt", "images/case02.mgz")
    layout = discover_site(tmp_path)
    assert list(by_id(layout)) == ["case01"]
    assert "label with no image" in problems_for(layout, orphan)[0]
    for path in (notes, mgz):
        assert "not a NIfTI file name" in problems_for(layout, path)[0]
    assert len(layout.problems) == 3  # hidden files (macOS ._ forks) are not reported


def test_flat_two_labels_for_one_image(tmp_path):
    touch(tmp_path, "images/case01.nii.gz")
    a, b = touch(tmp_path, "labels/case01.nii.gz", "labels/case01_dseg.nii.gz")
    layout = discover_site(tmp_path)
    assert by_id(layout)["case01"].label is None
    (problem,) = layout.subject_problems["case01"]
    assert layout.problems == [problem] and "2 candidate labels" in problem.reason
    assert all(str(p.relative_to(tmp_path)) in problem.reason for p in (a, b))


@pytest.mark.parametrize("make", ["missing", "file", "empty", "unrelated"])
def test_no_layout_is_an_error_that_shows_both_layouts(tmp_path, make):
    data_dir = tmp_path / "site"
    if make == "file":
        data_dir.write_text("")
    elif make == "empty":
        data_dir.mkdir()
    elif make == "unrelated":
        touch(data_dir, "scans/a.nii.gz", "notes.txt")
    with pytest.raises(NeurofedError) as info:
        discover_site(data_dir)
    message = str(info.value)
    assert str(data_dir) in message
    assert "sub-01/anat/sub-01_T1w.nii.gz" in message and "images/case01.nii.gz" in message
    if make == "unrelated":
        assert "found: notes.txt, scans" in message


def test_parse_bids_name():
    name = parse_bids_name("sub-01_ses-pre_acq-x_run-1_T1w")
    assert name.entities == {"sub": "01", "ses": "pre", "acq": "x", "run": "1"} and name.suffix == "T1w"
    assert parse_bids_name("case01") is None
    assert parse_bids_name("sub-01_badentity_T1w") is None
