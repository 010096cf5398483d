"""Seeded data augmentation of MRI training patches, on CPU.

A patch is an image ``(C, X, Y, Z)`` float32 (z-scored intensities, one channel per contrast) and its
label ``(X, Y, Z)`` integer class indices. Spatial transforms move both; intensity transforms touch the
image only. The transforms are MONAI's (``Flip``, ``Affine``, ``AdjustContrast``, ``ScaleIntensity``,
``ShiftIntensity``, ``RandGaussianNoise``), applied with parameters drawn here: every random draw comes
from the ``numpy.random.Generator`` passed in (the noise from a seed drawn from it), so a seed fixes the
result.

Left/right mirroring swaps hemispheres: with a protocol that has left and right classes (``aseg``) a
mirrored left hippocampus is a right hippocampus, so labels are permuted on that axis
(``left_right_permutation``). Without a permutation, mirroring along the left/right axis is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from models.errors import NeurofedError


@dataclass(frozen=True)
class AugmentationConfig:
    """Probabilities and ranges of the random transforms; each is drawn independently per patch.

    Attributes:
        flip_axes: spatial axes (0, 1, 2 of ``(X, Y, Z)``) that may be mirrored, each with ``flip_probability``.
        flip_probability: chance of mirroring along each of ``flip_axes``.
        left_right_axis: the spatial axis that runs left-right in the arrays. Preprocessed arrays are in RAS+
            orientation, so it is 0.
        left_right_permutation: class index -> class index after a left/right mirror (see
            ``left_right_permutation``); ``None`` skips mirroring along ``left_right_axis``.
        affine_probability: chance of a random rotation and scaling.
        rotation_degrees: maximum rotation about each axis, degrees (uniform in ``[-r, r]``).
        scale_range: maximum relative zoom per axis (uniform factor in ``[1 - s, 1 + s]``).
        gamma_probability: chance of a gamma change per channel.
        gamma_range: gamma exponent range, applied to intensities rescaled to [0, 1] and scaled back.
        intensity_scale: maximum relative intensity scaling per channel (factor in ``[1 - s, 1 + s]``).
        intensity_shift: maximum intensity offset per channel, in z-score units.
        noise_probability: chance of adding Gaussian noise.
        noise_std: maximum noise standard deviation, z-score units (uniform in ``[0, noise_std]``).
    """

    flip_axes: tuple[int, ...] = (0,)
    flip_probability: float = 0.5
    left_right_axis: int = 0
    left_right_permutation: tuple[int, ...] | None = None
    affine_probability: float = 0.2
    rotation_degrees: float = 7.5
    scale_range: float = 0.1
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_probability: float = 0.15
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
        object.__setattr__(self, "gamma_range", tuple(float(g) for g in self.gamma_range))
        if self.left_right_permutation is not None:
            perm = tuple(int(k) for k in self.left_right_permutation)
            if sorted(perm) != list(range(len(perm))):
                raise NeurofedError(
                    f"left_right_permutation {perm} is not a permutation of 0..{len(perm) - 1}"
                )
            object.__setattr__(self, "left_right_permutation", perm)
        if any(a not in (0, 1, 2) for a in self.flip_axes) or self.left_right_axis not in (0, 1, 2):
            raise NeurofedError(
                f"augmentation axes must be 0, 1 or 2; got flip_axes={self.flip_axes}, "
                f"left_right_axis={self.left_right_axis}"
            )
        if not 0 < self.gamma_range[0] <= self.gamma_range[1]:
            raise NeurofedError(f"gamma_range {self.gamma_range} must be positive and increasing")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flip_axes"] = list(self.flip_axes)
        d["gamma_range"] = list(self.gamma_range)
        if self.left_right_permutation is not None:
            d["left_right_permutation"] = list(self.left_right_permutation)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AugmentationConfig:
        return cls(**dict(d))


def left_right_permutation(class_names: Sequence[str]) -> tuple[int, ...]:
    """The class permutation of a left/right mirror: ``left_x`` <-> ``right_x``, other classes fixed.

    Identity for protocols without lateral classes (``tissue``), so mirroring is always safe with it.
    Raises NeurofedError if a ``left_`` class has no ``right_`` twin (or vice versa).
    """
    index = {name: i for i, name in enumerate(class_names)}
    perm = list(range(len(class_names)))
    for name, i in index.items():
        for side, other in (("left_", "right_"), ("right_", "left_")):
            if name.startswith(side):
                twin = other + name[len(side) :]
                if twin not in index:
                    raise NeurofedError(
                        f"class {name!r} has no {twin!r} counterpart; cannot mirror left/right"
                    )
                perm[i] = index[twin]
    return tuple(perm)


def augment_patch(
    image: np.ndarray, label: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transform one patch; inputs are not modified.

    Args:
        image: ``(C, X, Y, Z)`` float32, z-scored.
        label: ``(X, Y, Z)`` integer class indices.
        config: transform probabilities and ranges.
        rng: source of every random draw.

    Returns:
        ``(image, label)`` of the same shapes and dtypes.
    """
    image, label = _random_flips(image, label, config, rng)
    if rng.random() < config.affine_probability:
        image, label = _random_affine(image, label, config, rng)
    image = _random_intensity(image, config, rng)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def _random_flips(
    image: np.ndarray, label: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import Flip

    for axis in config.flip_axes:
        # Draw for every axis, also skipped ones, so enabling an axis does not shift the other draws.
        flip = rng.random() < config.flip_probability
        if not flip:
            continue
        if axis == config.left_right_axis:
            if config.left_right_permutation is None:
                continue
            label = np.asarray(config.left_right_permutation, dtype=label.dtype)[label]
        mirror = Flip(spatial_axis=axis)
        image = _numpy(mirror(image))
        label = _numpy(mirror(label[None]))[0]
    return image, label


def _random_affine(
    image: np.ndarray, label: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from monai.transforms import Affine

    max_angle = math.radians(config.rotation_degrees)
    rotation = tuple(float(a) for a in rng.uniform(-max_angle, max_angle, size=3))
    scale = tuple(float(s) for s in rng.uniform(1 - config.scale_range, 1 + config.scale_range, size=3))
    # Reflection padding: the few voxels the rotation pulls in from outside the patch mirror its edge,
    # identically in image and label.
    common = dict(rotate_params=rotation, scale_params=scale, padding_mode="reflection", image_only=True)
    moved_image = Affine(mode="bilinear", **common)(torch.from_numpy(np.require(image, requirements="CW")))
    moved_label = Affine(mode="nearest", **common)(
        torch.from_numpy(np.ascontiguousarray(label[None], np.float32))
    )
    return (
        np.asarray(moved_image.detach().cpu().numpy(), dtype=np.float32),
        np.rint(moved_label.detach().cpu().numpy()[0]).astype(label.dtype),
    )


def _random_intensity(image: np.ndarray, config: AugmentationConfig, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import AdjustContrast, RandGaussianNoise, ScaleIntensity, ShiftIntensity

    channels = []
    for c in range(image.shape[0]):
        channel = np.array(image[c : c + 1], dtype=np.float32)
        if rng.random() < config.gamma_probability:
            # MONAI's gamma rescales to [0, 1], bends and restores the range (gamma needs values >= 0).
            channel = _numpy(AdjustContrast(gamma=rng.uniform(*config.gamma_range))(channel))
        factor = rng.uniform(1 - config.intensity_scale, 1 + config.intensity_scale)
        shift = rng.uniform(-config.intensity_shift, config.intensity_shift)
        channel = _numpy(ShiftIntensity(offset=shift)(ScaleIntensity(minv=None, maxv=None, factor=factor - 1)(channel)))
        channels.append(channel)
    image = np.concatenate(channels).astype(np.float32)
    if rng.random() < config.noise_probability:
        # The noise std is uniform in [0, noise_std] (sample_std), drawn from a seed of this rng.
        noise = RandGaussianNoise(prob=1.0, std=config.noise_std, sample_std=True, dtype=np.float32)
        noise.set_random_state(seed=int(rng.integers(0, 2**32 - 1)))
        image = _numpy(noise(image))
    return image


def _numpy(array) -> np.ndarray:
    """MONAI returns tensors (MetaTensor) for array transforms; patches stay numpy float32."""
    return np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
