"""Label-map post-processing: islands far from the brain go, holes in it are filled, the run chooses the mode."""

from __future__ import annotations

import numpy as np
import pytest

from contract.run_config import RunConfig
from models.errors import NeurofedError
from models.label_protocols import TISSUE
from models.metrics import segmentation_metrics
from models.postprocessing import (
    LARGEST_BRAIN,
    LARGEST_PER_CLASS,
    NO_POSTPROCESSING,
    POSTPROCESSING_MODES,
    postprocess_labels,
    predicted_labels,
)

CSF, GREY, WHITE = 1, 2, 3
SPACING_MM = (2.0, 2.0, 2.0)


def _brain() -> np.ndarray:
    """Nested blocks on a 48 x 56 x 48 grid: grey matter around white matter around a CSF 'ventricle'."""
    labels = np.zeros((48, 56, 48), dtype=np.uint8)
    labels[8:40, 8:44, 8:40] = GREY
    labels[12:36, 12:40, 12:36] = WHITE
    labels[20:28, 22:30, 20:28] = CSF
    return labels


def test_an_island_far_from_the_brain_is_removed_and_hd95_falls() -> None:
    truth = _brain()
    predicted = truth.copy()
    predicted[38:47, 0:5, 10:40] = GREY  # a slab of "grey matter" in the neck, below the brain
    before = segmentation_metrics(predicted, truth, TISSUE.class_names, SPACING_MM)["grey_matter"]
    assert before["hd95_mm"] > 10.0

    for mode in (LARGEST_BRAIN, LARGEST_PER_CLASS):
        cleaned = postprocess_labels(predicted, TISSUE.num_classes, mode)
        after = segmentation_metrics(cleaned, truth, TISSUE.class_names, SPACING_MM)["grey_matter"]
        assert not cleaned[38:47, 0:5, 10:40].any(), mode
        assert after["hd95_mm"] < before["hd95_mm"] and after["dice"] > before["dice"], mode
        np.testing.assert_array_equal(cleaned, truth)


def test_a_hole_inside_the_brain_takes_the_class_around_it() -> None:
    predicted = _brain()
    predicted[14:17, 14:17, 14:17] = 0  # background inside white matter
    cleaned = postprocess_labels(predicted, TISSUE.num_classes, LARGEST_BRAIN)
    assert (cleaned[14:17, 14:17, 14:17] == WHITE).all()
    np.testing.assert_array_equal(cleaned, _brain())


def test_largest_per_class_gives_a_stray_piece_of_a_class_to_its_neighbours() -> None:
    predicted = _brain()
    predicted[14:16, 34:36, 14:16] = CSF  # a second, small CSF piece inside white matter
    assert np.array_equal(postprocess_labels(predicted, TISSUE.num_classes, LARGEST_BRAIN), predicted)
    cleaned = postprocess_labels(predicted, TISSUE.num_classes, LARGEST_PER_CLASS)
    np.testing.assert_array_equal(cleaned, _brain())


@pytest.mark.parametrize("mode", [LARGEST_BRAIN, LARGEST_PER_CLASS])
def test_a_wide_background_around_the_brain_changes_nothing(mode: str) -> None:
    # The work is done in the labelled voxels' box; a brain at the edge of its volume and the same brain
    # in a volume five times wider must come out the same, islands, holes and edge included.
    from scipy import ndimage

    rng = np.random.default_rng(4)
    field = ndimage.gaussian_filter(rng.standard_normal((22, 26, 18)), 1.2)
    labels = np.digitize(field, np.quantile(field, [0.75, 0.85, 0.93])).astype(np.uint8)  # islands
    labels[6:16, 6:16, 4:14] = 3
    labels[9:13, 9:13, 7:11] = 0  # a hole
    labels[0] = labels[-1] = labels[:, 0] = labels[:, -1] = 0  # open on the third axis only
    alone = postprocess_labels(labels, 4, mode)
    wide = np.zeros((110, 130, 18), np.uint8)
    wide[40:62, 50:76] = labels
    within = postprocess_labels(wide, 4, mode)
    np.testing.assert_array_equal(within[40:62, 50:76], alone)
    assert not within.sum() - within[40:62, 50:76].sum()  # nothing labelled outside
    assert (alone != labels).sum() > 20  # islands removed and holes filled: the comparison means something


def test_none_is_the_argmax_and_unknown_modes_are_refused() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.random((TISSUE.num_classes, 8, 9, 10)).astype(np.float32)
    labels = predicted_labels(probabilities, NO_POSTPROCESSING)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=0))
    assert labels.dtype == np.uint8
    with pytest.raises(NeurofedError, match=r"'smooth' is unknown; choose one of none, largest-brain"):
        postprocess_labels(labels, TISSUE.num_classes, "smooth")


def test_the_run_setting_takes_the_modes_by_name() -> None:
    for mode in POSTPROCESSING_MODES:
        assert RunConfig.from_flower({"postprocessing": mode}).postprocessing == mode
    with pytest.raises(NeurofedError, match=r"run setting 'postprocessing': choose one of"):
        RunConfig(postprocessing="crf")


def test_a_runs_model_file_records_the_runs_post_processing(tmp_path) -> None:
    from models.model_file import load_model
    from models.networks import build_network
    from server.global_model import write_model_file

    run = RunConfig(network_preset="tiny", postprocessing=LARGEST_PER_CLASS)
    assert RunConfig().postprocessing == LARGEST_BRAIN  # on by default: BENCHMARKS.md "Post-processing"
    path = tmp_path / "final.pt"
    write_model_file(path, build_network(run.network_config()).state_dict(), run, plan={})
    assert load_model(path).postprocessing == LARGEST_PER_CLASS
