"""Patch sampling, augmentation, the training loop (plain, FedProx, DP-SGD), inference and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.augmentation import AugmentationConfig, augment_patch, left_right_permutation
from models.errors import NeurofedError
from models.inference import predict_volume
from models.label_protocols import ASEG, TISSUE
from models.networks import NetworkConfig, build_network
from models.training import (
    PatchDataset,
    TrainingConfig,
    add_proximal_gradient_,
    evaluate_subjects,
    make_loss,
    make_optimizer,
    train_steps,
    training_step,
)

CLASSES = ("background", "dark", "mid", "bright")
NO_AUGMENTATION_DRAWS = AugmentationConfig(
    flip_axes=(), affine_probability=0.0, gamma_probability=0.0, intensity_scale=0.0, intensity_shift=0.0,
    noise_probability=0.0,
)  # fmt: skip


TORCH_THREADS = 2
"""Torch threads of this module's tests (tests/conftest.py sets it)."""


def blob_subject(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A (1, size^3) z-scored image of spheres of 3 classes at distinct intensities plus noise, and its labels."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3, dtype=np.float32)
    label = np.zeros((size,) * 3, dtype=np.uint8)
    for cls in (3, 2, 1):
        for _ in range(3):
            centre, radius = rng.uniform(8, size - 8, 3), rng.uniform(4, 9)
            label[((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2] = cls
    image = label.astype(np.float32) + rng.normal(0, 0.35, label.shape).astype(np.float32)
    return ((image - image.mean()) / image.std())[None].astype(np.float32), label


@pytest.fixture(scope="module")
def subjects() -> list[tuple[np.ndarray, np.ndarray]]:
    return [blob_subject(seed) for seed in (1, 2, 3)]


def coordinate_subject(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image whose voxel values are their flat indices, so a patch reveals where it was cut."""
    image = np.arange(math.prod(shape), dtype=np.float32).reshape(1, *shape)
    return image, np.zeros(shape, dtype=np.uint8)


# --- patch sampling -------------------------------------------------------------------------------


def test_patches_are_crops_fully_inside_the_volume_with_the_promised_types() -> None:
    shape, patch = (20, 24, 18), (8, 16, 8)
    image, label = coordinate_subject(shape)
    dataset = PatchDataset([(image, label)], patch, length=50, seed=0, foreground_share=0.0)

    for i in range(len(dataset)):
        image_patch, label_patch = dataset[i]
        assert image_patch.shape == (1, *patch) and image_patch.dtype == torch.float32
        assert label_patch.shape == (1, *patch) and label_patch.dtype == torch.int64
        start = np.unravel_index(int(image_patch[0, 0, 0, 0]), shape)
        assert all(0 <= s <= n - p for s, n, p in zip(start, shape, patch, strict=True))
        region = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        assert np.array_equal(image_patch.numpy()[0], image[0][region])


def test_items_depend_only_on_seed_and_index() -> None:
    subjects = [blob_subject(1, size=24), blob_subject(2, size=24)]
    augmentation = AugmentationConfig(affine_probability=1.0, noise_probability=1.0)
    make = lambda seed: PatchDataset(subjects, (16,) * 3, length=6, seed=seed, augmentation=augmentation)  # noqa: E731
    forward = [make(0)[i] for i in range(6)]
    backward = [make(0)[i] for i in reversed(range(6))][::-1]
    other_seed = [make(1)[i] for i in range(6)]

    for (a_img, a_lbl), (b_img, b_lbl) in zip(forward, backward, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(forward, other_seed, strict=True))


def test_each_epoch_visits_every_subject_once_in_a_seeded_order() -> None:
    shape, n = (12, 12, 12), 5
    subjects = [(np.full((1, *shape), float(k), np.float32), np.zeros(shape, np.uint8)) for k in range(n)]

    def order(seed: int) -> list[int]:
        dataset = PatchDataset(subjects, (8, 8, 8), length=3 * n, seed=seed)
        return [int(dataset[i][0][0, 0, 0, 0]) for i in range(len(dataset))]

    first = order(0)
    for epoch in range(3):
        assert sorted(first[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert first == order(0)
    # Short rounds must not always start with the same subjects.
    assert len({tuple(order(seed)[:2]) for seed in range(6)}) > 1


def test_foreground_share_centres_patches_on_rare_classes() -> None:
    shape, patch = (40, 40, 40), (8, 8, 8)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:5, 30:33, 10:13] = 1  # a 27-voxel structure
    label[20:40, :, :] = 2  # half the volume
    subject = (np.zeros((1, *shape), np.float32), label)

    def share_seeing_class_1(foreground_share: float) -> float:
        dataset = PatchDataset([subject], patch, length=200, seed=0, foreground_share=foreground_share)
        return float(np.mean([bool((dataset[i][1] == 1).any()) for i in range(len(dataset))]))

    uniform, balanced = share_seeing_class_1(0.0), share_seeing_class_1(1.0)
    # Each present foreground class is chosen with probability 1/2 when balancing.
    assert balanced > 0.35
    assert uniform < 0.1


def test_volume_smaller_than_the_patch_is_padded_with_background() -> None:
    shape, patch = (10, 20, 12), (16, 16, 16)
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    label = np.ones(shape, dtype=np.uint8)
    dataset = PatchDataset([(image, label)], patch, length=4, seed=0)

    for i in range(4):
        image_patch, label_patch = dataset[i]
        assert image_patch.shape == (2, *patch)
        assert int((label_patch == 1).sum()) == 10 * 16 * 12  # all of the volume that fits in x, z
        padded = (label_patch[0] == 0).numpy()
        for c in range(2):
            assert np.all(image_patch[c].numpy()[padded] == image[c].min())


# --- augmentation ---------------------------------------------------------------------------------


def test_left_right_permutation_swaps_hemispheres_and_keeps_midline_classes() -> None:
    perm = left_right_permutation(ASEG.class_names)
    names = ASEG.class_names

    assert perm[names.index("left_hippocampus")] == names.index("right_hippocampus")
    assert perm[names.index("right_thalamus")] == names.index("left_thalamus")
    assert perm[names.index("brain_stem")] == names.index("brain_stem")
    assert sorted(perm) == list(range(len(names)))
    assert left_right_permutation(TISSUE.class_names) == tuple(range(TISSUE.num_classes))


def test_left_right_flip_mirrors_the_image_and_swaps_lateral_labels() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 6, 5, 4)).astype(np.float32)
    label = rng.integers(0, ASEG.num_classes, size=(6, 5, 4)).astype(np.uint8)
    perm = left_right_permutation(ASEG.class_names)
    config = AugmentationConfig.from_dict(
        {
            **NO_AUGMENTATION_DRAWS.to_dict(),
            "flip_axes": [0],
            "flip_probability": 1.0,
            "left_right_permutation": perm,
        }
    )

    flipped_image, flipped_label = augment_patch(image, label, config, np.random.default_rng(1))

    assert np.array_equal(flipped_image, image[:, ::-1])
    assert np.array_equal(flipped_label, np.asarray(perm)[label[::-1]])


def test_without_a_permutation_the_left_right_axis_is_never_mirrored() -> None:
    image = np.random.default_rng(0).normal(size=(1, 6, 5, 4)).astype(np.float32)
    label = np.random.default_rng(1).integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    config = AugmentationConfig.from_dict(
        {**NO_AUGMENTATION_DRAWS.to_dict(), "flip_axes": [0, 2], "flip_probability": 1.0}
    )

    flipped_image, flipped_label = augment_patch(image, label, config, np.random.default_rng(0))

    assert np.array_equal(flipped_image, image[:, :, :, ::-1])  # axis 2 only
    assert np.array_equal(flipped_label, label[:, :, ::-1])


def test_random_affine_moves_image_and_label_together() -> None:
    _, label = blob_subject(5, size=32)
    image = label[None].astype(np.float32)  # intensity == class, so a consistent move keeps them equal
    config = AugmentationConfig.from_dict(
        {**NO_AUGMENTATION_DRAWS.to_dict(), "affine_probability": 1.0, "rotation_degrees": 10.0}
    )

    moved_image, moved_label = augment_patch(image, label, config, np.random.default_rng(3))

    assert moved_label.shape == label.shape and moved_label.dtype == label.dtype
    assert not np.array_equal(moved_label, label)
    assert set(np.unique(moved_label)) <= set(np.unique(label))
    # Bilinear image vs nearest label differ only along class borders.
    assert np.mean(np.rint(moved_image[0]) == moved_label) > 0.9


def test_intensity_augmentation_changes_the_image_only_and_is_seeded() -> None:
    image, label = blob_subject(6, size=16)
    config = AugmentationConfig(
        flip_axes=(), affine_probability=0.0, gamma_probability=1.0, noise_probability=1.0
    )

    first = augment_patch(image, label, config, np.random.default_rng(7))
    again = augment_patch(image, label, config, np.random.default_rng(7))

    assert np.array_equal(first[1], label)
    assert not np.allclose(first[0], image)
    assert np.array_equal(first[0], again[0])
    assert first[0].dtype == np.float32


# --- training loop --------------------------------------------------------------------------------


def _mean_dice(per_subject: list[dict]) -> float:
    return float(np.mean([scores["dice"] for subject in per_subject for scores in subject.values()]))


def test_training_lowers_the_loss_and_raises_held_out_dice(subjects) -> None:
    held_out = [blob_subject(10)]
    model = build_network(NetworkConfig.tiny(in_channels=1, out_channels=4), seed=0)
    config = TrainingConfig.for_protocol(TISSUE, patch_size=(32, 32, 32), learning_rate=1e-2, seed=0)
    dice_untrained = _mean_dice(evaluate_subjects(model, held_out, CLASSES, config.patch_size))

    result = train_steps(model, subjects, config, steps=60)

    assert result.steps == 60 and len(result.losses) == 60
    assert result.n_samples_seen == 60 * config.batch_size
    assert np.mean(result.losses[-10:]) < 0.5 * np.mean(result.losses[:5])
    dice_trained = _mean_dice(evaluate_subjects(model, held_out, CLASSES, config.patch_size))
    assert dice_trained > 0.6
    assert dice_trained > dice_untrained + 0.4


def test_same_seed_gives_identical_weights_and_another_seed_does_not(subjects) -> None:
    network = NetworkConfig.tiny(1, 4).with_changes(dropout=0.2)  # dropout draws must be seeded too
    augmentation = AugmentationConfig(affine_probability=0.5, gamma_probability=0.5, noise_probability=0.5)

    def weights_after(seed: int) -> dict[str, torch.Tensor]:
        model = build_network(network, seed=0)
        config = TrainingConfig(patch_size=(16, 16, 16), augmentation=augmentation, seed=seed)
        train_steps(model, subjects, config, steps=3)
        return model.state_dict()

    first, second, other = weights_after(1), weights_after(1), weights_after(2)

    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_rng_gives_each_call_new_patches_reproducibly(subjects) -> None:
    config = TrainingConfig(patch_size=(16, 16, 16), augment=False)

    def losses(rng_seed: int) -> list[list[float]]:
        model = build_network(NetworkConfig.tiny(1, 4), seed=0)
        rng = np.random.default_rng(rng_seed)
        return [train_steps(model, subjects, config, steps=2, rng=rng).losses for _ in range(2)]

    first = losses(5)
    assert first == losses(5)
    assert first != losses(6)


def test_step_hook_sees_every_step(subjects) -> None:
    seen: list[tuple[int, float]] = []
    model = build_network(NetworkConfig.tiny(1, 4), seed=0)
    result = train_steps(
        model,
        subjects,
        TrainingConfig(patch_size=(16,) * 3),
        steps=3,
        step_hook=lambda i, loss: seen.append((i, loss)),
    )
    assert seen == list(enumerate(result.losses))


def test_proximal_term_keeps_weights_near_the_global_model(subjects) -> None:
    config = TrainingConfig(patch_size=(16, 16, 16), optimizer="sgd", learning_rate=0.05, augment=False)
    global_model = build_network(NetworkConfig.tiny(1, 4), seed=0)
    global_weights = {k: v.detach().clone() for k, v in global_model.named_parameters()}

    def drift(mu: float) -> float:
        model = build_network(NetworkConfig.tiny(1, 4), seed=0)
        train_steps(model, subjects, config, steps=5, proximal_to=global_weights, proximal_mu=mu)
        return sum(float((p.detach() - global_weights[k]).pow(2).sum()) for k, p in model.named_parameters())

    assert drift(5.0) < 0.8 * drift(0.0)


def test_proximal_gradient_is_mu_times_the_distance_to_the_global_weights() -> None:
    model = build_network(NetworkConfig.tiny(1, 2), seed=0)
    global_weights = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    wrapped = torch.nn.Module()
    wrapped._module = model  # how Opacus' GradSampleModule names the network's parameters

    add_proximal_gradient_(wrapped, global_weights, proximal_mu=0.5)

    for _, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.5 * p.detach())


def test_labels_beyond_the_network_classes_are_reported(subjects) -> None:
    model = build_network(NetworkConfig.tiny(1, 3), seed=0)  # subjects have 4 classes
    with pytest.raises(NeurofedError, match="labels contain class 3 but the network predicts 3 classes"):
        train_steps(model, subjects, TrainingConfig(patch_size=(16,) * 3, foreground_share=1.0), steps=2)


# Opacus' notices for experiments: insecure RNG, and backward hooks firing on outputs of the first layer.
@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_dp_sgd_drives_the_same_training_step(subjects) -> None:
    opacus = pytest.importorskip("opacus")
    model = build_network(NetworkConfig.tiny(1, 4), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainingConfig(patch_size=(16, 16, 16), optimizer="sgd", learning_rate=0.1)
    dataset = PatchDataset.from_config(subjects, config, length=len(subjects), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    engine = opacus.PrivacyEngine(accountant="rdp")
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, config),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="functorch",
        poisson_sampling=True,
    )
    loss_fn = make_loss()
    for batch in dp_loader:
        training_step(dp_model, batch, loss_fn, dp_optimizer, proximal_to=before, proximal_mu=0.1)
    epsilon_before_empty = engine.get_epsilon(delta=1e-5)
    empty = (torch.zeros(0, 1, 16, 16, 16), torch.zeros(0, 1, 16, 16, 16, dtype=torch.int64))

    loss = training_step(dp_model, empty, loss_fn, dp_optimizer)

    assert math.isnan(loss)
    assert engine.get_epsilon(delta=1e-5) > epsilon_before_empty  # an empty Poisson batch is still a DP step
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_config_round_trips_and_names_bad_values() -> None:
    config = TrainingConfig.for_protocol(ASEG, patch_size=(64, 64, 48), optimizer="sgd", seed=3)
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.augmentation.left_right_permutation == left_right_permutation(ASEG.class_names)
    with pytest.raises(NeurofedError, match=r"foreground_share=1.5 must be in \[0, 1\]"):
        TrainingConfig(foreground_share=1.5)
    with pytest.raises(NeurofedError, match=r"unknown keys \['epochs'\]"):
        TrainingConfig.from_dict({"epochs": 3})


# --- inference --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(40, 36, 20), (12, 16, 8)], ids=["larger-than-window", "smaller-than-window"]
)
def test_predict_volume_returns_probabilities_on_the_input_grid(shape: tuple[int, int, int]) -> None:
    model = build_network(NetworkConfig.tiny(2, 3), seed=0)
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)

    probabilities = predict_volume(model, image, (16, 16, 16), overlap=0.25)

    assert probabilities.shape == (3, *shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert not model.training


def test_predict_volume_of_a_window_sized_image_matches_the_network() -> None:
    model = build_network(NetworkConfig.tiny(1, 3), seed=0).eval()
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[0].numpy()

    np.testing.assert_allclose(predict_volume(model, image, (16, 16, 16)), expected, atol=1e-5)
