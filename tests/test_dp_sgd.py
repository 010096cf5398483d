"""DP-SGD on a site's training loop: clipping and noise as specified, every per-sample mode, accounting."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from privacy.accounting import epsilon_for
from privacy.dp_sgd import (
    GRAD_SAMPLE_MODES,
    DPConfig,
    PrivacyUnitDataset,
    dp_step,
    make_private_training,
)
from privacy.errors import PrivacyError

DELTA = 1e-5


TORCH_THREADS = 1
"""Tiny tensors: thread start-up and contention on a shared 2-core machine cost more than they give
(tests/conftest.py sets it for this module)."""


@pytest.fixture(autouse=True)
def _quiet_library_warnings():
    # Opacus warns about full backward hooks on the first layer (its inputs need no gradient).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def tiny_net(seed: int = 1) -> nn.Module:
    """A 3D conv net with InstanceNorm (no running statistics): ``(B, 1, X, Y, Z)`` -> 3 class logits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.InstanceNorm3d(4, affine=True),
        nn.PReLU(),
        nn.Conv3d(4, 3, 1),
    )


def voxel_dataset(units: int = 6, size: int = 8, seed: int = 0) -> TensorDataset:
    """``units`` items of image ``(1, size, size, size)`` float32 and labels ``(size, size, size)`` int64."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(units, 1, size, size, size, generator=generator)
    labels = torch.randint(0, 3, (units, size, size, size), generator=generator)
    return TensorDataset(images, labels)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def per_sample_gradients(model: nn.Module, loss_fn, inputs, targets) -> list[list[torch.Tensor]]:
    """Reference: each sample's gradient by its own backward pass."""
    model = copy.deepcopy(model)
    gradients = []
    for i in range(len(inputs)):
        model.zero_grad()
        loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        gradients.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    return gradients


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_private_step_is_the_mean_of_clipped_per_sample_gradients(mode: str) -> None:
    model, loss_fn = tiny_net(), nn.CrossEntropyLoss()
    dataset = voxel_dataset()
    inputs, targets = dataset[:3]
    reference = per_sample_gradients(model, loss_fn, inputs, targets)
    norms = [float(torch.sqrt(sum((g**2).sum() for g in sample))) for sample in reference]
    clip = float(np.median(norms))
    assert min(norms) < clip * 0.999 and max(norms) > clip * 1.001  # some clipped, some not
    batch_size = 2
    # Opacus divides the sum of clipped gradients by the expected batch size, not the drawn one.
    expected_step = [
        sum(sample[k] * min(1.0, clip / norm) for sample, norm in zip(reference, norms, strict=True))
        / batch_size
        for k in range(len(reference[0]))
    ]
    before = weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = DPConfig(noise_multiplier=1e-12, max_grad_norm=clip, grad_sample_mode=mode)
    with make_private_training(model, optimizer, dataset, batch_size, config, loss_fn=loss_fn) as private:
        loss = dp_step(private.model, (inputs, targets), private.loss_fn, private.optimizer)
        assert private.steps_taken == 1
    with torch.no_grad():
        assert loss == pytest.approx(float(loss_fn(tiny_net()(inputs), targets)), rel=1e-5)
    scale = max(float(s.abs().max()) for s in expected_step)
    for old, new, step in zip(before, model.parameters(), expected_step, strict=True):
        torch.testing.assert_close(old - new.detach(), step, atol=1e-6 * scale, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["unet", "dynunet", "segresnet"])
def test_vmap_per_sample_gradients_equal_one_backward_per_sample(architecture: str) -> None:
    from models.networks import NetworkConfig, build_network
    from models.training import make_loss
    from privacy.vmap_grad_sample import VmapGradSampleModule

    network = build_network(NetworkConfig.tiny(1, 3, architecture), seed=0)
    loss_fn = make_loss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 1, 8, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (3, 1, 8, 8, 8), generator=generator)
    reference = per_sample_gradients(network, loss_fn, images, labels)

    parameters = list(network.parameters())
    wrapped = VmapGradSampleModule(network)
    loss_fn(wrapped(images), labels).backward()
    # The forward pass swaps per-sample weights in and must leave the network's own parameters in place.
    assert all(a is b for a, b in zip(parameters, network.parameters(), strict=True))
    # Biases followed by InstanceNorm have gradients of rounding size: compare on the scale of all gradients.
    scale = max(float(g.abs().max()) for sample in reference for g in sample)
    for k, param in enumerate(network.parameters()):
        expected = torch.stack([sample[k] for sample in reference])
        assert param.grad is None
        torch.testing.assert_close(param.grad_sample, expected, atol=1e-5 * scale, rtol=1e-4)
    with pytest.raises(ValueError, match="gradient accumulation is not supported"):
        loss_fn(wrapped(images), labels).backward()


def test_augmentation_multiplicity_gives_each_unit_the_mean_gradient_of_its_patches() -> None:
    """(B, K, C, ...) inputs: unit b's per-sample gradient is the mean of its K patches' gradients (one unit,
    clipped once), and only the trainable parameters get one."""
    from models.networks import NetworkConfig, build_network
    from models.trainable import freeze_except
    from models.training import make_loss
    from privacy.vmap_grad_sample import VmapGradSampleModule

    network = build_network(NetworkConfig.tiny(1, 3), seed=0)
    freeze_except(network, "norm+head")
    loss_fn = make_loss()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 1, 8, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (2, 3, 1, 8, 8, 8), generator=generator)
    trained = [p for p in network.parameters() if p.requires_grad]
    per_patch = per_sample_gradients(network, loss_fn, images.flatten(0, 1), labels.flatten(0, 1))
    index = {id(p): k for k, p in enumerate(network.parameters())}

    wrapped = VmapGradSampleModule(network)
    output = wrapped(images)
    assert output.shape[:2] == (2, 3)
    loss_fn(output.flatten(0, 1), labels.flatten(0, 1)).backward()
    scale = max(float(g.abs().max()) for sample in per_patch for g in sample)
    for param in trained:
        k = index[id(param)]
        expected = torch.stack([torch.stack([per_patch[b * 3 + j][k] for j in range(3)]).mean(0) for b in range(2)])
        torch.testing.assert_close(param.grad_sample, expected, atol=1e-5 * scale, rtol=1e-4)
    assert all(getattr(p, "grad_sample", None) is None for p in network.parameters() if not p.requires_grad)


@pytest.mark.parametrize("mode", ["functorch", "vmap"])
def test_dp_training_of_a_unet_with_training_step_changes_weights_and_counts_every_step(mode: str) -> None:
    from models.networks import NetworkConfig, build_network
    from models.training import PatchDataset, make_loss, training_step

    rng = np.random.default_rng(0)
    subjects = [
        (
            rng.normal(size=(1, 20, 20, 20)).astype(np.float32),
            rng.integers(0, 3, (20, 20, 20)).astype(np.uint8),
        )
        for _ in range(4)
    ]
    patches = PatchDataset(subjects, (8, 8, 8), length=4 * 8, seed=0)
    dataset = PrivacyUnitDataset(patches, units=len(subjects))
    network = build_network(NetworkConfig.tiny(1, 3), seed=0)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    before = weights(network)
    config = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode=mode)
    generator = torch.Generator().manual_seed(0)
    with make_private_training(
        network, optimizer, dataset, 2, config, loss_fn=make_loss(), generator=generator
    ) as private:
        losses = private.run_steps(3, step_fn=training_step)
        assert len(losses) == 3 and private.steps_taken == 3
        assert private.sample_rate == 0.5
        assert private.spent_epsilon() == pytest.approx(epsilon_for(3, 0.5, 1.1, DELTA))
    assert all(not torch.equal(old, new) for old, new in zip(before, network.parameters(), strict=True))
    assert all(not hasattr(p, "grad_sample") for p in network.parameters())


def test_resumed_run_continues_its_accountant_and_the_model_is_plain_between_rounds() -> None:
    model, loss_fn, dataset = tiny_net(), nn.CrossEntropyLoss(), voxel_dataset()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = DPConfig(noise_multiplier=1.0, grad_sample_mode="functorch")
    state = None
    for round_steps in (4, 6):
        with make_private_training(
            model, optimizer, dataset, 2, config, loss_fn=loss_fn, accountant_state=state
        ) as private:
            private.run_steps(round_steps)
            state = private.accountant_state()
        # Between rounds the model is the caller's plain module again: no Opacus hooks or attributes.
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
        assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert private.steps_taken == 10
    assert private.spent_epsilon() == pytest.approx(epsilon_for(10, 2 / 6, 1.0, DELTA))
    # The caller's optimizer kept its Adam state across the rounds.
    assert all(int(s["step"]) == 10 for s in optimizer.state.values())


def test_rounds_recorded_in_the_ledger_report_the_epsilon_the_training_spent(tmp_path) -> None:
    from privacy.privacy_ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.set_budget(epsilon=50.0, delta=DELTA)
    model, loss_fn, dataset = tiny_net(), nn.CrossEntropyLoss(), voxel_dataset(size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = DPConfig(noise_multiplier=1.0)
    for server_round in (1, 2, 3):
        # What a site does each round; a restarted site reads the run's accountant back from the ledger.
        with make_private_training(
            model,
            optimizer,
            dataset,
            2,
            config,
            loss_fn=loss_fn,
            accountant_state=ledger.accountant_state("run"),
        ) as private:
            round_plan = {
                "steps": 4,
                "sample_rate": private.sample_rate,
                "noise_multiplier": 1.0,
                "delta": DELTA,
            }
            with ledger.reserved_round("run", server_round, **round_plan):
                private.run_steps(4)
    assert private.steps_taken == 12
    assert ledger.run_epsilon("run") == pytest.approx(private.spent_epsilon())
    assert ledger.releases()[-1].epsilon_run == pytest.approx(private.spent_epsilon())


def test_noise_from_target_epsilon_spends_at_most_the_target_over_the_planned_steps() -> None:
    model, loss_fn, dataset = tiny_net(), nn.CrossEntropyLoss(), voxel_dataset(units=8, size=4)
    config = DPConfig(target_epsilon=3.0, grad_sample_mode="vmap")
    planned = 30
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with make_private_training(
        model, optimizer, dataset, 2, config, loss_fn=loss_fn, planned_steps=planned
    ) as private:
        private.run_steps(planned)
        assert 0.99 * 3.0 <= private.spent_epsilon() <= 3.0
    with pytest.raises(PrivacyError, match="planned number of steps"):
        make_private_training(model, optimizer, dataset, 2, config, loss_fn=loss_fn)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_poisson_batch_takes_a_counted_noise_step(mode: str) -> None:
    model, loss_fn, dataset = tiny_net(), nn.CrossEntropyLoss(), voxel_dataset()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = weights(model)
    config = DPConfig(noise_multiplier=1.0, grad_sample_mode=mode)
    with make_private_training(model, optimizer, dataset, 2, config, loss_fn=loss_fn) as private:
        inputs, targets = dataset[:0]
        assert math.isnan(dp_step(private.model, (inputs, targets), private.loss_fn, private.optimizer))
        assert private.steps_taken == 1
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))


def test_the_same_generator_seed_gives_the_same_weights() -> None:
    def train(seed: int) -> list[torch.Tensor]:
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = DPConfig(noise_multiplier=1.0, grad_sample_mode="vmap")
        generator = torch.Generator().manual_seed(seed)
        with make_private_training(
            model, optimizer, voxel_dataset(), 2, config, loss_fn=nn.CrossEntropyLoss(), generator=generator
        ) as private:
            private.run_steps(3)
        return weights(model)

    first, again, other = train(7), train(7), train(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_privacy_unit_dataset_gives_each_unit_a_fresh_item_of_its_own() -> None:
    items = list(range(12))  # item i belongs to unit i % 3
    dataset = PrivacyUnitDataset(items, units=3)
    assert len(dataset) == 3
    assert [dataset[1] for _ in range(5)] == [1, 4, 7, 10, 1]
    assert dataset[2] == 2
    with pytest.raises(PrivacyError, match="2 items cannot hold 3 privacy units"):
        PrivacyUnitDataset([0, 1], units=3)


def test_vmap_mode_refuses_parameters_shared_by_two_modules() -> None:
    from privacy.vmap_grad_sample import VmapGradSampleModule

    first = nn.Conv3d(1, 1, 1)
    second = nn.Conv3d(1, 1, 1)
    second.weight = first.weight
    with pytest.raises(NotImplementedError, match="use grad_sample_mode='functorch'"):
        VmapGradSampleModule(nn.Sequential(first, second))


def _batchnorm_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))


@pytest.mark.parametrize(
    ("network", "batch_size", "config", "refusal"),
    [
        (_batchnorm_net, 2, DPConfig(noise_multiplier=1.0), "BatchNorm"),
        (
            tiny_net,
            7,
            DPConfig(noise_multiplier=1.0),
            r"batch_size=7 must be between 1 and the number of privacy units \(6\)",
        ),
        (tiny_net, 2, DPConfig(enabled=False), "DP disabled"),
    ],
    ids=["batchnorm", "batch-above-privacy-units", "dp-disabled"],
)
def test_unsupported_networks_and_settings_are_refused_with_reasons(
    network, batch_size: int, config: DPConfig, refusal: str
) -> None:
    model = network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match=refusal):
        make_private_training(model, optimizer, voxel_dataset(), batch_size, config, loss_fn=nn.MSELoss())


def test_dp_config_round_trips_and_names_bad_values() -> None:
    config = DPConfig(noise_multiplier=1.2, max_grad_norm=0.5, grad_sample_mode="ghost")
    assert config.target_epsilon is None  # a fixed noise multiplier replaces the target
    assert DPConfig.from_dict(config.to_dict()) == config
    assert DPConfig().target_epsilon == 8.0 and DPConfig().enabled
    with pytest.raises(PrivacyError) as error:
        DPConfig(noise_multiplier=0.0, max_grad_norm=-1.0, delta=2.0, grad_sample_mode="fast")
    message = str(error.value)
    for expected in (
        "noise_multiplier=0.0 must be > 0",
        "max_grad_norm=-1.0",
        "delta=2.0",
        "'fast' is not one of",
    ):
        assert expected in message
    with pytest.raises(PrivacyError, match=r"unknown keys \['sigma'\]"):
        DPConfig.from_dict({"sigma": 1.0})
    with pytest.raises(PrivacyError, match="set noise_multiplier or target_epsilon"):
        DPConfig(target_epsilon=None)
