"""Model files: a faithful round trip, atomic writes, and a clear refusal of every bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from models import model_file
from models.errors import NeurofedError
from models.label_protocols import ASEG, TISSUE
from models.model_file import FORMAT_VERSION, load_model, save_model
from models.networks import NetworkConfig, build_network

NETWORK = NetworkConfig.tiny(in_channels=1, out_channels=TISSUE.num_classes)
PLAN = {"spacing_mm": [1.0, 1.0, 1.0], "contrasts": ["T1w"], "orientation": "RAS", "crop": None}
TRAINING = {"run_id": "run-1", "rounds": 3, "sites": ["a", "b"], "epsilon": 4.5, "steps": 30, "seed": 0}


@pytest.fixture
def trained() -> torch.nn.Module:
    model = build_network(NETWORK, seed=0)
    with torch.no_grad():  # weights unlike a fresh network's, so a load that ignored them would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _save(path: Path, model: torch.nn.Module, **changes: object) -> Path:
    """``save_model`` of ``model``'s weights with this module's network, protocol, plan and training."""
    settings = {"network": NETWORK, "protocol": TISSUE, "plan": PLAN, "training": TRAINING} | changes
    return save_model(path, model.state_dict(), **settings)


@pytest.fixture
def saved(tmp_path: Path, trained: torch.nn.Module) -> Path:
    return _save(tmp_path / "model.pt", trained, software_version="9.9.9")


def _rewrite(path: Path, **changes: object) -> None:
    content = torch.load(path, weights_only=True)
    content.update(changes)
    torch.save(content, path)


def test_round_trip_gives_the_same_predictions_and_description(saved: Path, trained: torch.nn.Module) -> None:
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = trained.eval()(x)

    loaded = load_model(saved, expected_protocol="tissue")

    assert not loaded.model.training
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expected)
    assert loaded.network == NETWORK
    assert loaded.protocol == TISSUE
    assert loaded.plan == PLAN
    assert loaded.training == TRAINING
    assert loaded.software_version == "9.9.9"
    assert loaded.format_version == FORMAT_VERSION
    assert [p.name for p in saved.parent.iterdir()] == ["model.pt"]  # no temporary file left


def test_default_software_version_is_the_installed_one(tmp_path: Path, trained: torch.nn.Module) -> None:
    path = _save(tmp_path / "m.pt", trained)
    assert load_model(path).software_version == model_file.installed_version()


def test_weights_of_an_opacus_wrapped_model_load_into_the_plain_network(
    tmp_path: Path, trained: torch.nn.Module
) -> None:
    wrapped_names = {f"_module.{k}": v for k, v in trained.state_dict().items()}
    path = save_model(
        tmp_path / "dp.pt", wrapped_names, network=NETWORK, protocol=TISSUE, plan={}, training={}
    )

    loaded = load_model(path)

    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_protocol_mismatch_names_both_protocols(saved: Path) -> None:
    with pytest.raises(NeurofedError, match=rf"{saved}.*protocol 'tissue', not 'aseg'"):
        load_model(saved, expected_protocol="aseg")


def test_newer_format_version_asks_to_upgrade(saved: Path) -> None:
    _rewrite(saved, format_version=FORMAT_VERSION + 1)
    with pytest.raises(
        NeurofedError, match=rf"{saved} has format version {FORMAT_VERSION + 1}.*upgrade neurofed"
    ):
        load_model(saved)


def test_truncated_file_is_reported_as_unreadable(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(NeurofedError, match=rf"model file {saved} cannot be read: it is truncated, corrupt"):
        load_model(saved)


def test_text_file_is_reported_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a model\n")
    with pytest.raises(NeurofedError, match=rf"model file {path} cannot be read"):
        load_model(path)


def test_plain_torch_checkpoint_is_not_a_neurofed_model(tmp_path: Path, trained: torch.nn.Module) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(NeurofedError, match=rf"{path} is not a neurofed model file"):
        load_model(path)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_file_with_arbitrary_objects_is_refused_without_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "neurofed-model", "payload": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(NeurofedError, match=rf"model file {path} cannot be read"):
        load_model(path)
    assert "code ran" not in capsys.readouterr().out


def test_weights_that_do_not_fit_the_described_network_are_refused(saved: Path) -> None:
    _rewrite(saved, network=NETWORK.with_changes(channels=(8, 16, 64)).to_dict())
    with pytest.raises(NeurofedError, match=rf"{saved}: its weights do not fit the network"):
        load_model(saved)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(NeurofedError, match=rf"model file {tmp_path / 'absent.pt'} does not exist"):
        load_model(tmp_path / "absent.pt")


def test_network_and_protocol_must_agree_on_the_classes(tmp_path: Path, trained: torch.nn.Module) -> None:
    with pytest.raises(NeurofedError, match=r"predicts 4 classes but protocol 'aseg' has 33"):
        _save(tmp_path / "m.pt", trained, protocol=ASEG, plan={}, training={})
    assert list(tmp_path.iterdir()) == []


def test_non_plain_metadata_is_refused_before_writing(tmp_path: Path, trained: torch.nn.Module) -> None:
    with pytest.raises(NeurofedError, match=rf"plan\['root'\] is a {type(tmp_path).__name__}"):
        _save(tmp_path / "m.pt", trained, plan={"root": tmp_path}, training={})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(
    saved: Path, trained: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()

    def failing_save(obj: object, f) -> None:
        # torch.save takes a path (what save_model gives it) or a file object.
        if isinstance(f, str | Path):
            Path(f).write_bytes(b"partial")
        else:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(saved, trained)

    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["model.pt"]


def test_the_post_processing_mode_is_recorded_and_an_older_file_reads_as_none(
    tmp_path: Path, trained: torch.nn.Module
) -> None:
    assert load_model(_save(tmp_path / "pp.pt", trained, postprocessing="largest-brain")).postprocessing == (
        "largest-brain"
    )
    older = _save(tmp_path / "old.pt", trained)
    content = torch.load(older, weights_only=True)
    del content["postprocessing"]  # as written before the setting existed
    torch.save(content, older)
    assert load_model(older).postprocessing == "none"
    _rewrite(older, postprocessing="crf-v9")
    with pytest.raises(NeurofedError, match=rf"{older} asks for post-processing 'crf-v9'.*upgrade neurofed"):
        load_model(older)
    with pytest.raises(NeurofedError, match=r"post-processing 'smooth' is unknown"):
        _save(tmp_path / "bad.pt", trained, postprocessing="smooth")
    assert not (tmp_path / "bad.pt").exists()
