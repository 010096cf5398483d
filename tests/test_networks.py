"""Networks: every shipped configuration is DP-compatible, has the promised shapes, and round-trips as data."""

from __future__ import annotations

import json

import pytest
import torch

from models.errors import NeurofedError
from models.networks import ARCHITECTURES, PRESETS, NetworkConfig, build_network

SHIPPED = [
    NetworkConfig.preset(preset, 2, 4, architecture).with_changes(norm=norm)
    for preset in PRESETS
    for architecture in ARCHITECTURES
    for norm in ("instance", "group")
    # MONAI's residual UNet normalises its 4 output features too, which 8 groups cannot divide.
    if not (architecture == "unet" and norm == "group")
]


def _name(config: NetworkConfig) -> str:
    return f"{config.architecture}-{config.norm}-{config.channels}"


@pytest.fixture(scope="module")
def module_validator():
    opacus_validators = pytest.importorskip("opacus.validators")
    return opacus_validators.ModuleValidator


@pytest.mark.parametrize("config", SHIPPED, ids=_name)
def test_opacus_accepts_every_shipped_network(config: NetworkConfig, module_validator) -> None:
    assert module_validator.validate(build_network(config), strict=False) == []


def test_opacus_validation_does_reject_batch_norm(module_validator) -> None:
    # The check above is meaningful only if the validator objects to what DP-SGD cannot handle.
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    assert module_validator.validate(model, strict=False) != []


@pytest.mark.parametrize("config", SHIPPED, ids=_name)
def test_normalisation_never_keeps_batch_statistics(config: NetworkConfig) -> None:
    norms = [m for m in build_network(config).modules() if "Norm" in type(m).__name__]
    assert norms, "expected normalisation layers"
    for module in norms:
        assert not isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm):
            assert module.affine and not module.track_running_stats


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_has_one_channel_per_class_on_the_input_grid(architecture: str) -> None:
    config = NetworkConfig.tiny(in_channels=2, out_channels=5, architecture=architecture)
    s = config.total_stride
    x = torch.randn(3, 2, 2 * s, 3 * s, 4 * s)

    with torch.no_grad():
        y = build_network(config, seed=0).eval()(x)

    assert y.shape == (3, 5, 2 * s, 3 * s, 4 * s)
    assert y.dtype == torch.float32


def test_default_network_keeps_the_input_grid() -> None:
    config = NetworkConfig.default(in_channels=1, out_channels=4)
    s = config.total_stride
    with torch.no_grad():
        y = build_network(config).eval()(torch.randn(1, 1, s, 2 * s, s))
    assert y.shape == (1, 4, s, 2 * s, s)


def test_seed_fixes_the_initial_weights_and_leaves_global_rng_alone() -> None:
    config = NetworkConfig.tiny(1, 3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first = build_network(config, seed=7).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = build_network(config, seed=7).state_dict()
    other = build_network(config, seed=8).state_dict()

    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("config", SHIPPED, ids=_name)
def test_config_round_trips_through_json(config: NetworkConfig) -> None:
    assert NetworkConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "vnet"}, "architecture 'vnet' is not one of"),
        ({"norm": "batch"}, "norm 'batch' is not one of"),
        ({"norm": "group", "num_groups": 3}, "num_groups=3 must divide every entry of channels"),
        ({"strides": (2, 2)}, "needs len(channels) - 1 = 3 entries"),
        ({"architecture": "segresnet", "strides": (2, 1, 2)}, "strides (2, 1, 2) must all be 2"),
        ({"dropout": 1.5}, "dropout=1.5"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(changes: dict, message: str) -> None:
    with pytest.raises(NeurofedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NetworkConfig.default(1, 4).with_changes(**changes)


def test_unknown_keys_and_presets_are_named() -> None:
    with pytest.raises(NeurofedError, match=r"unknown keys \['width'\]"):
        NetworkConfig.from_dict({**NetworkConfig.default(1, 4).to_dict(), "width": 3})
    with pytest.raises(NeurofedError, match="unknown network preset 'huge'; choose one of default, tiny"):
        NetworkConfig.preset("huge", 1, 4)


def test_patch_size_must_be_a_multiple_of_the_total_stride() -> None:
    config = NetworkConfig.default(1, 4)
    config.check_patch_size((96, 96, 64))
    with pytest.raises(NeurofedError, match=r"patch size \(96, 90, 64\).*multiple of 8"):
        config.check_patch_size((96, 90, 64))
