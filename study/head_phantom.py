"""A procedural head phantom: a FreeSurfer-style whole-head label map, different for every seed.

The project's default anatomy when no real label maps are at hand. Structures are ellipsoids,
cylinders and smooth random fields placed in RAS millimetres around the brain centre; the cerebral
cortex is a folded ribbon (random sulci cut into the white matter, grey matter a fixed thickness
around it). Values follow the FreeSurfer lookup table as in SynthSeg's training maps:

====================  =======================  ==============================
structure             left / right (or both)   tissue class (TISSUE protocol)
====================  =======================  ==============================
cerebral WM           2 / 41                   white matter
cerebral cortex       3 / 42                   grey matter
lateral ventricle     4 / 43                   CSF
inf. lat. ventricle   5 / 44                   CSF
cerebellum WM         7 / 46                   white matter
cerebellum cortex     8 / 47                   grey matter
thalamus              10 / 49                  grey matter
caudate               11 / 50                  grey matter
putamen               12 / 51                  grey matter
pallidum              13 / 52                  grey matter
hippocampus           17 / 53                  grey matter
3rd / 4th ventricle   14 / 15                  CSF
brain-stem            16                       white matter
extra-cerebral CSF    24                       CSF
soft tissue, skin     507, 511                 background
skull, marrow         515, 516                 background
====================  =======================  ==============================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

PHANTOM_FOV_MM: tuple[float, float, float] = (192.0, 232.0, 208.0)
"""Default extent of the phantom volume along R, A, S in mm; the head fits inside for every seed."""

AIR, CSF, BRAIN_STEM, THIRD_VENTRICLE, FOURTH_VENTRICLE = 0, 24, 16, 14, 15
SOFT_TISSUE, SKIN, SKULL, MARROW = 507, 511, 515, 516
# (left, right) FreeSurfer values; left is x < 0 in RAS.
CEREBRAL_WM, CORTEX, LATERAL_VENTRICLE, INF_LAT_VENTRICLE = (2, 41), (3, 42), (4, 43), (5, 44)
CEREBELLUM_WM, CEREBELLUM_CORTEX = (7, 46), (8, 47)
THALAMUS, CAUDATE, PUTAMEN, PALLIDUM, HIPPOCAMPUS = (10, 49), (11, 50), (12, 51), (13, 52), (17, 53)


@dataclass(frozen=True)
class PhantomAnatomy:
    """The random parameters of one phantom subject (lengths in mm, RAS).

    Attributes:
        scale: overall brain size factor.
        center: brain centre (x, y, z) in mm.
        cerebrum_radii: (left-right, anterior-posterior, superior) semi-axes of the cerebrum.
        inferior_radius: semi-axis of the cerebrum below its centre (the flatter underside).
        asymmetry: relative left-minus-right hemisphere width.
        shape_wobble: relative amplitude of the smooth random deformation of the brain outline.
        sulcus_depth: depth of the deepest sulci below the brain outline.
        cortex_thickness: thickness of the cortical ribbon.
        gyrus_scale: correlation length of the folding field (gyri are a few times wider).
        ventricle_scale: size factor of the ventricles.
        fissure_bend: sideways bend of the interhemispheric fissure.
        csf_thickness, skull_thickness, scalp_thickness: layers outside the brain.
    """

    scale: float
    center: tuple[float, float, float]
    cerebrum_radii: tuple[float, float, float]
    inferior_radius: float
    asymmetry: float
    shape_wobble: float
    sulcus_depth: float
    cortex_thickness: float
    gyrus_scale: float
    ventricle_scale: float
    fissure_bend: float
    csf_thickness: float
    skull_thickness: float
    scalp_thickness: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PhantomAnatomy:
        s = float(rng.uniform(0.96, 1.04))
        return cls(
            scale=s,
            center=(0.0, float(rng.uniform(-3, 3)), float(14 + rng.uniform(-3, 3))),
            cerebrum_radii=tuple(float(r * s * rng.uniform(0.98, 1.02)) for r in (68.5, 86.0, 59.0)),
            inferior_radius=float(49.0 * s * rng.uniform(0.97, 1.03)),
            asymmetry=float(rng.uniform(-0.03, 0.03)),
            shape_wobble=float(rng.uniform(0.004, 0.012)),
            sulcus_depth=float(rng.uniform(12.0, 16.0)),
            cortex_thickness=float(rng.uniform(2.5, 3.1)),
            gyrus_scale=float(rng.uniform(5.5, 7.0)),
            ventricle_scale=float(rng.uniform(0.75, 1.5)),
            fissure_bend=float(rng.uniform(-3.0, 3.0)),
            csf_thickness=float(rng.uniform(1.5, 3.0)),
            skull_thickness=float(rng.uniform(5.0, 8.0)),
            scalp_thickness=float(rng.uniform(5.0, 9.0)),
        )


class _Grid:
    """Voxel-centre coordinates (mm, RAS) of an axis-aligned volume centred on the origin."""

    def __init__(self, shape: tuple[int, int, int], spacing_mm: float) -> None:
        self.shape = shape
        self.spacing = spacing_mm
        self.axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * spacing_mm) for n in shape]
        self.affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
        self.affine[:3, 3] = [float(a[0]) for a in self.axes]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Index slices of the voxels within [lo, hi] mm and their open-grid coordinates."""
        slices = []
        for a, low, high in zip(self.axes, lo, hi, strict=True):
            i0 = int(np.searchsorted(a, low, side="left"))
            i1 = int(np.searchsorted(a, high, side="right"))
            slices.append(slice(i0, max(i0, i1)))
        coords = [
            a[s].reshape([-1 if k == d else 1 for k in range(3)])
            for d, (a, s) in enumerate(zip(self.axes, slices, strict=True))
        ]
        return tuple(slices), coords


def _ellipsoid_distance(
    coords: list[np.ndarray], center: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an ellipsoid surface: (rho - 1) / |grad rho|."""
    q = [(c - c0) / r for c, c0, r in zip(coords, center, radii, strict=True)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    grad = np.sqrt((q[0] / radii[0]) ** 2 + (q[1] / radii[1]) ** 2 + (q[2] / radii[2]) ** 2)
    return (rho - 1.0) * rho / np.maximum(grad, 1e-6)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: float, correlation_mm: float
) -> np.ndarray:
    """Zero-mean, unit-std random field (float32, ``shape``) smooth over about ``correlation_mm``.

    White noise on a coarse grid of half the correlation length, Gaussian-smoothed and linearly
    interpolated up: the cost does not depend on how fine the target grid is.
    """
    coarse_step = correlation_mm / 2.0
    coarse_shape = [int(np.ceil(n * spacing_mm / coarse_step)) + 3 for n in shape]
    coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    coarse /= coarse.std() + 1e-12
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    field = ndi.zoom(coarse, zoom, order=1, grid_mode=True, mode="grid-wrap")
    return field[tuple(slice(0, n) for n in shape)]


def _by_side(x: np.ndarray, left_right: tuple[int, int]) -> np.ndarray:
    """The left value where x < 0 (RAS), the right value elsewhere (int16, broadcast shape of x)."""
    return np.where(x < 0, np.int16(left_right[0]), np.int16(left_right[1]))


def _paint_ellipsoid(
    labels: np.ndarray,
    grid: _Grid,
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
    value: int | tuple[int, int],
    inside: np.ndarray | None = None,
    midline_x: float = 0.0,
) -> None:
    """Paint an ellipsoid, mirrored about ``midline_x`` when ``value`` is a (left, right) pair.

    ``inside`` (bool, full volume) restricts painting to where it is True.
    """
    centers = [center]
    if isinstance(value, tuple):
        offset = abs(center[0] - midline_x)
        centers = [(midline_x - offset, *center[1:]), (midline_x + offset, *center[1:])]
    for k, c in enumerate(centers):
        lo, hi = np.subtract(c, radii), np.add(c, radii)
        sl, coords = grid.box(lo, hi)
        q = sum(((co - c0) / r) ** 2 for co, c0, r in zip(coords, c, radii, strict=True))
        where = q <= 1.0
        if inside is not None:
            where &= inside[sl]
        v = value[k] if isinstance(value, tuple) else value
        labels[sl][where] = v


def make_head_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] | None = None, spacing_mm: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A random whole-head FreeSurfer label map in RAS voxel order.

    Args:
        rng: the only source of randomness; the same generator state gives the same phantom.
        shape: voxels along R, A, S; default covers :data:`PHANTOM_FOV_MM` at ``spacing_mm``.
        spacing_mm: isotropic voxel size in mm; 1.0 resolves the cortical ribbon, 1.5-2.0 is faster.

    Returns:
        ``(labels, affine)``: int16 array of ``shape`` with FreeSurfer values (see module docstring),
        and its 4x4 voxel-to-world affine (RAS mm, diagonal, origin at the volume centre).
    """
    if shape is None:
        shape = tuple(int(np.ceil(f / spacing_mm)) for f in PHANTOM_FOV_MM)
    grid = _Grid(tuple(int(n) for n in shape), float(spacing_mm))
    anatomy = PhantomAnatomy.draw(rng)
    labels = np.zeros(grid.shape, dtype=np.int16)
    cerebellum = _cerebellum_geometry(anatomy)
    brainstem = _brainstem_geometry(anatomy)

    intracranial_distance = _paint_head(labels, grid, anatomy, cerebellum, brainstem)
    _paint_cerebrum(labels, grid, anatomy, cerebellum, rng)
    _paint_deep_structures(labels, grid, anatomy)
    _paint_posterior_fossa(labels, grid, anatomy, cerebellum, brainstem, rng)
    # Nothing of the brain may reach beyond the skull's inner surface.
    labels[(intracranial_distance > 0) & (labels > 0) & (labels < SOFT_TISSUE)] = SKULL
    return labels, grid.affine


def _cerebellum_geometry(a: PhantomAnatomy) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    cx, cy, cz = a.center
    s = a.scale
    return (cx, cy - 50 * s, cz - 36 * s), (50 * s, 28 * s, 22 * s)


def _brainstem_geometry(a: PhantomAnatomy) -> tuple[np.ndarray, np.ndarray, float]:
    """Top point, bottom point (mm) and radius (mm) of the brain-stem axis."""
    cx, cy, cz = a.center
    s = a.scale
    top = np.array([cx, cy - 14 * s, cz - 20 * s])
    bottom = np.array([cx, cy - 26 * s, cz - 62 * s])
    return top, bottom, 9.0 * s


def _segment_distance(coords: list[np.ndarray], top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel to the line segment top-bottom."""
    axis = bottom - top
    length2 = float(axis @ axis)
    rel = [c - t for c, t in zip(coords, top, strict=True)]
    t = np.clip(sum(r * a for r, a in zip(rel, axis, strict=True)) / length2, 0.0, 1.0)
    return np.sqrt(sum((r - t * a) ** 2 for r, a in zip(rel, axis, strict=True)))


def _paint_head(
    labels: np.ndarray,
    grid: _Grid,
    a: PhantomAnatomy,
    cerebellum: tuple[tuple[float, ...], tuple[float, ...]],
    brainstem: tuple[np.ndarray, np.ndarray, float],
) -> np.ndarray:
    """Scalp, skull and CSF-filled intracranial space; returns the distance (mm) to the skull's inner surface."""
    coords = [ax.reshape([-1 if k == d else 1 for k in range(3)]) for d, ax in enumerate(grid.axes)]
    rx, ry, rz = a.cerebrum_radii
    pad = a.csf_thickness
    upper = _ellipsoid_distance(coords, a.center, (rx + pad, ry + pad, rz + pad))
    lower = _ellipsoid_distance(coords, a.center, (rx + pad, ry + pad, a.inferior_radius + pad))
    cerebrum_space = np.where(coords[2] >= a.center[2], upper, lower)
    cb_center, cb_radii = cerebellum
    fossa = _ellipsoid_distance(coords, cb_center, tuple(r + pad + 1.0 for r in cb_radii))
    top, bottom, radius = brainstem
    canal = _segment_distance(coords, top, bottom) - (radius + pad)
    intracranial = np.minimum(np.minimum(cerebrum_space, fossa), canal)

    s = a.scale
    cx, cy, cz = a.center
    outer = a.skull_thickness + a.scalp_thickness
    neck_radial = np.sqrt(((coords[0] - cx) / (52 * s)) ** 2 + ((coords[1] - (cy - 12 * s)) / (58 * s)) ** 2)
    neck = np.where(coords[2] < cz - 30 * s, (neck_radial - 1.0) * 55 * s, np.inf)
    face = _ellipsoid_distance(coords, (cx, cy + 40 * s, cz - 48 * s), (54 * s, 48 * s, 42 * s))
    head = np.minimum(np.minimum(intracranial - outer, neck), face)

    labels[head <= 0] = SOFT_TISSUE
    labels[(head > -2.0) & (head <= 0)] = SKIN
    skull = (intracranial > 0) & (intracranial <= a.skull_thickness)
    labels[skull] = SKULL
    marrow = (intracranial > 1.5) & (intracranial <= a.skull_thickness - 1.5)
    labels[marrow] = MARROW
    labels[intracranial <= 0] = CSF
    return intracranial


def _paint_cerebrum(
    labels: np.ndarray,
    grid: _Grid,
    a: PhantomAnatomy,
    cerebellum: tuple[tuple[float, ...], tuple[float, ...]],
    rng: np.random.Generator,
) -> None:
    """Cerebral white matter and the folded cortical ribbon, split by the interhemispheric fissure."""
    rx, ry, rz = a.cerebrum_radii
    cx, cy, cz = a.center
    margin = 2.0
    lo = np.array([cx - rx * 1.1, cy - ry * 1.1, cz - a.inferior_radius * 1.1]) - margin
    hi = np.array([cx + rx * 1.1, cy + ry * 1.1, cz + rz * 1.1]) + margin
    sl, (x, y, z) = grid.box(lo, hi)
    box_shape = labels[sl].shape

    # Outline: an ellipsoid, wider on one side, flatter below, wobbled by a smooth random field.
    x_radius = np.where(x < cx, rx * (1 + a.asymmetry / 2), rx * (1 - a.asymmetry / 2))
    z_radius = np.where(z >= cz, rz, a.inferior_radius)
    q = [(x - cx) / x_radius, (y - cy) / ry, (z - cz) / z_radius]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    grad = np.sqrt((q[0] / x_radius) ** 2 + (q[1] / ry) ** 2 + (q[2] / z_radius) ** 2) / np.maximum(rho, 1e-6)
    # The wobble only pulls the outline inwards, so the brain never pushes into the skull.
    wobble = 1.0 + a.shape_wobble * np.clip(_smooth_noise(rng, box_shape, grid.spacing, 40.0) + 1.0, 0.0, 3.0)
    depth = (1.0 - rho * wobble) / np.maximum(grad, 1e-6)  # mm below the outline, approximately

    # The cerebellum and a tentorial gap are cut out of the cerebrum; that cut is cortex too.
    cb_center, cb_radii = cerebellum
    below_tentorium = _ellipsoid_distance([x, y, z], cb_center, cb_radii) - 2.5
    depth = np.minimum(depth, below_tentorium)

    # Interhemispheric fissure from the vertex down to the arched corpus callosum.
    s = a.scale
    x_mid = x - cx - a.fissure_bend * np.sin(np.pi * (y - cy) / ry)
    cc_half_length, cc_y = 38.0 * s, cy - 4.0 * s
    arch = np.sqrt(np.clip(1.0 - ((y - cc_y) / cc_half_length) ** 2, 0.0, None))
    callosal = (np.abs(y - cc_y) < cc_half_length) & (z < cz + 6.0 * s + 14.0 * s * arch)
    fissure_half_width = 1.0
    medial_depth = np.where(callosal, np.inf, np.abs(x_mid) - fissure_half_width)
    depth = np.minimum(depth, medial_depth)

    # Folding: each sulcus is a sheet (a zero crossing of a smooth random field) cut down from the
    # outline to a varying depth. White matter keeps away from the sheet by the cortex thickness on
    # both banks, so every gyrus is a white-matter core under a ribbon of constant thickness.
    folding = _smooth_noise(rng, box_shape, grid.spacing, a.gyrus_scale)
    gradient = np.sqrt(sum(g**2 for g in np.gradient(folding, grid.spacing)))
    sheet_distance = np.abs(folding) / np.maximum(gradient, 1e-6)  # mm to the nearest sulcus
    fundus = a.cortex_thickness + a.sulcus_depth * (
        0.6 + 0.4 * _smooth_noise(rng, box_shape, grid.spacing, 30.0)
    )
    thickness = a.cortex_thickness
    white = (depth > thickness + 0.3) & ((sheet_distance > thickness + 0.5) | (depth > fundus))
    # Grey matter: the rest of the outline, but for a thin CSF sheet down the middle of each sulcus.
    sulcal_csf = (sheet_distance < 0.5) & (depth < fundus - thickness)
    grey = (depth > 0) & ~white & ~sulcal_csf

    box = labels[sl]
    side = np.broadcast_to(x_mid, box_shape) < 0
    box[grey] = np.where(side[grey], CORTEX[0], CORTEX[1])
    box[white] = np.where(side[white], CEREBRAL_WM[0], CEREBRAL_WM[1])


def _paint_deep_structures(labels: np.ndarray, grid: _Grid, a: PhantomAnatomy) -> None:
    """Basal ganglia, thalami, hippocampi and the ventricles (positions relative to the brain centre)."""
    cx, cy, cz = a.center
    s, v = a.scale, a.ventricle_scale
    brain = (labels > 0) & (labels < SOFT_TISSUE) & (labels != CSF)

    def at(dx: float, dy: float, dz: float) -> tuple[float, float, float]:
        return (cx + dx * s, cy + dy * s, cz + dz * s)

    def size(*r: float) -> tuple[float, float, float]:
        return tuple(ri * s for ri in r)

    _paint_ellipsoid(labels, grid, at(25, 3, -2), size(6, 16, 10), PUTAMEN, brain, cx)
    _paint_ellipsoid(labels, grid, at(18, 0, -4), size(4, 9, 6), PALLIDUM, brain, cx)
    _paint_ellipsoid(labels, grid, at(15, 12, 4), size(5.5, 15, 8), CAUDATE, brain, cx)
    _paint_ellipsoid(labels, grid, at(10, -14, -4), size(10, 17, 9), THALAMUS, brain, cx)
    _paint_ellipsoid(labels, grid, at(28, -20, -19), size(6, 18, 6), HIPPOCAMPUS, brain, cx)

    # Lateral ventricles: arched bodies (lower at both ends) beside the midline under the callosum.
    body_lo = np.array([cx - 20 * s * v, cy - 42 * s, cz - 10 * s])
    body_hi = np.array([cx + 20 * s * v, cy + 34 * s, cz + 24 * s])
    sl, (x, y, z) = grid.box(body_lo, body_hi)
    half_width = 4.5 * s * v
    half_height = 7.0 * s * v
    y0 = cy - 4 * s
    centre_z = cz + 9 * s - 0.006 * (y - y0) ** 2 / s
    centre_x = (1.5 * s + half_width) * np.sign(x - cx + 1e-6)
    in_body = (
        ((x - cx - centre_x) / half_width) ** 2
        + ((y - y0) / (36 * s)) ** 2
        + ((z - centre_z) / half_height) ** 2
    ) <= 1.0
    box = labels[sl]
    box[in_body] = np.broadcast_to(_by_side(x - cx, LATERAL_VENTRICLE), box.shape)[in_body]
    # Atria and occipital horns, widening the ventricles towards the back.
    _paint_ellipsoid(labels, grid, at(13, -30, 4), size(5 * v, 13, 7 * v), LATERAL_VENTRICLE, brain, cx)
    _paint_ellipsoid(labels, grid, at(28, -10, -17), size(2 * v, 11, 2.5 * v), INF_LAT_VENTRICLE, brain, cx)
    _paint_ellipsoid(labels, grid, at(0, -8, -4), (1.3 * s * v, 14 * s, 8 * s), THIRD_VENTRICLE)


def _paint_posterior_fossa(
    labels: np.ndarray,
    grid: _Grid,
    a: PhantomAnatomy,
    cerebellum: tuple[tuple[float, ...], tuple[float, ...]],
    brainstem: tuple[np.ndarray, np.ndarray, float],
    rng: np.random.Generator,
) -> None:
    """Cerebellum (folded cortex around a branching white-matter core), brain-stem, 4th ventricle."""
    cb_center, cb_radii = cerebellum
    sl, coords = grid.box(np.subtract(cb_center, cb_radii), np.add(cb_center, cb_radii))
    box = labels[sl]
    distance = _ellipsoid_distance(coords, cb_center, cb_radii)
    inside = distance < 0
    x = coords[0] - cb_center[0]
    box[inside] = np.broadcast_to(_by_side(x, CEREBELLUM_CORTEX), box.shape)[inside]
    # Arbor vitae: a core per hemisphere with thin sheets (zero crossings of a random field) outwards.
    branches = np.abs(_smooth_noise(rng, box.shape, grid.spacing, 5.0)) < 0.25
    core = np.zeros(box.shape, dtype=bool)
    for side in (-1.0, 1.0):
        centre = (cb_center[0] + side * 20 * a.scale, cb_center[1] + 4 * a.scale, cb_center[2] + 2 * a.scale)
        core |= _ellipsoid_distance(coords, centre, (15 * a.scale, 11 * a.scale, 9 * a.scale)) < 0
    white = (core | (branches & (distance < -3.0))) & inside & (np.abs(np.broadcast_to(x, box.shape)) > 3.0)
    box[white] = np.broadcast_to(_by_side(x, CEREBELLUM_WM), box.shape)[white]

    top, bottom, radius = brainstem
    lo = np.minimum(top, bottom) - radius - 4
    hi = np.maximum(top, bottom) + radius + 4
    sl, coords = grid.box(lo, hi)
    t = np.clip((coords[2] - top[2]) / (bottom[2] - top[2]), 0.0, 1.0)
    # The pons bulges a third of the way down.
    local_radius = radius * (1.0 + 0.3 * np.exp(-(((t - 0.45) / 0.15) ** 2)))
    stem = _segment_distance(coords, top, bottom) < local_radius
    labels[sl][stem] = BRAIN_STEM
    s = a.scale
    fourth = (cb_center[0], cb_center[1] + 16 * s, cb_center[2] + 2 * s)
    _paint_ellipsoid(labels, grid, fourth, (5 * s, 3 * s, 7 * s), FOURTH_VENTRICLE)
