"""The site's three handlers, ``query``, ``train`` and ``evaluate``: what a site does with a message.

They run in-process in the ClientApp (client/app.py) in simulation and in a site without a worker, and in
the site's warm worker (client/site_worker.py) when the SuperNode's node config names one; either way the
same code enforces the site's rules. ``context`` is only read for its node config: the worker passes its
own (the site operator's), never one a forwarder sent.

- ``query``: the site's id, role (``train`` / ``holdout``), subject counts and preprocessing plan.
- ``train``: load the global arrays, train ``local-steps`` steps on the site's training split, reply
  with the updated arrays (and, only without DP, the training loss). With ``dp`` on, training is
  person-level DP-SGD
  (client/private_round.py), and a round that would exceed the site's lifetime budget is declined (a
  reply with metric ``refused`` = 1, the reason in ConfigRecord ``refusal``, no arrays); otherwise the
  reply's metrics carry the run's cumulative ``epsilon`` and ``delta`` as recorded in the ledger.
- ``evaluate``: score the global model (and, for FedBN, the site's personalised model) on the site's
  test split; reply with mean Dice / HD95 / ASSD per class and the number of test subjects. The site
  answers only evaluations its rules allow (client/site_activity.py: a round it trained in, once, at
  most ``max-evaluations``, a test split of at least ``min-test-subjects`` persons); otherwise a reply
  with ``refused`` = 1 and the reason. Every handler refuses a run beyond the site's resource caps
  (client/site_policy.py).

What leaves the site: model arrays (the state dict of the shared network) and a MetricRecord of
scalar aggregates. Never an image, a label map, a prediction, a subject id or a per-subject value.

Where the site's data is comes from its node config (client/site_setup.py); how to train and evaluate
comes from the coordinator in each message (contract/site_task.py), so all sites follow one recipe.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.private_round import Refusal, no_dp_refusal, site_refusal, site_rng, train_private_round
from client.site_activity import EvaluationRequest, SiteActivity
from client.site_data import load_site_data
from client.site_log import EVALUATION_REFUSED, ROUND_REFUSED, RUN_REFUSED, keep_final_model, log_refusal
from client.site_model import build_model, evaluation_metrics, run_training_config
from client.site_setup import SiteSetup, site_setup
from client.site_state import latest_personal_layers, normalization_keys, save_personal_layers
from contract.site_task import SiteTask
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY, contract_mismatch
from contract.wire import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DELTA_KEY,
    EPSILON_KEY,
    METRICS_RECORD,
    NUM_TEST_KEY,
    NUM_TRAIN_KEY,
    PERSONAL_PREFIX,
    PLAN_KEY,
    REFUSAL_REASON,
    REFUSAL_RECORD,
    REFUSED_KEY,
    ROLE_KEY,
    ROLE_TRAIN,
    SECONDS_KEY,
    SITE_ID_KEY,
    SITE_RECORD,
    STEPS_KEY,
    TRAIN_LOSS_KEY,
    WEIGHT_KEY,
)
from models.errors import NeurofedError
from models.model_file import weights_sha256


def _context(msg: Message, context: Context) -> tuple[SiteTask, SiteSetup]:
    task = SiteTask.from_record(msg.content[CONFIG_RECORD])
    setup = site_setup(context.node_config, task.run)
    mismatch = contract_mismatch(CONTRACT_VERSION, setup.contract_version, f"site {setup.site_id}")
    if mismatch is not None:
        log_refusal(setup, task, RUN_REFUSED, mismatch)
        raise NeurofedError(mismatch)
    if setup.simulated:
        # Several simulated sites share the machine's cores: one thread each.
        torch.set_num_threads(1)
    return task, setup


def _global_model(msg: Message, task: SiteTask) -> torch.nn.Module:
    model = build_model(task.run)
    model.load_state_dict(msg.content[ARRAYS_RECORD].to_torch_state_dict(), strict=True)
    return model


def _evaluation_refusal(
    request: EvaluationRequest, task: SiteTask, setup: SiteSetup, test_persons: int
) -> str | None:
    """Why the site answers no evaluation of this message (its caps and client/site_activity.py's rules)."""
    if (beyond := setup.policy.refusal(task.run)) is not None:
        return beyond
    policy = setup.policy
    return SiteActivity(setup.state_dir).evaluation_refusal(
        request, setup.role, test_persons, policy.min_test_subjects, policy.max_evaluations
    )


def _refusal_reply(msg: Message, refusal: Refusal, setup: SiteSetup, task: SiteTask) -> Message:
    log_refusal(setup, task, ROUND_REFUSED, refusal.reason)
    metrics = MetricRecord(
        {REFUSED_KEY: 1, WEIGHT_KEY: 0, EPSILON_KEY: refusal.epsilon, DELTA_KEY: refusal.delta}
    )
    reason = ConfigRecord({REFUSAL_REASON: refusal.reason})
    return Message(content=RecordDict({METRICS_RECORD: metrics, REFUSAL_RECORD: reason}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Describe the site; preparing its data here makes the first round's timing honest."""
    task, setup = _context(msg, context)
    if (beyond := setup.policy.refusal(task.run)) is not None:
        reason = f"site {setup.site_id} takes no part in this run: {beyond}"
        log_refusal(setup, task, RUN_REFUSED, reason)
        raise NeurofedError(reason)
    data = load_site_data(setup, task.run)
    site = ConfigRecord(
        {
            SITE_ID_KEY: setup.site_id,
            ROLE_KEY: setup.role,
            CONTRACT_VERSION_KEY: setup.contract_version or 0,
            PLAN_KEY: json.dumps(data.plan.to_dict(), sort_keys=True),
        }
    )
    counts = MetricRecord({NUM_TRAIN_KEY: len(data.train), NUM_TEST_KEY: len(data.test)})
    return Message(content=RecordDict({SITE_RECORD: site, METRICS_RECORD: counts}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Train the global model locally for ``local-steps`` steps; reply with its arrays and the loss."""
    from models.trainable import freeze_except
    from models.training import train_steps
    from models.weight_average import WeightAverage

    task, setup = _context(msg, context)
    run = task.run
    if setup.role != ROLE_TRAIN:
        raise NeurofedError(f"site {setup.site_id} has role {setup.role!r} and never trains")
    if setup.require_dp and not run.dp:
        return _refusal_reply(msg, no_dp_refusal(task, setup), setup, task)
    if (beyond := setup.policy.refusal(run)) is not None:
        return _refusal_reply(msg, site_refusal(task, setup, beyond), setup, task)
    data = load_site_data(setup, run)
    if not data.train:
        raise NeurofedError(f"site {setup.site_id}: no training subjects after holding out the test split")
    model = _global_model(msg, task)
    freeze_except(model, run.trainable_layers)
    personal_keys = normalization_keys(model) if task.personal_layers == "norm" else set()
    own = latest_personal_layers(setup, task.server_round - 1) if personal_keys else None
    if own is not None:
        model.load_state_dict(own, strict=False)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = run_training_config(run)
    proximal_to = global_weights if task.proximal_mu > 0 else None
    privacy: dict[str, float] = {}
    if run.dp:
        outcome = train_private_round(model, data.train_by_person(), config, task, setup, proximal_to)
        if isinstance(outcome, Refusal):
            return _refusal_reply(msg, outcome, setup, task)
        result, privacy = outcome
    else:
        average = WeightAverage(model, run.ema_decay) if run.ema_decay > 0 else None
        result = train_steps(
            model,
            data.train,
            config,
            run.local_steps,
            rng=site_rng(task, setup.site_id),
            proximal_to=proximal_to,
            proximal_mu=task.proximal_mu,
            step_hook=(lambda _step, _loss: average.update()) if average is not None else None,
        )
        if average is not None:
            average.copy_to_model()
    state = model.state_dict()
    if personal_keys:
        save_personal_layers(setup, task.server_round, {k: state[k] for k in personal_keys})
    shared = {k: v.detach().cpu() for k, v in state.items() if k not in personal_keys}
    SiteActivity(setup.state_dir).record_trained(task.run_id, task.server_round)
    metrics: dict[str, float | int] = {
        WEIGHT_KEY: len(data.train),
        STEPS_KEY: int(result.steps),
        SECONDS_KEY: float(result.seconds),
        **privacy,
    }
    if not run.dp:
        # An unnoised loss is a function of every training subject: only a run without DP releases it.
        metrics[TRAIN_LOSS_KEY] = float(result.mean_loss)
    content = RecordDict({ARRAYS_RECORD: ArrayRecord(shared), METRICS_RECORD: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model (and the personalised one, if asked) on the site's test split."""
    task, setup = _context(msg, context)
    data = load_site_data(setup, task.run)
    model = _global_model(msg, task)
    # The last round's model is the run's final model: the site keeps it, whether or not it evaluates it.
    keep_final_model(setup, task, model, data.plan.to_dict())
    request = EvaluationRequest(task.run_id, task.server_round, weights_sha256(model.state_dict()))
    if (reason := _evaluation_refusal(request, task, setup, data.test_persons)) is not None:
        log_refusal(setup, task, EVALUATION_REFUSED, reason)
        refusal = ConfigRecord({REFUSAL_REASON: f"site {setup.site_id}: {reason}"})
        metrics = MetricRecord({REFUSED_KEY: 1, WEIGHT_KEY: 0})
        return Message(content=RecordDict({METRICS_RECORD: metrics, REFUSAL_RECORD: refusal}), reply_to=msg)
    SiteActivity(setup.state_dir).record_evaluated(request)
    metrics: dict[str, float | int] = {WEIGHT_KEY: len(data.test)}
    metrics.update(evaluation_metrics(model, data, task.run))
    if task.evaluate_personal:
        own = latest_personal_layers(setup, task.server_round) if setup.role == ROLE_TRAIN else None
        if own is None:
            # A site that never trained has no layers of its own: its personalised model is the global one.
            metrics.update({PERSONAL_PREFIX + k: v for k, v in list(metrics.items()) if k != WEIGHT_KEY})
        else:
            model.load_state_dict(own, strict=False)
            metrics.update(evaluation_metrics(model, data, task.run, prefix=PERSONAL_PREFIX))
    return Message(content=RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)


HANDLERS = {"query": query, "train": train, "evaluate": evaluate}
"""Each handler by the message type it answers (Flower's ``MessageType`` values)."""
