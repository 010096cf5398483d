"""A content-addressed cache of preprocessed subjects, so a site preprocesses each scan once per plan.

An entry's key is the SHA-256 of: the content of every input file (the plan's contrasts, the label map and
the mask), the subject id, the plan's fingerprint, the label protocol and `CACHE_FORMAT_VERSION`. Any change
to one of them is a different key; renaming or touching a file is not. Bump `CACHE_FORMAT_VERSION` whenever
preprocessing's output changes for the same inputs, so stale entries are never read.

Each entry is one uncompressed ``<key>.npz`` holding the arrays and a JSON ``meta`` record (key, subject,
transform, SHA-256 of each array). It is written to a temporary name in the cache folder and renamed into
place, so readers never see half an entry. A hit maps the image and label read-only from the entry
(`mapped_member`) instead of loading them, so a site's worker can hold hundreds of scans. An entry that
fails to load or verify is logged, deleted and rebuilt. The cache lives outside the site's data folder, which it never writes to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.preprocessing import NativeTransform, PreprocessedSubject, PreprocessingPlan, preprocess_subject
from client.subjects import SubjectFiles
from common.atomic_files import atomic_write
from models.errors import NeurofedError
from models.label_protocols import LabelProtocol

CACHE_FORMAT_VERSION = 1
"""Version of the entry layout and of preprocessing's output; part of every key."""
CACHE_DIR_ENV = "NEUROFED_CACHE_DIR"
"""Environment variable naming the cache folder; default ``~/.cache/neurofed/preprocessed``."""
_ENTRY_SUFFIX = ".npz"

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$NEUROFED_CACHE_DIR`` if set and non-empty, else ``~/.cache/neurofed/preprocessed``."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "neurofed" / "preprocessed"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks (scans are hundreds of MB)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise NeurofedError(f"{path}: file not found; run `neurofed-site check` on the data folder") from None
    except OSError as exc:
        raise NeurofedError(f"{path}: cannot read the file ({exc.strerror}); check its permissions") from None


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


@dataclass
class CacheStats:
    """What `PreprocessedCache.get_or_build` did: served from disk, built, or found a bad entry."""

    hits: int = 0
    builds: int = 0
    discarded: int = 0
    """Entries that failed to load or verify; each was deleted and counted again under ``builds``."""


class _BadEntry(Exception):
    """An entry on disk that must not be trusted."""


def mapped_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of the uncompressed ``.npz`` at ``path``, memory-mapped read-only.

    `np.savez` stores each array uncompressed as ``name.npy`` inside the zip, so its data lies in the file
    as it is: mapping it lets a site worker hold hundreds of preprocessed scans without their size in
    memory (the kernel pages in what training touches, and may drop it again).
    """
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise _BadEntry(f"{name} is compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        if local_header[:4] != b"PK\x03\x04":
            raise _BadEntry(f"{name}: no zip member header at its offset")
        name_length, extra_length = (
            int.from_bytes(local_header[26:28], "little"),
            int.from_bytes(local_header[28:30], "little"),
        )
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise _BadEntry(f"{name} holds Python objects")
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")
    return mapped.view(np.ndarray)  # a plain read-only array on the mapping (memmap's subclass quirks left out)


class PreprocessedCache:
    """Preprocessed subjects on disk under ``root``, keyed by input content, plan and protocol.

    Args:
        root: the cache folder, created on first write; default `default_cache_dir`.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.stats = CacheStats()

    def key(self, subject: SubjectFiles, plan: PreprocessingPlan, protocol: LabelProtocol) -> str:
        """Hex SHA-256 naming the entry of ``subject`` under ``plan`` and ``protocol``."""
        inputs = {f"image:{c}": subject.images[c] for c in plan.input_contrasts if c in subject.images}
        if subject.label is not None:
            inputs["label"] = subject.label
        if subject.mask is not None:
            inputs["mask"] = subject.mask
        record = {
            "format": CACHE_FORMAT_VERSION,
            "subject_id": subject.subject_id,
            "plan": plan.fingerprint(),
            "protocol": protocol.to_dict(),
            "inputs": {role: file_sha256(path) for role, path in sorted(inputs.items())},
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.root / f"{key}{_ENTRY_SUFFIX}"

    def get_or_build(
        self, subject: SubjectFiles, plan: PreprocessingPlan, protocol: LabelProtocol
    ) -> PreprocessedSubject:
        """The preprocessed ``subject``: read from the cache when a valid entry exists, else built and stored.

        Raises:
            NeurofedError: an input file cannot be read, or preprocessing rejects the subject.
        """
        key = self.key(subject, plan, protocol)
        path = self.entry_path(key)
        if path.exists():
            try:
                cached = self._read(path, key, plan)
            except Exception as exc:  # any failure to read or verify means the entry is not trusted
                log.warning(
                    "preprocessed cache entry %s for %s is corrupt (%s); deleting and rebuilding it",
                    path,
                    subject.subject_id,
                    exc,
                )
                self.stats.discarded += 1
                path.unlink(missing_ok=True)
            else:
                self.stats.hits += 1
                return cached
        built = preprocess_subject(subject, plan, protocol)
        self.stats.builds += 1
        self._write(path, key, built, subject)
        return built

    def _read(self, path: Path, key: str, plan: PreprocessingPlan) -> PreprocessedSubject:
        with np.load(path, allow_pickle=False) as entry:
            meta = json.loads(str(entry["meta"][()]))
            if meta.get("format") != CACHE_FORMAT_VERSION or meta.get("key") != key:
                raise _BadEntry("its key or format does not match its name")
            members = set(entry.files)
        image = mapped_member(path, "image")
        label = mapped_member(path, "label") if "label" in members else None
        expected = (len(plan.input_contrasts), *plan.grid_shape)
        if image.dtype != np.float32 or image.shape != expected:
            raise _BadEntry(f"image is {image.dtype} {image.shape}, expected float32 {expected}")
        if _array_sha256(image) != meta["image_sha256"]:
            raise _BadEntry("image checksum mismatch")
        if (label is None) != (meta["label_sha256"] is None):
            raise _BadEntry("label presence does not match its record")
        if label is not None:
            if label.dtype != np.uint8 or label.shape != expected[1:]:
                raise _BadEntry(f"label is {label.dtype} {label.shape}, expected uint8 {expected[1:]}")
            if _array_sha256(label) != meta["label_sha256"]:
                raise _BadEntry("label checksum mismatch")
        return PreprocessedSubject(
            subject_id=meta["subject_id"],
            image=image,
            label=label,
            transform=NativeTransform.from_dict(meta["transform"]),
            plan_fingerprint=meta["plan_fingerprint"],
        )

    def _write(self, path: Path, key: str, built: PreprocessedSubject, subject: SubjectFiles) -> None:
        """Store ``built`` atomically; a failure to write is logged, not fatal (the cache only saves time)."""
        meta = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "subject_id": built.subject_id,
            "plan_fingerprint": built.plan_fingerprint,
            "transform": built.transform.to_dict(),
            "image_sha256": _array_sha256(built.image),
            "label_sha256": None if built.label is None else _array_sha256(built.label),
            "sources": [str(p) for p in subject.all_files()],
        }
        arrays = {"image": built.image, "meta": np.array(json.dumps(meta))}
        if built.label is not None:
            arrays["label"] = built.label

        def write_npz(tmp: Path) -> None:
            # Through a file object: np.savez given a path would append ".npz" to any other name.
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        try:
            atomic_write(path, write_npz)  # creates the cache folder; fsyncs before the rename
        except OSError as exc:
            log.warning(
                "cannot write the preprocessed cache entry %s (%s); continuing without caching %s. "
                "Set %s to a writable folder to cache preprocessing",
                path,
                exc,
                subject.subject_id,
                CACHE_DIR_ENV,
            )
