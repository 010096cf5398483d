"""Local/pooled training on synthesized sites, and `neurofed segment` in native space."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.label_protocols import TISSUE

SPACING_MM = 4.0  # coarse grid keeps CPU training in CI short; 2 mm is the product default
PATCH = 32


@pytest.fixture(scope="module")
def synth_sites(tmp_path_factory, anatomy_label_maps) -> Path:
    """Two synthesized sites x 5 subjects: real anatomy where the label maps are present, else the phantom."""
    from study.synthesis import synthesize_sites

    out = tmp_path_factory.mktemp("synth")
    synthesize_sites(
        out, n_sites=2, subjects_per_site=5, label_maps_dir=anatomy_label_maps, spacing_mm=2.0, seed=3
    )
    return out


@pytest.fixture(scope="module")
def trained(synth_sites, tmp_path_factory):
    """A tiny network trained on site-01 (local-only) with validation every 40 steps."""
    import torch

    from client.preprocessed_cache import PreprocessedCache
    from client.preprocessing import PreprocessingPlan
    from models.networks import NetworkConfig
    from models.training import TrainingConfig
    from study.local_training import LocalTrainingSetup, load_sites, train_centralised

    torch.set_num_threads(2)
    plan = PreprocessingPlan(target_spacing_mm=(SPACING_MM,) * 3)
    cache = PreprocessedCache(tmp_path_factory.mktemp("cache"))
    setup = LocalTrainingSetup(steps=120, validation_fraction=0.4, validate_every=40, seed=0)
    sites = load_sites(
        [synth_sites / "site-01"], plan, TISSUE, validation_fraction=0.4, seed=0, cache=cache, progress=False
    )
    network = NetworkConfig.tiny(1, TISSUE.num_classes)
    training = TrainingConfig.for_protocol(TISSUE, patch_size=(PATCH,) * 3, learning_rate=3e-3, seed=0)
    model, history = train_centralised(sites, TISSUE, plan, network, training, setup, progress=False)
    return {
        "sites": sites,
        "plan": plan,
        "network": network,
        "training": training,
        "model": model,
        "history": history,
    }


def test_training_lowers_loss_and_beats_untrained_model_on_held_out_subjects(trained) -> None:
    import torch

    from models.networks import build_network
    from models.training import evaluate_subjects
    from study.local_training import mean_foreground_dice

    history = trained["history"]
    losses = np.asarray(history.losses)
    assert len(losses) == 120
    assert losses[-20:].mean() < 0.7 * losses[:20].mean()

    validation = [(s.image, s.label) for s in trained["sites"][0].validation]
    assert validation, "the split must hold out subjects"
    untrained = build_network(trained["network"], seed=0)
    with torch.inference_mode():
        before = mean_foreground_dice(
            evaluate_subjects(
                untrained, validation, TISSUE.class_names, (PATCH,) * 3, spacing_mm=(SPACING_MM,) * 3
            )
        )
    after = history.validation[-1]["mean_dice"]
    assert [v["step"] for v in history.validation] == [40, 80, 120]
    assert after > before + 0.3, (before, after)
    assert after > 0.5


def _save_trained(trained: dict, path: Path, training: dict) -> None:
    """The ``trained`` fixture's network as a model file (tissue protocol, its preprocessing plan)."""
    from models.model_file import save_model

    save_model(
        path,
        trained["model"].state_dict(),
        network=trained["network"],
        protocol=TISSUE,
        plan=trained["plan"].to_dict(),
        training=training,
    )


def test_segment_writes_native_space_label_map_volumes_and_qc(trained, synth_sites, tmp_path) -> None:
    from study.cli import main
    from study.local_training import LocalTrainingSetup, training_provenance

    model_path = tmp_path / "model.pt"
    provenance = training_provenance(trained["sites"], LocalTrainingSetup(steps=120), trained["history"])
    provenance["training_config"] = trained["training"].to_dict()
    _save_trained(trained, model_path, provenance)
    site = synth_sites / "site-02"  # another scanner: segment still maps back onto its native grid
    scan = sorted(site.glob("sub-*/anat/*_T1w.nii.gz"))[0]
    truth_path = sorted((site / "derivatives").rglob(f"{scan.name.split('_')[0]}_dseg.nii.gz"))[0]
    out = tmp_path / "out" / "case_dseg.nii.gz"
    assert main(["segment", "--model", str(model_path), str(scan), "-o", str(out)]) == 0

    source, written = nib.load(scan), nib.load(out)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels)) <= set(range(TISSUE.num_classes))
    truth = TISSUE.map_freesurfer(np.asarray(nib.load(truth_path).dataobj))
    brain_dice = 2 * np.sum((labels > 0) & (truth > 0)) / (np.sum(labels > 0) + np.sum(truth > 0))
    assert brain_dice > 0.6, brain_dice  # misplaced in native space would give ~0

    volumes = json.loads((tmp_path / "out" / "case_volumes.json").read_text())
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    assert volumes["unit"] == "mL"
    assert volumes["volumes"]["white_matter"] == pytest.approx(np.sum(labels == 3) * voxel_ml)
    with (tmp_path / "out" / "case_volumes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["structure"] for r in rows] == list(TISSUE.class_names[1:])
    assert (tmp_path / "out" / "case_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segment_reports_bad_input_by_name_and_keeps_going(trained, tmp_path, capsys) -> None:
    from study.cli import main

    model_path = tmp_path / "model.pt"
    _save_trained(trained, model_path, {"training_config": trained["training"].to_dict()})
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "broken_T1w.nii.gz").write_bytes(b"not a nifti file")
    nan_image = np.ones((20, 20, 20), dtype=np.float32)
    nan_image[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan_image, np.eye(4)), inputs / "nan_T1w.nii.gz")
    code = main(["segment", "--model", str(model_path), str(inputs), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken_T1w.nii.gz" in err and "nan_T1w.nii.gz" in err
    assert "NaN" in err
    assert not list((tmp_path / "out").glob("*_dseg.nii.gz")) if (tmp_path / "out").exists() else True


def test_segment_refuses_model_file_that_is_not_a_model(tmp_path, capsys) -> None:
    from study.cli import main

    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x00" * 100)
    scan = tmp_path / "scan.nii.gz"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.eye(4)), scan
    )
    assert main(["segment", "--model", str(bogus), str(scan), "-o", str(tmp_path / "o_dseg.nii.gz")]) == 2
    assert str(bogus) in capsys.readouterr().err


def test_segment_applies_the_post_processing_the_model_file_records(
    synth_sites, tmp_path, monkeypatch, capsys
):
    """A network that also labels a block far from the brain: the model file that records ``largest-brain``
    segments without it, the one that records ``none`` keeps it."""
    import models.inference
    from client.preprocessing import PreprocessingPlan
    from models.model_file import save_model
    from models.networks import NetworkConfig, build_network
    from study.cli import main

    def predict_with_an_island(model, grid, roi):
        probabilities = np.zeros((TISSUE.num_classes, *grid.shape[1:]), dtype=np.float32)
        probabilities[0] = 1.0
        quarter = tuple(n // 4 for n in grid.shape[1:])
        probabilities[3][tuple(slice(q, 3 * q) for q in quarter)] = 2.0  # the brain
        probabilities[2][:5, :5, :5] = 2.0  # an island in a corner of the grid
        return probabilities

    monkeypatch.setattr(models.inference, "predict_volume", predict_with_an_island)
    network = NetworkConfig.tiny(1, TISSUE.num_classes)
    scan = sorted((synth_sites / "site-01").glob("sub-*/anat/*_T1w.nii.gz"))[0]
    found = {}
    for mode in ("none", "largest-brain"):
        model_path = save_model(
            tmp_path / f"{mode}.pt",
            build_network(network).state_dict(),
            network=network,
            protocol=TISSUE,
            plan=PreprocessingPlan(target_spacing_mm=(SPACING_MM,) * 3).to_dict(),
            training={},
            postprocessing=mode,
        )
        out = tmp_path / f"{mode}_dseg.nii.gz"
        assert main(["segment", "--model", str(model_path), str(scan), "-o", str(out)]) == 0
        assert f"post-processing {mode}" in capsys.readouterr().out
        found[mode] = set(np.unique(np.asarray(nib.load(out).dataobj)))
    assert found == {"none": {0, 2, 3}, "largest-brain": {0, 3}}


def test_train_command_records_the_post_processing_its_validation_used(synth_sites, tmp_path) -> None:
    """`neurofed train` validates with the post-processing it is given and records it in the model file, so
    `neurofed segment` applies to its label maps what its validation Dice was measured with."""
    from models.model_file import load_model
    from study.cli import main

    common = [str(synth_sites / "site-01"), "--steps", "2", "--preset", "tiny", "--patch-size", str(PATCH)]
    common += ["--spacing", str(SPACING_MM), "--initial-model", "none", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "-o", str(tmp_path / "default.pt")]) == 0
    assert load_model(tmp_path / "default.pt").postprocessing == "largest-brain"  # a federated run's default
    out = tmp_path / "per-class.pt"
    assert main(["train", *common, "--postprocessing", "largest-per-class", "-o", str(out)]) == 0
    loaded = load_model(out)
    assert loaded.postprocessing == "largest-per-class"
    assert loaded.training["setup"]["postprocessing"] == "largest-per-class"
