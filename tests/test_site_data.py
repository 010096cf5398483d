"""Site preparation: bad subjects are skipped with their reason, good ones are preprocessed (and cached)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

import client.site_data as site_data_module
from client.preprocessed_cache import PreprocessedCache
from client.preprocessing import PreprocessingPlan
from client.site_data import prepare_site
from models.errors import NeurofedError
from models.label_protocols import TISSUE

PLAN = PreprocessingPlan(field_of_view_mm=(48.0, 56.0, 52.0))


def add_subject(root: Path, head_phantoms, sid: str, seed: int = 0):
    """A BIDS subject: sub-XX/anat/sub-XX_T1w.nii.gz with its sub-XX_dseg.nii.gz beside it."""
    labels = head_phantoms.labels(centre_shift=(seed, -seed, 0.0))
    return head_phantoms.write_subject(root / sid / "anat", sid, labels, axcodes="LIA", seed=seed)


def snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def site(tmp_path, head_phantoms) -> Path:
    """sub-01 and sub-02 usable; sub-03's label map is truncated."""
    root = tmp_path / "site"
    add_subject(root, head_phantoms, "sub-01", seed=1)
    add_subject(root, head_phantoms, "sub-02", seed=2)
    bad = add_subject(root, head_phantoms, "sub-03", seed=3)
    raw = bad.label.read_bytes()
    bad.label.write_bytes(raw[: len(raw) // 2])
    return root


def test_bad_subject_is_skipped_and_good_ones_prepared(site, caplog):
    before = snapshot(site)
    with caplog.at_level(logging.WARNING, logger="client.site_data"):
        prepared = prepare_site(site, PLAN, TISSUE, progress=False)

    assert [s.subject_id for s in prepared.subjects] == ["sub-01", "sub-02"]
    for subject in prepared.subjects:
        assert subject.image.shape == (1, *PLAN.grid_shape)
        assert subject.label.shape == PLAN.grid_shape and subject.label.max() == 3
        assert subject.plan_fingerprint == PLAN.fingerprint()
    assert [c.subject_id for c in prepared.checks] == ["sub-01", "sub-02", "sub-03"]
    assert [c.subject_id for c in prepared.skipped] == ["sub-03"]
    assert any(
        p.path is not None and p.path.name == "sub-03_dseg.nii.gz" for p in prepared.skipped[0].problems
    )
    assert any("sub-03" in r.getMessage() and "dseg" in r.getMessage() for r in caplog.records)
    assert snapshot(site) == before  # the data folder is never written


def test_a_subject_that_fails_preprocessing_is_skipped_with_the_reason(site, monkeypatch):
    real = site_data_module.preprocess_subject

    def fails_for_sub_02(subject, plan, protocol):
        if subject.subject_id == "sub-02":
            raise RuntimeError("resampling exploded")
        return real(subject, plan, protocol)

    monkeypatch.setattr(site_data_module, "preprocess_subject", fails_for_sub_02)
    prepared = prepare_site(site, PLAN, TISSUE, progress=False)

    assert [s.subject_id for s in prepared.subjects] == ["sub-01"]
    failed = {c.subject_id: c for c in prepared.skipped}["sub-02"]
    assert any("resampling exploded" in p.reason for p in failed.problems)


def test_a_subject_without_a_contrast_the_plan_needs_is_skipped(site, head_phantoms):
    # sub-01 gets a FLAIR (the same image, stored as FLAIR); sub-02 has none.
    anat = site / "sub-01" / "anat"
    (anat / "sub-01_FLAIR.nii.gz").write_bytes((anat / "sub-01_T1w.nii.gz").read_bytes())
    plan = dataclasses.replace(PLAN, input_contrasts=("T1w", "FLAIR"))

    prepared = prepare_site(site, plan, TISSUE, progress=False)

    assert [s.subject_id for s in prepared.subjects] == ["sub-01"]
    assert prepared.subjects[0].image.shape == (2, *plan.grid_shape)
    reasons = " ".join(p.reason for c in prepared.skipped if c.subject_id == "sub-02" for p in c.problems)
    assert "FLAIR" in reasons


def test_no_usable_subject_is_an_error_naming_folder_and_check_command(tmp_path, head_phantoms):
    root = tmp_path / "site"
    bad = add_subject(root, head_phantoms, "sub-01")
    bad.label.write_bytes(b"not nifti")
    with pytest.raises(NeurofedError, match="neurofed-site check") as excinfo:
        prepare_site(root, PLAN, TISSUE, progress=False)
    assert str(root) in str(excinfo.value)


def test_second_preparation_reads_the_cache(site, tmp_path):
    cache = PreprocessedCache(tmp_path / "cache")
    first = prepare_site(site, PLAN, TISSUE, cache=cache, progress=False)
    assert (cache.stats.builds, cache.stats.hits) == (2, 0)
    second = prepare_site(site, PLAN, TISSUE, cache=cache, progress=False)
    assert (cache.stats.builds, cache.stats.hits) == (2, 2)
    for a, b in zip(first.subjects, second.subjects, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_cache_inside_the_data_folder_is_refused(site):
    with pytest.raises(NeurofedError, match="inside the data folder"):
        prepare_site(
            site, PLAN, TISSUE, cache=PreprocessedCache(site / "derivatives" / "cache"), progress=False
        )
    assert not (site / "derivatives").exists()


def test_unlabelled_subjects_are_prepared_when_labels_are_optional(tmp_path, head_phantoms):
    root = tmp_path / "site"
    subject = add_subject(root, head_phantoms, "sub-01")
    subject.label.unlink()

    with pytest.raises(NeurofedError):
        prepare_site(root, PLAN, TISSUE, progress=False)
    prepared = prepare_site(root, PLAN, TISSUE, require_label=False, progress=False)
    assert [s.label for s in prepared.subjects] == [None]
