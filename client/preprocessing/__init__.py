"""Preprocessing onto a fixed training grid, and its exact inverse back onto the subject's native grid.

The decisions are data: a `PreprocessingPlan` (nnU-Net's "plan") says which contrasts feed the network, the
target voxel spacing, the field of view, intensity clipping and normalisation. Every preprocessed array sits
on a grid whose voxel -> world affine is recorded in a `NativeTransform`, so a prediction made on the grid
maps back onto the native voxels of the scan it came from.

Steps, for an image (or several co-registered contrasts, the first one being the reference grid):

1. Reorient to canonical RAS+ voxel order with nibabel (a pure transpose/flip: no interpolation).
2. Resample to ``target_spacing_mm`` along the canonical voxel axes (as MONAI's ``Spacing`` without
   ``diagonal``: oblique scans keep their obliquity, so no rotation is interpolated). The grid's voxel
   boundaries coincide with native voxel boundaries, so a plan spacing equal to the native spacing is a
   pure voxel copy, and 1 mm -> 2 mm averages each 2x2x2 block. Downsampling is anti-aliased with a
   Gaussian of sigma ``(factor - 1) / 2`` input voxels (scikit-image's ``resize`` convention).
3. Crop/pad (an integer voxel window, so no further interpolation) to ``grid_shape`` centred on the head's
   bounding box. The head is the largest connected component above FSL BET's threshold of the reference
   image, holes filled. When the head is taller than the field of view (scans that include the neck), the
   window keeps the vertex and cuts the neck (``crop_neck_first``).
4. Clip each contrast to ``clip_percentiles`` of its intensities inside the mask, then z-score inside it.
   The mask is the subject's brain mask when it has one, else the head mask of step 3.

Labels are first mapped from FreeSurfer values to protocol classes, then resampled as one-hot class maps
with linear interpolation followed by argmax, which keeps thin structures such as cortex that nearest
neighbour interpolation erodes. The inverse (`labels_to_native`, `probabilities_to_native`) does the same
in the other direction. Voxels outside the grid are background (class 0).

Modules, one job each: `plan` (the plan), `geometry` (reorientation, resampling, field of view),
`intensity` (head mask, normalisation), `labels` (label classes and their resampling), `inverse`
(`NativeTransform`, back to native voxels), `volume` (a scan onto the grid), `subject` (a subject for
training).
"""

from client.preprocessing.intensity import head_mask, head_threshold
from client.preprocessing.inverse import (
    NativeTransform,
    labels_to_native,
    native_image,
    probabilities_to_native,
)
from client.preprocessing.plan import NORMALIZATIONS, PreprocessingPlan
from client.preprocessing.subject import PreprocessedSubject, preprocess_images, preprocess_subject
from client.preprocessing.volume import preprocess_volume

__all__ = [
    "NORMALIZATIONS",
    "NativeTransform",
    "PreprocessedSubject",
    "PreprocessingPlan",
    "head_mask",
    "head_threshold",
    "labels_to_native",
    "native_image",
    "preprocess_images",
    "preprocess_subject",
    "preprocess_volume",
    "probabilities_to_native",
]
