"""The preprocessed cache: hits, rebuilds on any input change, and corrupt entries never trusted."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import client.preprocessed_cache as cache_module
from client.preprocessed_cache import CACHE_DIR_ENV, PreprocessedCache, default_cache_dir
from client.preprocessing import PreprocessingPlan
from models.label_protocols import ASEG, TISSUE

PLAN = PreprocessingPlan(field_of_view_mm=(48.0, 56.0, 52.0))


@pytest.fixture
def subject(tmp_path, head_phantoms):
    return head_phantoms.write_subject(tmp_path / "data", "sub-01", head_phantoms.labels(), axcodes="LIA")


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Subject ids in the order the cache actually ran preprocessing for them."""
    calls: list[str] = []
    real = cache_module.preprocess_subject

    def counting(subject, plan, protocol):
        calls.append(subject.subject_id)
        return real(subject, plan, protocol)

    monkeypatch.setattr(cache_module, "preprocess_subject", counting)
    return calls


def assert_same(a, b) -> None:
    assert a.subject_id == b.subject_id and a.plan_fingerprint == b.plan_fingerprint
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.transform.grid_affine, b.transform.grid_affine)
    np.testing.assert_array_equal(a.transform.native_affine, b.transform.native_affine)
    assert a.transform.native_shape == b.transform.native_shape
    assert a.transform.grid_shape == b.transform.grid_shape


def entries(root: Path) -> list[Path]:
    return sorted(root.iterdir()) if root.exists() else []


def test_second_call_is_a_hit_with_identical_arrays(tmp_path, subject, builds):
    cache = PreprocessedCache(tmp_path / "cache")
    first = cache.get_or_build(subject, PLAN, TISSUE)
    second = cache.get_or_build(subject, PLAN, TISSUE)
    assert builds == ["sub-01"]
    assert (cache.stats.hits, cache.stats.builds, cache.stats.discarded) == (1, 1, 0)
    assert_same(first, second)
    # Only the finished entry is left: no temporary files.
    assert [p.suffix for p in entries(cache.root)] == [".npz"]


def test_a_hit_maps_the_arrays_read_only_from_the_entry_instead_of_loading_them(tmp_path, subject):
    import mmap

    cache = PreprocessedCache(tmp_path / "cache")
    built = cache.get_or_build(subject, PLAN, TISSUE)
    hit = cache.get_or_build(subject, PLAN, TISSUE)
    for array in (hit.image, hit.label):
        assert isinstance(array.base, mmap.mmap) or isinstance(getattr(array.base, "base", None), mmap.mmap)
        assert not array.flags.writeable  # nothing downstream can change the cache through it
    assert_same(hit, built)


def test_touching_a_file_without_changing_it_still_hits(tmp_path, subject, builds):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.get_or_build(subject, PLAN, TISSUE)
    os.utime(subject.images["T1w"], (1_000_000_000, 1_000_000_000))
    cache.get_or_build(subject, PLAN, TISSUE)
    assert builds == ["sub-01"]


def test_plan_change_rebuilds(tmp_path, subject, builds):
    cache = PreprocessedCache(tmp_path / "cache")
    cache.get_or_build(subject, PLAN, TISSUE)
    other = cache.get_or_build(subject, dataclasses.replace(PLAN, clip_percentiles=(1.0, 99.0)), TISSUE)
    assert builds == ["sub-01", "sub-01"]
    assert other.plan_fingerprint != PLAN.fingerprint()
    assert len(entries(cache.root)) == 2


def test_protocol_change_rebuilds(tmp_path, subject, builds):
    cache = PreprocessedCache(tmp_path / "cache")
    tissue = cache.get_or_build(subject, PLAN, TISSUE)
    aseg = cache.get_or_build(subject, PLAN, ASEG)
    assert builds == ["sub-01", "sub-01"]
    assert int(aseg.label.max()) > int(tissue.label.max())


def test_source_content_change_rebuilds(tmp_path, subject, builds, head_phantoms):
    cache = PreprocessedCache(tmp_path / "cache")
    before = cache.get_or_build(subject, PLAN, TISSUE)
    # Same file name, new content (another noise draw), as when a site re-exports a scan.
    stored = nib.load(subject.images["T1w"])
    changed = np.asarray(stored.dataobj) * np.float32(1.5) + np.float32(0.01)
    nib.save(nib.Nifti1Image(changed, stored.affine), subject.images["T1w"])
    after = cache.get_or_build(subject, PLAN, TISSUE)
    assert builds == ["sub-01", "sub-01"]
    assert not np.array_equal(before.image, after.image)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not an npz file")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the image array
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, garbage, flip_a_byte])
def test_corrupt_entry_is_discarded_and_rebuilt(tmp_path, subject, builds, caplog, damage):
    cache = PreprocessedCache(tmp_path / "cache")
    fresh = cache.get_or_build(subject, PLAN, TISSUE)
    [entry] = entries(cache.root)
    damage(entry)

    with caplog.at_level(logging.WARNING, logger="client.preprocessed_cache"):
        rebuilt = cache.get_or_build(subject, PLAN, TISSUE)

    assert builds == ["sub-01", "sub-01"]
    assert cache.stats.discarded == 1
    assert any(str(entry) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert_same(rebuilt, fresh)
    # The rebuilt entry is sound again: the next call is a hit.
    assert_same(cache.get_or_build(subject, PLAN, TISSUE), fresh)
    assert builds == ["sub-01", "sub-01"]


def test_entry_with_a_tampered_checksum_is_not_trusted(tmp_path, subject, builds):
    cache = PreprocessedCache(tmp_path / "cache")
    fresh = cache.get_or_build(subject, PLAN, TISSUE)
    [entry] = entries(cache.root)
    # A well-formed npz whose image differs from what its record says.
    with np.load(entry) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["image"] = arrays["image"] + np.float32(1.0)
    with open(entry, "wb") as f:
        np.savez(f, **arrays)

    assert_same(cache.get_or_build(subject, PLAN, TISSUE), fresh)
    assert builds == ["sub-01", "sub-01"]


def test_failed_write_leaves_nothing_behind(tmp_path, subject, monkeypatch, caplog):
    cache = PreprocessedCache(tmp_path / "cache")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.np, "savez", disk_full)
    with caplog.at_level(logging.WARNING, logger="client.preprocessed_cache"):
        result = cache.get_or_build(subject, PLAN, TISSUE)
    assert result.image.shape == (1, *PLAN.grid_shape)  # the subject is still usable
    assert entries(cache.root) == []
    assert any(CACHE_DIR_ENV in r.getMessage() for r in caplog.records)


def test_cache_never_writes_into_the_data_folder(tmp_path, subject):
    data = tmp_path / "data"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    PreprocessedCache(tmp_path / "cache").get_or_build(subject, PLAN, TISSUE)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before


def test_unlabelled_subject_round_trips(tmp_path, subject, builds):
    unlabelled = dataclasses.replace(subject, label=None)
    cache = PreprocessedCache(tmp_path / "cache")
    first = cache.get_or_build(unlabelled, PLAN, TISSUE)
    second = cache.get_or_build(unlabelled, PLAN, TISSUE)
    assert builds == ["sub-01"]
    assert first.label is None and second.label is None
    np.testing.assert_array_equal(first.image, second.image)


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert PreprocessedCache().root == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "neurofed" / "preprocessed"
