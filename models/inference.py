"""Whole-volume prediction by Gaussian-weighted sliding-window inference (MONAI).

Works on the preprocessed grid: image ``(C, X, Y, Z)`` in, class probabilities ``(K, X, Y, Z)`` out.
Mapping probabilities back to the scanner's native grid is preprocessing's job
(``client.preprocessing.probabilities_to_native``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.patch_sampling import pad_image, padding_to

# Windows per forward pass. On CPU, torch 2.13, one window per pass takes 3.2-3.6x as long as 4 per pass,
# on 1 thread as on 2; more than 4 gains nothing (bench/bench_inference.py, BENCHMARKS.md).
WINDOWS_PER_PASS = 4


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = WINDOWS_PER_PASS,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities of every voxel of ``image``.

    Windows of ``roi_size`` overlap by ``overlap`` (fraction of the window) and are blended with a
    Gaussian weight, so window borders, where the network sees least context, count least. Per-window
    softmax probabilities are blended, so every voxel's probabilities sum to 1. Volumes smaller than a
    window are padded by MONAI and cropped back.

    Args:
        model: network mapping ``(B, C, *roi_size)`` to logits ``(B, K, *roi_size)``; switched to eval mode.
        image: ``(C, X, Y, Z)`` float32, preprocessed (z-scored) like the training data.
        roi_size: window ``(X, Y, Z)`` in voxels, multiples of the network's total stride (the training patch
            size is a good choice).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        sw_batch_size: windows per forward pass (more is faster and takes more memory).
        progress: show MONAI's progress bar over windows.

    Returns:
        ``(K, X, Y, Z)`` float32 probabilities, on the grid of ``image``.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {image.shape}")
    pads = padding_to(image.shape[1:], roi_size)
    padded = pad_image(np.asarray(image, dtype=np.float32), pads)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        # Writable and contiguous: the image may be a read-only map of the preprocessed cache.
        inputs = torch.from_numpy(np.require(padded, requirements="CW"))[None].to(device)
        probabilities = sliding_window_inference(
            inputs,
            roi_size=tuple(int(r) for r in roi_size),
            sw_batch_size=sw_batch_size,
            predictor=lambda window: torch.softmax(model(window), dim=1),
            overlap=overlap,
            mode="gaussian",
            device="cpu",
            progress=progress,
        )
    crop = tuple(
        slice(before, size + before) for (before, _), size in zip(pads, image.shape[1:], strict=True)
    )
    return np.ascontiguousarray(probabilities[0].cpu().numpy()[(slice(None), *crop)], dtype=np.float32)
