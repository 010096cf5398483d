"""A domain-randomized generator of training subjects from label maps (in the spirit of SynthSeg).

Where study/synthesis.py simulates a few realistic scanners (one per site), this generator draws a new,
random "scanner" for every subject, so that a network trained on its output learns anatomy, not any one
contrast: every tissue group gets a random mean intensity (T1-, T2-, PD-, FLAIR-like templates jittered, or
arbitrary), every label its own jitter around it, and the subject a random bias field, gamma, noise, output
resolution, slice thickness (blurred to match), field of view, affine + elastic deformation, and, at random,
the removal of all non-brain tissue (so skull-stripped scans are in-distribution) and a crop that cuts the
brain. The result goes through the sites' own preprocessing (client/preprocessing), so the network sees
exactly what a site's pipeline would give it for such a scan.

`GeneratorSettings` is the whole description of the distribution (recorded in a pretrained model file);
`randomized_subject` draws one subject from one anatomy with one generator. Every draw comes from that
generator, so the same seed gives the same subject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from models.label_protocols import LabelProtocol
from study.image_synthesis import synthesize_subject
from study.scanner_profiles import BASE_PROFILES, ORIENTATIONS, TISSUE_GROUPS, ScannerProfile, TissueMeans
from study.subject_geometry import DeformationRange

FLAIR_MEANS = TissueMeans(
    csf=0.12,
    grey_matter=0.80,
    deep_grey=0.72,
    cerebellar_cortex=0.78,
    white_matter=0.60,
    skull=0.05,
    marrow=0.55,
    soft_tissue=0.45,
    skin=0.55,
)
"""A T2-FLAIR-like template: fluid suppressed, grey matter brighter than white matter."""

CONTRAST_FAMILIES: tuple[str, ...] = ("T1w", "T2w", "PDw", "FLAIR", "arbitrary")
"""Where a subject's tissue means come from: one of the base sequences of a weighting (study/scanner_profiles.py),
the FLAIR template, or ``arbitrary`` (every tissue group uniform in [0.02, 1])."""

RANDOMIZED_DEFORMATION = DeformationRange(
    rotation_std_deg=7.0,
    rotation_max_deg=15.0,
    scaling=0.10,
    axis_scaling_std=0.04,
    axis_scaling_max=0.08,
    shear_std=0.03,
    shear_max=0.06,
    shift_std_mm=5.0,
    shift_max_mm=10.0,
    elastic_rms_mm=(1.0, 4.0),
)


@dataclass(frozen=True)
class GeneratorSettings:
    """The distribution of the domain-randomized generator (every range is sampled uniformly).

    Attributes:
        contrast_families: one of `CONTRAST_FAMILIES` per entry, drawn with ``contrast_weights``.
        contrast_weights: relative probabilities of ``contrast_families``.
        tissue_mean_log_std: log-normal jitter of each tissue group's template mean.
        label_jitter_max: each label's mean varies around its group's by a log-std up to this.
        texture_std_max: smooth within-tissue texture, relative std up to this.
        bias_field_std_max: std of the log bias field up to this.
        noise_level_max: Rician noise sigma relative to the brightest tissue, up to this.
        gamma_log_std: the image (scaled to [0, 1]) is raised to ``exp(N(0, gamma_log_std))``.
        output_spacings_mm: isotropic voxel sizes the scan is written at, drawn with ``output_spacing_weights``.
        output_spacing_weights: relative probabilities of ``output_spacings_mm``.
        thick_slice_probability: chance that one random axis is acquired with thick slices.
        slice_thickness_mm: range of that thickness (blurred and sampled to match, then interpolated back).
        fov_margin_mm: range of the field of view's margin beyond the brain, per side.
        skull_strip_probability: chance that everything outside the brain (labels 1-499) is set to 0.
        crop_probability: chance that a slab of the scan, brain included, is cut off at one side.
        crop_fraction_max: the largest share of the scan's extent along that axis a crop removes.
        brain_mask_probability: chance the subject comes with its brain mask (normalisation inside it, as at
            a site that has masks), else preprocessing normalises inside the head mask.
        deformation: spread of the random affine and elastic deformation of the anatomy.
    """

    contrast_families: tuple[str, ...] = CONTRAST_FAMILIES
    contrast_weights: tuple[float, ...] = (0.35, 0.15, 0.1, 0.1, 0.3)
    tissue_mean_log_std: float = 0.2
    label_jitter_max: float = 0.12
    texture_std_max: float = 0.06
    bias_field_std_max: float = 0.35
    noise_level_max: float = 0.08
    gamma_log_std: float = 0.25
    output_spacings_mm: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0)
    output_spacing_weights: tuple[float, ...] = (0.2, 0.5, 0.15, 0.15)
    thick_slice_probability: float = 0.4
    slice_thickness_mm: tuple[float, float] = (3.0, 7.0)
    fov_margin_mm: tuple[float, float] = (4.0, 80.0)
    skull_strip_probability: float = 0.25
    crop_probability: float = 0.15
    crop_fraction_max: float = 0.3
    brain_mask_probability: float = 0.5
    deformation: DeformationRange = field(default_factory=lambda: RANDOMIZED_DEFORMATION)

    def __post_init__(self) -> None:
        unknown = [f for f in self.contrast_families if f not in CONTRAST_FAMILIES]
        if unknown or len(self.contrast_families) != len(self.contrast_weights):
            raise ValueError(
                f"contrast families {self.contrast_families} must be from {CONTRAST_FAMILIES}, one weight each"
            )
        if len(self.output_spacings_mm) != len(self.output_spacing_weights):
            raise ValueError("output_spacings_mm and output_spacing_weights need one entry each")
        if isinstance(self.deformation, Mapping):
            spread = dict(self.deformation)
            spread["elastic_rms_mm"] = tuple(spread["elastic_rms_mm"])
            object.__setattr__(self, "deformation", DeformationRange(**spread))

    def to_dict(self) -> dict:
        """Plain types, as recorded in a pretrained model file."""
        d = dataclasses.asdict(self)
        d["deformation"] = self.deformation.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _choice(rng: np.random.Generator, values: tuple, weights: tuple[float, ...]):
    p = np.asarray(weights, dtype=float)
    return values[int(rng.choice(len(values), p=p / p.sum()))]


def _tissue_means(family: str, settings: GeneratorSettings, rng: np.random.Generator) -> TissueMeans:
    if family == "arbitrary":
        return TissueMeans(**{g: float(rng.uniform(0.02, 1.0)) for g in TISSUE_GROUPS})
    if family == "FLAIR":
        template = FLAIR_MEANS
    else:
        variants = BASE_PROFILES[family]
        template = variants[int(rng.integers(len(variants)))].tissue_means
    jitter = {g: float(np.exp(rng.normal(0.0, settings.tissue_mean_log_std))) for g in TISSUE_GROUPS}
    return template.scaled(jitter)


def draw_profile(settings: GeneratorSettings, rng: np.random.Generator) -> tuple[ScannerProfile, float]:
    """A random scanner for one subject, and the isotropic spacing (mm) its scan is written at."""
    family = _choice(rng, settings.contrast_families, settings.contrast_weights)
    spacing = float(_choice(rng, settings.output_spacings_mm, settings.output_spacing_weights))
    acquisition = list(rng.uniform(0.8, 1.3, 3) * spacing)
    if rng.random() < settings.thick_slice_probability:
        acquisition[int(rng.integers(3))] = float(rng.uniform(*settings.slice_thickness_mm))
    margins = rng.uniform(*settings.fov_margin_mm, (3, 2))
    profile = ScannerProfile(
        name=f"randomized-{family}",
        weighting="T1w",
        tissue_means=_tissue_means(family, settings, rng),
        label_jitter=float(rng.uniform(0.0, settings.label_jitter_max)),
        texture_std=float(rng.uniform(0.0, settings.texture_std_max)),
        bias_field_std=float(rng.uniform(0.0, settings.bias_field_std_max)),
        noise_level=float(rng.uniform(0.0, settings.noise_level_max)),
        acquisition_voxel_mm=tuple(float(a) for a in acquisition),  # type: ignore[arg-type]
        fov_margin_mm=tuple((float(lo), float(hi)) for lo, hi in margins),  # type: ignore[arg-type]
        orientation=ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))],
        intensity_scale=float(10 ** rng.uniform(0.0, 4.0)),
    )
    return profile, spacing


def _gamma(image: np.ndarray, log_std: float, rng: np.random.Generator) -> np.ndarray:
    top = float(image.max())
    if not top > 0:
        return image
    exponent = float(np.exp(rng.normal(0.0, log_std)))
    return (top * (image / top) ** exponent).astype(np.float32)


def _crop(images: list[nib.Nifti1Image], fraction: float, rng: np.random.Generator) -> list[nib.Nifti1Image]:
    """The same slab cut off every image (one axis, one side), affines kept consistent by nibabel."""
    axis = int(rng.integers(3))
    n = images[0].shape[axis]
    cut = max(1, int(round(fraction * n)))
    keep = slice(cut, n) if rng.random() < 0.5 else slice(0, n - cut)
    index = tuple(keep if d == axis else slice(None) for d in range(3))
    return [image.slicer[index] for image in images]


def randomized_subject(
    labels: np.ndarray,
    affine: np.ndarray,
    settings: GeneratorSettings,
    plan,
    protocol: LabelProtocol,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One domain-randomized subject of anatomy ``labels``, preprocessed as a site would.

    Args:
        labels: FreeSurfer label map (int16), any voxel orientation; ``affine`` its voxel -> world (mm).
        plan: the `client.preprocessing.PreprocessingPlan` the network is trained for.
        protocol: the label protocol of the network's classes.
        rng: the subject's generator (every draw comes from it).

    Returns:
        ``(image (1, X, Y, Z) float32 normalised, label (X, Y, Z) uint8 protocol classes)`` on the plan's grid.
    """
    from client.preprocessing import preprocess_images

    profile, spacing = draw_profile(settings, rng)
    image, dseg, mask = synthesize_subject(
        labels, affine, profile, rng, spacing_mm=spacing, deformation_spread=settings.deformation
    )
    data = _gamma(np.asarray(image.dataobj, dtype=np.float32), settings.gamma_log_std, rng)
    if rng.random() < settings.skull_strip_probability:
        # A real skull-stripping tool errs by a voxel or two either way: erode or dilate the brain mask.
        brain = np.asarray(mask.dataobj) > 0
        grow = int(rng.integers(-1, 3))
        if grow > 0:
            brain = ndi.binary_dilation(brain, iterations=grow)
        elif grow < 0:
            brain = ndi.binary_erosion(brain, iterations=-grow)
        data = np.where(brain, data, 0.0).astype(np.float32)
    image = nib.Nifti1Image(data, image.affine)
    scans = [image, dseg, mask]
    if rng.random() < settings.crop_probability:
        scans = _crop(scans, float(rng.uniform(0.05, settings.crop_fraction_max)), rng)
    with_mask = rng.random() < settings.brain_mask_probability
    subject = preprocess_images(
        "randomized", [scans[0]], plan, protocol, label=scans[1], mask=scans[2] if with_mask else None
    )
    return subject.image, subject.label
