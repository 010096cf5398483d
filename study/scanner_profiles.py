"""Simulated scanners: what makes one site's images look different from another's.

A :class:`ScannerProfile` is the complete, JSON-serialisable description of one simulated scanner:
tissue contrast, bias field, noise, acquisition voxel size, field of view and on-disk voxel
orientation. :func:`site_profiles` draws one profile per site around a few base sequences, so that
sites differ a lot (contrast ratios, slice thickness) while each site stays internally consistent.

Intensities are in arbitrary scanner units: tissue means are relative to the brightest brain tissue
of the weighting (white matter for T1w, CSF for T2w and PDw) and multiplied by ``intensity_scale``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.errors import NeurofedError
from models.label_protocols import NON_BRAIN_LABEL_MIN

WEIGHTINGS: tuple[str, ...] = ("T1w", "T2w", "PDw")
"""BIDS suffixes of the simulated weightings; a site's image file carries its profile's weighting."""

ORIENTATIONS: tuple[str, ...] = ("LIA", "RAS", "LPS", "LAS", "RPI", "ASL")
"""On-disk voxel orientations (nibabel axis codes) given to sites 1, 2, 3, ... in turn."""

PROFILE_STREAM = 0
"""First spawn-key element of the random streams that draw site profiles (see study.synthesis)."""

MIN_FOV_MARGIN_MM = 4.0
"""The field of view always extends at least this far beyond the brain: a site never cuts the brain."""


@dataclass(frozen=True)
class TissueMeans:
    """Mean intensity of each tissue group, relative to the weighting's brightest brain tissue."""

    csf: float
    grey_matter: float
    deep_grey: float
    cerebellar_cortex: float
    white_matter: float
    skull: float
    marrow: float
    soft_tissue: float
    skin: float

    def scaled(self, factors: Mapping[str, float]) -> TissueMeans:
        """A copy with each named group's mean multiplied by its factor."""
        return dataclasses.replace(self, **{k: getattr(self, k) * float(f) for k, f in factors.items()})


TISSUE_GROUPS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TissueMeans))

# FreeSurfer label -> tissue group whose mean it is drawn around. Brain labels not listed (lesions,
# vessels, small structures) look like grey matter; head labels >= 500 not listed like soft tissue.
_LABEL_GROUPS: dict[str, tuple[int, ...]] = {
    "csf": (4, 5, 14, 15, 24, 31, 43, 44, 63, 72),
    "grey_matter": (3, 17, 18, 26, 42, 53, 54, 58),
    "deep_grey": (10, 11, 12, 13, 49, 50, 51, 52),
    "cerebellar_cortex": (8, 47),
    "white_matter": (2, 7, 16, 28, 41, 46, 60, 85),
    "skull": (515,),
    "marrow": (516,),
    "skin": (511,),
    "soft_tissue": (507,),
}
LABEL_TO_GROUP: dict[int, str] = {v: g for g, values in _LABEL_GROUPS.items() for v in values}


def tissue_group(label: int) -> str | None:
    """The tissue group of FreeSurfer ``label``; None for air (0).

    Returns the group for listed labels; ``"grey_matter"`` for other brain labels (< 500) and
    ``"soft_tissue"`` for other head labels (>= 500).
    """
    if label == 0:
        return None
    if label in LABEL_TO_GROUP:
        return LABEL_TO_GROUP[label]
    return "soft_tissue" if label >= NON_BRAIN_LABEL_MIN else "grey_matter"


@dataclass(frozen=True)
class ScannerProfile:
    """One simulated scanner (one site).

    Attributes:
        name: base sequence and field strength, e.g. ``"MPRAGE-3T"``.
        weighting: BIDS suffix of the images, one of :data:`WEIGHTINGS`.
        tissue_means: per-tissue mean intensity, relative (see module docstring).
        label_jitter: relative std of each label's mean, drawn per subject around its group mean.
        texture_std: relative std of the smooth within-tissue intensity texture.
        bias_field_std: std of the log of the smooth multiplicative bias field.
        noise_level: Rician noise sigma relative to the brightest brain tissue mean.
        acquisition_voxel_mm: acquired voxel size along the world R, A, S axes in mm; an axis coarser
            than the output spacing is blurred, sampled at that thickness and interpolated back.
        fov_margin_mm: field of view beyond the brain, ``((left, right), (posterior, anterior),
            (inferior, superior))`` in mm; clipped to the head, never below ``MIN_FOV_MARGIN_MM``.
        orientation: voxel axis codes of the written images (nibabel convention, e.g. ``"LIA"``).
        intensity_scale: scanner units of the brightest brain tissue.
    """

    name: str
    weighting: str
    tissue_means: TissueMeans
    label_jitter: float
    texture_std: float
    bias_field_std: float
    noise_level: float
    acquisition_voxel_mm: tuple[float, float, float]
    fov_margin_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    orientation: str
    intensity_scale: float

    def to_dict(self) -> dict:
        """JSON-serialisable form, written to each site's ``site.json``."""
        d = dataclasses.asdict(self)
        d["acquisition_voxel_mm"] = list(self.acquisition_voxel_mm)
        d["fov_margin_mm"] = [list(m) for m in self.fov_margin_mm]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ScannerProfile:
        fields = dict(d)
        fields["tissue_means"] = TissueMeans(**fields["tissue_means"])
        fields["acquisition_voxel_mm"] = tuple(float(v) for v in fields["acquisition_voxel_mm"])
        fields["fov_margin_mm"] = tuple((float(lo), float(hi)) for lo, hi in fields["fov_margin_mm"])
        return cls(**fields)


def _base(
    name: str,
    weighting: str,
    means: tuple[float, ...],
    acquisition_voxel_mm: tuple[float, float, float],
    fov_margin_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]],
    bias_field_std: float,
    noise_level: float,
    texture_std: float = 0.04,
    label_jitter: float = 0.03,
) -> ScannerProfile:
    return ScannerProfile(
        name=name,
        weighting=weighting,
        tissue_means=TissueMeans(*means),
        label_jitter=label_jitter,
        texture_std=texture_std,
        bias_field_std=bias_field_std,
        noise_level=noise_level,
        acquisition_voxel_mm=acquisition_voxel_mm,
        fov_margin_mm=fov_margin_mm,
        orientation="RAS",
        intensity_scale=1000.0,
    )


# Base sequences per weighting. Means in TissueMeans field order: csf, grey_matter, deep_grey,
# cerebellar_cortex, white_matter, skull, marrow, soft_tissue, skin.
#
# The T1w variants keep WM > GM > CSF but differ where it survives per-subject z-scoring of the brain:
# the position of GM between CSF and WM, k = (GM - CSF) / (WM - GM), and the grey/white
# contrast-to-noise. An affine rescaling is undone by z-scoring; a different k is not, so a GM/WM
# boundary learnt on one scanner lies inside another scanner's GM or WM.
# - MPRAGE-3T: strong GM/WM contrast (GM 0.55 of WM), k ~ 0.5; isotropic 1 mm.
# - T1-SE-1.5T: weak GM/WM contrast (GM 0.88), CSF far below both, k ~ 4; 4 mm axial slices give a
#   high SNR per voxel and heavy partial volume across slices; body-coil reception, nearly flat bias.
#   Tissue heterogeneity (texture, per-subject label means) scales with the weak T1 sensitivity.
# - SPGR-1.5T: intermediate GM/WM contrast with very dark CSF (strong T1 saturation), k ~ 2.
# - FLASH-3T: strong GM/WM contrast, CSF closer to GM (proton-density share at a moderate flip angle),
#   k ~ 0.4; iron-rich deep grey darker than cortex (T2* decay at the longer echo); 2.5 mm coronal.
# Bias-field std is what remains after the vendor's intensity correction: larger at 3T (B1 inhomogeneity,
# phased-array reception) than at 1.5T.
BASE_PROFILES: dict[str, tuple[ScannerProfile, ...]] = {
    "T1w": (
        _base(
            "MPRAGE-3T",
            "T1w",
            (0.30, 0.55, 0.70, 0.58, 1.0, 0.08, 0.85, 0.55, 0.75),
            (1.0, 1.0, 1.0),
            ((25.0, 25.0), (30.0, 45.0), (70.0, 25.0)),
            bias_field_std=0.05,
            noise_level=0.03,
            texture_std=0.03,
            label_jitter=0.02,
        ),
        _base(
            "T1-SE-1.5T",
            "T1w",
            (0.35, 0.88, 0.93, 0.88, 1.0, 0.05, 0.95, 0.70, 0.85),
            (0.9, 0.9, 4.0),
            ((8.0, 8.0), (8.0, 14.0), (12.0, 8.0)),
            bias_field_std=0.03,
            noise_level=0.015,
            texture_std=0.01,
            label_jitter=0.01,
        ),
        _base(
            "SPGR-1.5T",
            "T1w",
            (0.10, 0.72, 0.80, 0.74, 1.0, 0.06, 0.90, 0.65, 0.80),
            (1.2, 1.0, 1.0),
            ((15.0, 15.0), (20.0, 30.0), (40.0, 15.0)),
            bias_field_std=0.04,
            noise_level=0.025,
            texture_std=0.02,
            label_jitter=0.02,
        ),
        _base(
            "FLASH-3T",
            "T1w",
            (0.42, 0.58, 0.52, 0.60, 1.0, 0.07, 0.80, 0.50, 0.70),
            (1.0, 2.5, 1.0),
            ((12.0, 12.0), (10.0, 20.0), (25.0, 10.0)),
            bias_field_std=0.06,
            noise_level=0.025,
            texture_std=0.03,
            label_jitter=0.02,
        ),
    ),
    "T2w": (
        _base(
            "T2-TSE-3T",
            "T2w",
            (1.0, 0.50, 0.42, 0.50, 0.36, 0.04, 0.35, 0.33, 0.45),
            (0.9, 0.9, 3.0),
            ((12.0, 12.0), (15.0, 25.0), (30.0, 12.0)),
            bias_field_std=0.1,
            noise_level=0.03,
        ),
        _base(
            "T2-SPACE-3T",
            "T2w",
            (1.0, 0.58, 0.48, 0.58, 0.44, 0.05, 0.40, 0.38, 0.50),
            (1.0, 1.0, 1.0),
            ((20.0, 20.0), (25.0, 40.0), (50.0, 20.0)),
            bias_field_std=0.08,
            noise_level=0.025,
        ),
    ),
    "PDw": (
        _base(
            "PD-TSE-1.5T",
            "PDw",
            (1.0, 0.92, 0.88, 0.92, 0.80, 0.05, 0.85, 0.75, 0.82),
            (1.0, 1.0, 3.0),
            ((12.0, 12.0), (15.0, 25.0), (30.0, 12.0)),
            bias_field_std=0.1,
            noise_level=0.035,
        ),
    ),
}


def parse_contrasts(contrasts: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"T1w,T2w"`` or ``["T1w", "T2w"]`` -> ``("T1w", "T2w")``; None -> ``("T1w",)``.

    Raises:
        NeurofedError: for an empty list or a name not in :data:`WEIGHTINGS`.
    """
    if contrasts is None:
        return ("T1w",)
    names = contrasts.split(",") if isinstance(contrasts, str) else list(contrasts)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in WEIGHTINGS]
    if not names or unknown:
        raise NeurofedError(
            f"--contrasts {','.join(names) or repr(contrasts)}: "
            f"{'unknown contrast ' + ', '.join(unknown) if unknown else 'no contrast given'}; "
            f"give a comma-separated list of {', '.join(WEIGHTINGS)} (e.g. T1w,T2w,PDw)"
        )
    return tuple(names)


def _perturbed(base: ScannerProfile, orientation: str, rng: np.random.Generator) -> ScannerProfile:
    """``base`` with its contrast, noise, bias and field of view jittered for one site."""
    factors = {g: float(np.exp(rng.normal(0.0, 0.05))) for g in TISSUE_GROUPS}
    # The reference tissue stays at 1 so that noise_level keeps its meaning.
    reference = "white_matter" if base.weighting == "T1w" else "csf"
    factors[reference] = 1.0
    margins = tuple(
        (
            max(MIN_FOV_MARGIN_MM, lo * rng.uniform(0.8, 1.2)),
            max(MIN_FOV_MARGIN_MM, hi * rng.uniform(0.8, 1.2)),
        )
        for lo, hi in base.fov_margin_mm
    )
    return dataclasses.replace(
        base,
        tissue_means=base.tissue_means.scaled(factors),
        bias_field_std=base.bias_field_std * rng.uniform(0.8, 1.25),
        noise_level=base.noise_level * rng.uniform(0.8, 1.25),
        fov_margin_mm=margins,
        orientation=orientation,
        intensity_scale=float(np.round(10 ** rng.uniform(2.0, 3.5), 1)),
    )


def site_profiles(
    n_sites: int, seed: int, contrasts: str | Sequence[str] | None = None
) -> list[ScannerProfile]:
    """One scanner profile per site, deterministic by ``seed``.

    Site ``i`` (0-based) gets weighting ``contrasts[i % len(contrasts)]`` (default all ``T1w``), the
    next base sequence of that weighting in turn (for T1w: MPRAGE-3T, T1-SE-1.5T with 4 mm axial
    slices, SPGR-1.5T, FLASH-3T with 2.5 mm coronal slices), orientation ``ORIENTATIONS[i % 6]``, and
    its own jitter of contrast, noise, bias field and field of view. Site ``i``'s profile does not
    depend on ``n_sites``.

    Raises:
        NeurofedError: for ``n_sites < 1`` or unknown contrasts.
    """
    if n_sites < 1:
        raise NeurofedError(f"--sites {n_sites}: need at least 1 site")
    weightings = parse_contrasts(contrasts)
    profiles = []
    seen: dict[str, int] = {}
    for i in range(n_sites):
        weighting = weightings[i % len(weightings)]
        variants = BASE_PROFILES[weighting]
        base = variants[seen.get(weighting, 0) % len(variants)]
        seen[weighting] = seen.get(weighting, 0) + 1
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PROFILE_STREAM, i)))
        profiles.append(_perturbed(base, ORIENTATIONS[i % len(ORIENTATIONS)], rng))
    return profiles
