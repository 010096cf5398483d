"""Shared fixtures: the real FreeSurfer label maps (../shared/data/label_maps), small synthetic heads, the
Flower task identity, a stand-in Flower grid, and the torch thread count a module asks for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from common.ordered_work import usable_cores

LABEL_MAPS_ENV = "NEUROFED_LABEL_MAPS"
DEFAULT_LABEL_MAPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "label_maps"

# Tests may import the benchmarks' helpers (bench/ is not an installed package).
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

FEDERATION_MODULES = ("test_deployment.py", "test_faults.py")
"""Modules that run whole federations of processes on loopback, minutes in all. `make test` runs the suite in
pytest-xdist workers: one takes these first, one after the other, while the others take the short modules."""
REHEARSAL_MODULE = "test_rehearsal.py"
"""The rehearsal, a federation of its own (two minutes): queued second, so that another worker runs it while
the federation modules run; queued after them it ran alone at the end, and queued last it started late."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per core, at most 4."""
    return usable_cores(4)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole modules to a worker (each module fixture is built once), `FEDERATION_MODULES` as one unit.

    xdist's ``--dist loadgroup`` says this with markers, but here (pytest 9.2, xdist 3.8) it did not group."""
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "federations" if Path(module).name in FEDERATION_MODULES else module

    return ModuleScheduling(config, log)


if (_workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT")) and "OMP_NUM_THREADS" not in os.environ:
    # Each worker (and every process its tests start) gets its share of the cores: torch's default of
    # one thread per core in each worker would make them wait for each other. A module may still ask for
    # more with TORCH_THREADS.
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores(os.cpu_count() or 1) // int(_workers)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`FEDERATION_MODULES`, then `REHEARSAL_MODULE`, then the others in their order (a stable sort). The
    workers take modules in this order (``--no-loadscope-reorder``)."""
    first = (*FEDERATION_MODULES, REHEARSAL_MODULE)
    rank = {name: i for i, name in enumerate(first)}
    items.sort(key=lambda item: rank.get(item.path.name, len(first)))


def _label_maps_folder() -> Path:
    return Path(os.environ.get(LABEL_MAPS_ENV, DEFAULT_LABEL_MAPS))


def _has_label_maps(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("training_seg_*.nii.gz"))


@pytest.fixture(scope="session")
def label_maps_dir() -> Path:
    """The folder of real label maps ``training_seg_*.nii.gz``; skips the test when it is absent."""
    folder = _label_maps_folder()
    if not _has_label_maps(folder):
        pytest.skip(f"real label maps not found in {folder} (set {LABEL_MAPS_ENV} to their folder)")
    return folder


@pytest.fixture(scope="session")
def anatomy_label_maps() -> Path | None:
    """The real label maps' folder where present, else None (callers fall back to the built-in phantom)."""
    folder = _label_maps_folder()
    return folder if _has_label_maps(folder) else None


class HeadPhantoms:
    """Small nested-ellipsoid heads for fast tests of preprocessing, the cache and site preparation.

    Label maps hold FreeSurfer values in RAS voxel order at 1 mm: scalp/skull (515), extra-cerebral CSF
    (24), cortex (3/42), white matter (2/41) and lateral ventricles (4/43); optionally a neck (507) that
    runs to the inferior edge. Images are T1-like: air dark, white matter brightest, a little noise.
    """

    @staticmethod
    def labels(
        shape: tuple[int, int, int] = (48, 56, 52),
        centre_shift: tuple[float, float, float] = (0.0, 0.0, 0.0),
        head_radii: tuple[float, float, float] = (20.0, 24.0, 22.0),
        csf_mm: float = 2.0,
        cortex_mm: float = 3.0,
        ventricles: bool = True,
        neck: bool = False,
    ) -> np.ndarray:
        """int16 (X, Y, Z) FreeSurfer label map of a head centred at the volume centre + ``centre_shift``."""
        centre = (np.asarray(shape) - 1) / 2 + np.asarray(centre_shift)
        x, y, z = np.meshgrid(*(np.arange(n) - c for n, c in zip(shape, centre, strict=True)), indexing="ij")

        def inside(radii) -> np.ndarray:
            return (x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2 <= 1.0

        head = np.asarray(head_radii, dtype=float)
        labels = np.zeros(shape, dtype=np.int16)
        if neck:
            labels[((x / (0.5 * head[0])) ** 2 + (y / (0.5 * head[1])) ** 2 <= 1.0) & (z < 0)] = 507
        labels[inside(head)] = 515
        labels[inside(head - 3.0)] = 24
        brain = inside(head - 3.0 - csf_mm)
        left = x < 0
        labels[brain] = np.where(left, 3, 42)[brain]
        wm = inside(head - 3.0 - csf_mm - cortex_mm)
        labels[wm] = np.where(left, 2, 41)[wm]
        for side, value in ((-1, 4), (1, 43)) if ventricles else ():
            ventricle = ((x - side * 4.0) / 2.5) ** 2 + (y / 7.0) ** 2 + (z / 4.0) ** 2 <= 1.0
            labels[ventricle & wm] = value
        return labels

    @staticmethod
    def t1(labels: np.ndarray, seed: int = 0, noise: float = 0.02) -> np.ndarray:
        """float32 T1-like image of a FreeSurfer label map (same shape); labels not listed are mid-grey."""
        intensity = np.full(int(labels.max()) + 1, 0.5, dtype=np.float32)
        intensity[0] = 0.0
        intensity[[24, 4, 43]] = 0.25
        intensity[[3, 42]] = 0.55
        intensity[[2, 41]] = 0.85
        intensity[[507, 515]] = 0.45
        rng = np.random.default_rng(seed)
        image = intensity[labels] + rng.normal(0.0, noise, labels.shape).astype(np.float32)
        return np.abs(image)

    @staticmethod
    def reorient(
        array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str] | str
    ) -> tuple[np.ndarray, np.ndarray]:
        """An RAS-ordered ``array`` and ``affine`` stored in voxel order ``axcodes`` (same world points)."""
        from nibabel import orientations

        change = orientations.ornt_transform(
            orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(tuple(axcodes))
        )
        stored = np.ascontiguousarray(orientations.apply_orientation(array, change))
        return stored, affine @ orientations.inv_ornt_aff(change, array.shape)

    def write_subject(
        self,
        folder: Path,
        subject_id: str,
        labels: np.ndarray,
        affine: np.ndarray | None = None,
        axcodes: str = "RAS",
        with_mask: bool = False,
        seed: int = 0,
    ):
        """Write image, label (and brain mask) NIfTI files into ``folder``; returns their ``SubjectFiles``.

        ``affine`` is the RAS-order affine of ``labels`` (default: 1 mm, origin off-centre); the files are
        stored in voxel order ``axcodes``.
        """
        import nibabel as nib

        from client.subjects import SubjectFiles

        if affine is None:
            affine = np.diag([1.0, 1.0, 1.0, 1.0])
            affine[:3, 3] = (-23.5, -31.25, -17.0)
        folder.mkdir(parents=True, exist_ok=True)
        volumes = {"T1w": self.t1(labels, seed), "dseg": labels}
        if with_mask:
            brain = (labels > 0) & (labels < 500) & (labels != 24)
            volumes["mask"] = brain.astype(np.uint8)
        paths = {}
        for suffix, data in volumes.items():
            stored, stored_affine = self.reorient(data, affine, axcodes)
            paths[suffix] = folder / f"{subject_id}_{suffix}.nii.gz"
            nib.save(nib.Nifti1Image(stored, stored_affine), paths[suffix])
        return SubjectFiles(subject_id, {"T1w": paths["T1w"]}, label=paths["dseg"], mask=paths.get("mask"))


@pytest.fixture(scope="session")
def head_phantoms() -> HeadPhantoms:
    """Factory of small synthetic heads (label maps, T1-like images, subject files on disk)."""
    return HeadPhantoms()


@pytest.fixture()
def task_identity():
    """Flower messages read the run/task identity of the process, which its runtime normally sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class NodeGrid:
    """The part of a Flower Grid a strategy's ``configure_train`` / ``configure_evaluate`` reads."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


@pytest.fixture()
def node_grid() -> type[NodeGrid]:
    """``node_grid([7, 8])``: a stand-in Flower Grid whose nodes are 7 and 8."""
    return NodeGrid


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(request):
    """A test module that sets ``TORCH_THREADS = n`` runs with n torch threads (restored afterwards)."""
    wanted = getattr(request.module, "TORCH_THREADS", None)
    if wanted is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(previous)
