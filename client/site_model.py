"""The shared network at a site: built as the run specifies, and scored on the site's test split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from client.site_data import SiteData
from contract.reply_schema import EVALUATION_METRICS, MEAN_DICE_KEY, evaluation_metric_key
from contract.run_config import RunConfig

if TYPE_CHECKING:
    from models.training import TrainingConfig


def build_model(run: RunConfig) -> torch.nn.Module:
    """The run's network, initialised from the run seed (then overwritten by the global arrays)."""
    from models.networks import build_network

    return build_network(run.network_config(), seed=run.seed)


def run_training_config(run: RunConfig) -> TrainingConfig:
    """The optimizer, patch and augmentation settings every site (and every baseline) trains with."""
    from models.label_protocols import get_protocol
    from models.training import TrainingConfig

    return TrainingConfig.for_protocol(
        get_protocol(run.protocol),
        patch_size=(run.patch_size,) * 3,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        seed=run.seed,
    )


def evaluation_metrics(
    model: torch.nn.Module, data: SiteData, run: RunConfig, prefix: str = ""
) -> dict[str, float]:
    """Mean over the test subjects of Dice, HD95 (mm) and ASSD (mm) per class, and of Dice over classes."""
    from models.label_protocols import get_protocol
    from models.metrics import summarize
    from models.training import evaluate_subjects

    protocol = get_protocol(run.protocol)
    per_subject = evaluate_subjects(
        model,
        data.test,
        protocol.class_names,
        (run.patch_size,) * 3,
        spacing_mm=data.spacing_mm,
        postprocessing=run.postprocessing,
    )
    summary = summarize(per_subject)
    out: dict[str, float] = {}
    computed = dict(zip(EVALUATION_METRICS, ("dice", "hd95_mm", "assd_mm"), strict=True))
    for name in protocol.class_names[1:]:
        for metric, summarized in computed.items():
            out[evaluation_metric_key(metric, name, prefix)] = float(summary[name][summarized]["mean"])
    dice = [out[evaluation_metric_key("dice", n, prefix)] for n in protocol.class_names[1:]]
    out[prefix + MEAN_DICE_KEY] = float(np.mean(dice))
    return out
