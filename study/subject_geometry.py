"""Where one subject's anatomy lands: its random deformation, the bounds of that deformation, the grid.

A subject's label map is deformed by a small random affine plus a smooth elastic field
(:class:`Deformation`); :func:`index_coefficients` folds the deformation and the label map's affine into
separable cosine coefficients that give label-map voxel indices at output points; the output grid is the
site's field of view around the deformed brain (:func:`field_of_view`). Used by study/image_synthesis.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from study.scanner_profiles import MIN_FOV_MARGIN_MM, ScannerProfile

DEFORMATION_LENGTH_MM = 256.0
"""Length over which the elastic deformation's cosine basis spans half a period at its lowest order."""
ELASTIC_ORDER = 3
"""Highest cosine order of the elastic deformation: shortest half-wavelength 256 / 3 ~ 85 mm."""


@dataclass(frozen=True)
class Deformation:
    """Maps output world points x (mm, RAS) to label-map world points ``M x + u(x)``.

    ``matrix`` is the 4x4 affine part M; ``elastic`` (3, K, K, K) holds the cosine coefficients (mm)
    of the smooth displacement u over :func:`cosine_basis` about ``center``.
    """

    matrix: np.ndarray
    elastic: np.ndarray
    center: np.ndarray

    def displacement_bound(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Largest |u| (3,) mm per component over the box [lo, hi] mm, with 1 mm to spare.

        Sampled every 8 mm: u's shortest half-wavelength is ~85 mm, so it cannot peak between samples
        by more than a small fraction of a millimetre.
        """
        bases = []
        for d in range(3):
            coords = np.linspace(lo[d], hi[d], max(2, int(np.ceil((hi[d] - lo[d]) / 8.0)) + 1))
            full = cosine_basis(coords, self.center[d], ELASTIC_ORDER)
            bases.append(full[[0] + list(range(2, ELASTIC_ORDER + 2))])  # constant and cosine rows
        return np.array([np.abs(separable(self.elastic[c], bases)).max() for c in range(3)]) + 1.0


@dataclass(frozen=True)
class DeformationRange:
    """How far a subject's anatomy may move: the spread of the random affine and elastic deformation.

    Each affine parameter is drawn from a normal distribution with the ``*_std`` and clipped to the
    ``*_max``; the overall scale is uniform in ``1 +- scaling``; the elastic field's RMS displacement is
    uniform in ``elastic_rms_mm``. `SCANNER_DEFORMATION` is what `synthesize_sites` uses (the spread of
    subjects a site scans); the domain-randomized generator of study/domain_randomization.py widens it.
    """

    rotation_std_deg: float = 4.0
    rotation_max_deg: float = 8.0
    scaling: float = 0.04
    axis_scaling_std: float = 0.02
    axis_scaling_max: float = 0.04
    shear_std: float = 0.02
    shear_max: float = 0.04
    shift_std_mm: float = 3.0
    shift_max_mm: float = 6.0
    elastic_rms_mm: tuple[float, float] = (1.0, 2.5)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["elastic_rms_mm"] = list(self.elastic_rms_mm)
        return d


SCANNER_DEFORMATION = DeformationRange()


def draw_deformation(
    rng: np.random.Generator, center: np.ndarray, spread: DeformationRange = SCANNER_DEFORMATION
) -> Deformation:
    """A random affine (rotation, scaling, shear, shift about ``center``) plus a smooth elastic field."""
    angles = np.deg2rad(
        np.clip(rng.normal(0.0, spread.rotation_std_deg, 3), -spread.rotation_max_deg, spread.rotation_max_deg)
    )
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    overall = rng.uniform(1.0 - spread.scaling, 1.0 + spread.scaling)
    axis_scaling = np.clip(
        rng.normal(0.0, spread.axis_scaling_std, 3), -spread.axis_scaling_max, spread.axis_scaling_max
    )
    scaling = np.diag(overall * np.exp(axis_scaling))
    shear = np.eye(3) + np.triu(
        np.clip(rng.normal(0.0, spread.shear_std, (3, 3)), -spread.shear_max, spread.shear_max), 1
    )
    linear = rotation @ scaling @ shear
    shift = np.clip(rng.normal(0.0, spread.shift_std_mm, 3), -spread.shift_max_mm, spread.shift_max_mm)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center + shift - linear @ center

    k = ELASTIC_ORDER + 1
    a, b, c = np.meshgrid(*[np.arange(k)] * 3, indexing="ij")
    order2 = (a**2 + b**2 + c**2).astype(float)
    weight = np.where(order2 > 0, 1.0 / np.maximum(order2, 1.0), 0.0)
    # Mean square of a product of cosines is 1/2 per non-constant factor.
    mean_square = (weight**2 * 0.5 ** ((a > 0) + (b > 0) + (c > 0))).sum()
    rms_mm = rng.uniform(*spread.elastic_rms_mm)
    elastic = rng.standard_normal((3, k, k, k)) * weight * (rms_mm / np.sqrt(mean_square))
    return Deformation(matrix=matrix, elastic=elastic, center=np.asarray(center, float))


def cosine_basis(coords_mm: np.ndarray, center_mm: float, order: int) -> np.ndarray:
    """Rows ``[1, x, cos(pi t), ..., cos(order pi t)]`` at ``coords_mm``, t = (x - center) / L + 1/2."""
    t = (coords_mm - center_mm) / DEFORMATION_LENGTH_MM + 0.5
    rows = [np.ones_like(coords_mm), coords_mm] + [np.cos(np.pi * n * t) for n in range(1, order + 1)]
    return np.stack(rows)


def separable(coefficients: np.ndarray, bases: Sequence[np.ndarray]) -> np.ndarray:
    """``sum_abc C[a,b,c] B0[a,i] B1[b,j] B2[c,k]`` as an (i, j, k) float64 array.

    Plain ``einsum`` (no BLAS), as fast here as a matrix product: in `flwr run`'s simulation the sites are
    synthesized while Flower starts Ray in another thread, and OpenBLAS's fork handler shuts its worker
    threads down under a running threaded product, which then waits for them forever (a hang seen in CI).
    """
    b0, b1, b2 = bases
    t = np.einsum("abc,ck->abk", coefficients, b2)
    u = np.einsum("abk,bj->ajk", t, b1)
    return np.einsum("ajk,ai->ijk", u, b0)


def index_coefficients(deformation: Deformation, label_affine: np.ndarray) -> np.ndarray:
    """Coefficients (3, 5, 5, 5) over :func:`cosine_basis` rows giving label-map voxel indices.

    Index = inv(label_affine) @ (M x + u(x)); affine terms sit on the [1, x] rows, the elastic
    cosine terms on the cosine rows (cos order 0 is the constant row).
    """
    to_index = np.linalg.inv(label_affine)
    linear = to_index[:3, :3] @ deformation.matrix[:3, :3]
    offset = to_index[:3, :3] @ deformation.matrix[:3, 3] + to_index[:3, 3]
    n = ELASTIC_ORDER + 2
    coefficients = np.zeros((3, n, n, n))
    coefficients[:, 0, 0, 0] = offset
    coefficients[:, 1, 0, 0] = linear[:, 0]
    coefficients[:, 0, 1, 0] = linear[:, 1]
    coefficients[:, 0, 0, 1] = linear[:, 2]
    rows = np.array([0] + list(range(2, n)))  # cosine order -> basis row
    elastic_index = np.einsum("cd,dabe->cabe", to_index[:3, :3], deformation.elastic)
    coefficients[np.ix_(range(3), rows, rows, rows)] += elastic_index
    return coefficients


def world_box(mask_any: Sequence[np.ndarray], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) bounding box of the voxels a mask marks, from its per-axis ``any`` projections."""
    lo_hi = []
    for proj in mask_any:
        idx = np.flatnonzero(proj)
        lo_hi.append((idx[0] - 0.5, idx[-1] + 0.5))
    corners = np.array(
        [[lo_hi[0][i], lo_hi[1][j], lo_hi[2][k], 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    world = (affine @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def projections(mask: np.ndarray) -> list[np.ndarray]:
    return [mask.any(axis=tuple(a for a in range(3) if a != d)) for d in range(3)]


def preimage_box(
    lo: np.ndarray, hi: np.ndarray, matrix: np.ndarray, bound: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Output-space box of every x with ``M x + u(x)`` in the label-world box [lo, hi], given |u| <= bound."""
    lo, hi = lo - bound, hi + bound
    corners = np.array(
        [[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    pre = (np.linalg.inv(matrix) @ corners.T)[:3]
    return pre.min(axis=1), pre.max(axis=1)


@dataclass(frozen=True)
class OutputGrid:
    """Axis-aligned RAS output grid: voxel (i, j, k) centre at ``origin + spacing * (ijk + 0.5)`` mm."""

    origin: np.ndarray
    shape: tuple[int, int, int]
    spacing: float

    def axis_mm(self, d: int, subsamples: int = 1) -> np.ndarray:
        """Centres (mm) along axis d of the grid refined ``subsamples`` times."""
        step = self.spacing / subsamples
        return self.origin[d] + step * (np.arange(self.shape[d] * subsamples) + 0.5)

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([self.spacing] * 3 + [1.0])
        affine[:3, 3] = self.origin + self.spacing / 2
        return affine


def field_of_view(
    brain: tuple[np.ndarray, np.ndarray],
    head: tuple[np.ndarray, np.ndarray],
    profile: ScannerProfile,
    rng: np.random.Generator,
    spacing_mm: float,
) -> OutputGrid:
    """The site's crop of the head: its margins around the brain, at most 5 mm of air past the head."""
    margins = np.array(profile.fov_margin_mm) * rng.uniform(0.85, 1.15, (3, 2))
    margins = np.maximum(margins, MIN_FOV_MARGIN_MM)
    lo = np.maximum(brain[0] - margins[:, 0], head[0] - 5.0)
    hi = np.minimum(brain[1] + margins[:, 1], head[1] + 5.0)
    lo = np.minimum(lo, brain[0] - MIN_FOV_MARGIN_MM)
    hi = np.maximum(hi, brain[1] + MIN_FOV_MARGIN_MM)
    shape = np.ceil((hi - lo) / spacing_mm).astype(int)
    origin = (lo + hi) / 2 - shape * spacing_mm / 2
    return OutputGrid(origin=origin, shape=tuple(int(n) for n in shape), spacing=float(spacing_mm))
