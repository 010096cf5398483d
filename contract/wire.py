"""Names on the wire: message keys, roles and metric names both sides read and write.

The coordinator sends each site a ConfigRecord ``config`` (the run settings of
`contract.run_config.RunConfig` a site needs, flat Flower keys, plus the per-message keys below) and the
global model as ArrayRecord ``arrays``. A site answers with a MetricRecord ``metrics`` of scalars, the
trained ``arrays`` (train replies), a ConfigRecord ``site`` (query replies) or ``refusal`` (a declined
round).
"""

from __future__ import annotations

ROLE_TRAIN = "train"
"""A site that trains the shared model and evaluates it on its test split."""
ROLE_HOLDOUT = "holdout"
"""A site that never trains: every one of its subjects is a test subject (an unseen site)."""
ROLES: tuple[str, ...] = (ROLE_TRAIN, ROLE_HOLDOUT)

# Records of a message's RecordDict.
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"
REFUSAL_RECORD = "refusal"
"""ConfigRecord of a declined training round; its ``reason`` says why."""
REFUSAL_REASON = "reason"

# The two arrays an ArrayRecord is packed into on the way between the coordinator and a site's ClientApp
# (contract/packed_arrays.py): the tensors' bytes back to back, and their names, dtypes and shapes (JSON).
PACKED_DATA = "neurofed-packed-data"
PACKED_LAYOUT = "neurofed-packed-layout"

# Per-message keys of the ``config`` record, beside the run settings.
SERVER_ROUND_KEY = "server-round"
RUN_ID_KEY = "run-id"
"""Names the run in each site's privacy ledger; the same when the run is resumed."""
PERSONAL_LAYERS_KEY = "personal-layers"
"""``norm``: the site keeps its normalization layers (FedBN) and sends the rest; ``none``: sends all."""
EVALUATE_PERSONAL_KEY = "evaluate-personal"
"""Evaluation messages of a FedBN run: also score the site's personalised model."""

# Keys of the ``site`` record of a query reply.
SITE_ID_KEY = "site-id"
ROLE_KEY = "role"
PLAN_KEY = "plan"

# Metric names.
WEIGHT_KEY = "num-examples"
"""Subjects behind a reply: FedAvg's weight of a training reply, the test-set size of an evaluation."""
REFUSED_KEY = "refused"
"""Metric of a training reply (1) in which the site declines the round; such a reply carries no arrays."""
PERSONAL_PREFIX = "personal-"
"""Evaluation metrics of a site's personalised model (FedBN) carry this prefix in its reply."""
NUM_TRAIN_KEY = "num-train"
NUM_TEST_KEY = "num-test"
STEPS_KEY = "steps"
"""Optimizer steps a site ran in a training round."""
SECONDS_KEY = "seconds"
"""Wall-clock seconds of a site's local training."""
TRAIN_LOSS_KEY = "train-loss"
"""Mean training loss of a round; released only by a round without DP."""
EPSILON_KEY = "epsilon"
"""The run's cumulative ε at the site after this round (its privacy ledger), at ``DELTA_KEY``."""
DELTA_KEY = "delta"
NOISE_MULTIPLIER_KEY = "noise-multiplier"
"""DP-SGD noise std / clipping norm of the site's round."""
SAMPLE_RATE_KEY = "sample-rate"
"""DP-SGD's Poisson sampling rate of persons at the site."""
