"""Segment scans with a trained model: label map in native space, volumes table, QC image.

The clinician-facing output of neurofed. Each input is validated like training data, preprocessed
with the model's own plan, segmented by sliding-window inference, and mapped back onto the input's
native voxel grid, so the label map overlays the scan it came from (same shape, same affine).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from client.preprocessing import (
    NativeTransform,
    PreprocessingPlan,
    native_image,
    preprocess_volume,
    probabilities_to_native,
)
from client.site_layout import nifti_stem
from client.subjects import SubjectFiles
from client.validation import validate_subject
from common.atomic_files import atomic_write
from common.progress import Progress
from models.errors import NeurofedError

DEFAULT_ROI = (96, 96, 96)


@dataclass(frozen=True)
class SegmentationOutputs:
    """The files written for one input scan."""

    source: Path
    label_map: Path
    volumes_csv: Path
    volumes_json: Path
    qc_png: Path


def output_paths(label_map: Path) -> tuple[Path, Path, Path]:
    """Volumes CSV, volumes JSON and QC PNG beside ``label_map`` (``X_dseg.nii.gz`` -> ``X_volumes.csv``...)."""
    stem = nifti_stem(label_map) or label_map.name
    base = stem[: -len("_dseg")] if stem.endswith("_dseg") else stem
    folder = label_map.parent
    return folder / f"{base}_volumes.csv", folder / f"{base}_volumes.json", folder / f"{base}_qc.png"


def structure_volumes_ml(
    labels: np.ndarray, affine: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Volume in mL of every foreground class of a native label map (voxel count x voxel volume)."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=len(class_names))
    return {name: float(counts[i] * voxel_ml) for i, name in enumerate(class_names) if i > 0}


def write_volumes(volumes: dict[str, float], source: Path, csv_path: Path, json_path: Path) -> None:
    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["structure", "volume_ml"])
            for name, ml in volumes.items():
                writer.writerow([name, f"{ml:.3f}"])

    def write_json(tmp: Path) -> None:
        tmp.write_text(json.dumps({"source": str(source), "unit": "mL", "volumes": volumes}, indent=2) + "\n")

    atomic_write(csv_path, write_csv)
    atomic_write(json_path, write_json)


def write_qc_png(image: nib.Nifti1Image, labels: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Axial, coronal and sagittal slices through the labelled region's centre with the label overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=np.float32).squeeze()
    lab = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels.astype(np.int16), image.affine)).dataobj)
    zooms = canonical.header.get_zooms()[:3]
    fg = np.argwhere(lab > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(data.shape) // 2
    lo, hi = np.percentile(data, [1, 99.5])
    cmap = plt.get_cmap("tab20", max(len(class_names), 2))
    views = [
        ("axial", data[:, :, centre[2]], lab[:, :, centre[2]], zooms[1] / zooms[0]),
        ("coronal", data[:, centre[1], :], lab[:, centre[1], :], zooms[2] / zooms[0]),
        ("sagittal", data[centre[0], :, :], lab[centre[0], :, :], zooms[2] / zooms[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (title, img, seg, aspect) in zip(axes, views, strict=True):
        # RAS arrays: transpose so that anterior/superior point up, as radiologists read them.
        ax.imshow(img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        overlay = np.ma.masked_equal(seg.T, 0)
        ax.imshow(
            overlay, cmap=cmap, origin="lower", alpha=0.45, vmin=0, vmax=len(class_names) - 1, aspect=aspect
        )
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(path.name.replace("_qc.png", ""), fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def _check_input(path: Path, contrast: str, loaded) -> None:
    subject = SubjectFiles(subject_id=nifti_stem(path) or path.name, images={contrast: path})
    check = validate_subject(subject, loaded.protocol, contrast=contrast, require_label=False)
    if not check.usable:
        raise NeurofedError(f"cannot segment {path}: " + "; ".join(p.reason for p in check.problems))


def native_segmentation(
    probabilities: np.ndarray, transform: NativeTransform, num_classes: int, postprocessing: str
) -> np.ndarray:
    """The label map a site gets for a scan: grid probabilities mapped onto the scan's own voxels, then the
    argmax and ``postprocessing`` there (so partial volumes are resolved at the scan's resolution).

    Args:
        probabilities: ``(K, X, Y, Z)`` class probabilities on the plan's grid.
        transform: where that grid sits relative to the scan (`client.preprocessing.NativeTransform`).
        num_classes: K, the protocol's classes with 0 the background.
        postprocessing: one of `models.postprocessing.POSTPROCESSING_MODES`.

    Returns:
        uint8 ``transform.native_shape`` class indices, in the scan file's axis order.
    """
    from models.postprocessing import postprocess_labels

    return postprocess_labels(probabilities_to_native(probabilities, transform), num_classes, postprocessing)


def segment_file(
    loaded, source: Path, label_map: Path, *, roi_size: Sequence[int] | None = None
) -> SegmentationOutputs:
    """Segment one scan with a loaded model (``models.model_file.LoadedModel``) and write all outputs.

    The label map gets the post-processing the model file records (models/postprocessing.py), the one its
    evaluation used, on the scan's native grid.

    Args:
        loaded: the model, its protocol and its preprocessing plan.
        source: the input NIfTI (the contrast the model reads).
        label_map: where the native-space label map goes (``*_dseg.nii.gz``).
        roi_size: sliding-window size, voxels; default the model's training patch size.
    """
    from models.inference import predict_volume

    plan = PreprocessingPlan.from_dict(loaded.plan)
    if len(plan.input_contrasts) != 1:
        raise NeurofedError(
            f"model {loaded.path} reads {len(plan.input_contrasts)} contrasts {plan.input_contrasts}; "
            "segmenting multi-contrast inputs from the command line is not supported yet"
        )
    _check_input(source, plan.input_contrasts[0], loaded)
    image = nib.load(source)
    grid, transform = preprocess_volume([image], plan)
    roi = tuple(roi_size or loaded.patch_size() or DEFAULT_ROI)
    probabilities = predict_volume(loaded.model, grid, roi)
    labels = native_segmentation(probabilities, transform, loaded.protocol.num_classes, loaded.postprocessing)
    out = native_image(labels.astype(np.uint8), transform)
    out.header.set_data_dtype(np.uint8)
    atomic_write(label_map, lambda tmp: nib.save(out, tmp))
    volumes_csv, volumes_json, qc_png = output_paths(label_map)
    volumes = structure_volumes_ml(labels, transform.native_affine, loaded.protocol.class_names)
    write_volumes(volumes, source, volumes_csv, volumes_json)
    write_qc_png(image, labels, loaded.protocol.class_names, qc_png)
    return SegmentationOutputs(source, label_map, volumes_csv, volumes_json, qc_png)


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Expand folders into the NIfTI files they hold (sorted); files are taken as they are."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and nifti_stem(p) and not p.name.startswith(".")
            )
            if not found:
                raise NeurofedError(f"{item} holds no NIfTI file (*.nii or *.nii.gz)")
            files.extend(found)
        elif item.exists():
            files.append(item)
        else:
            raise NeurofedError(f"{item} does not exist")
    return files


def segment_inputs(
    model_path: Path, inputs: Sequence[Path], output: Path, *, progress: bool = True
) -> tuple[list[SegmentationOutputs], list[tuple[Path, str]]]:
    """Segment every input; ``output`` is a ``*_dseg.nii.gz`` file for one input file, else a folder.

    A bad input is reported and skipped, never stops the others. Returns (written, failed).
    """
    from models.model_file import load_model

    files = collect_inputs(inputs)
    single = len(files) == 1 and not any(i.is_dir() for i in inputs) and nifti_stem(output) is not None
    if not single and nifti_stem(output) is not None:
        raise NeurofedError(f"-o {output} names one file, but {len(files)} inputs were given: pass a folder")
    loaded = load_model(model_path)
    if progress:
        # Compare with the model's hash in the audit logs (deploy/README.md, "The model's way home").
        print(
            f"model {model_path}: weights sha256 {loaded.weights_sha256}, post-processing {loaded.postprocessing}",
            flush=True,
        )
    written: list[SegmentationOutputs] = []
    failed: list[tuple[Path, str]] = []
    targets = [output] if single else [output / f"{_base_name(f)}_dseg.nii.gz" for f in files]
    with Progress("segmenting", len(files), show=progress and len(files) > 1) as bar:
        for source, target in zip(files, targets, strict=True):
            bar.working_on(source.name)
            try:
                written.append(segment_file(loaded, source, target))
                bar.advance(source.name)
            except NeurofedError as exc:
                failed.append((source, str(exc)))
                bar.advance(f"{source.name} failed")
    return written, failed


def _base_name(path: Path) -> str:
    stem = nifti_stem(path) or path.stem
    for contrast in ("_T1w", "_T2w", "_FLAIR", "_PDw"):
        if stem.endswith(contrast):
            return stem[: -len(contrast)]
    return stem
