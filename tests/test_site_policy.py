"""The site's own rules hold whatever the coordinator asks: its split (by person, from its secret), which
evaluations it answers (a test split of enough persons, rounds it trained in, once, at most
``max-evaluations``), its resource caps, and no unnoised loss in a DP release."""

# ruff: noqa: F811  (the tests take test_federation's `site` fixture, imported by name)
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="neurofed-flwr-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Message  # noqa: E402
from test_federation import _fake_site_data, _initial_state, deployed_site_context, site  # noqa: E402, F401

import client.app as site_app  # noqa: E402
import client.site_handlers as site_handlers  # noqa: E402
from client.privacy_budget import init_site  # noqa: E402
from client.site_policy import ResourceCaps, SitePolicy  # noqa: E402
from client.site_setup import LEDGER_FILE, site_setup  # noqa: E402
from client.site_split import seed_key, split_subjects  # noqa: E402
from contract.run_config import RunConfig  # noqa: E402
from contract.site_task import site_task_record  # noqa: E402
from contract.wire import REFUSED_KEY  # noqa: E402
from server.strategies import make_strategy, state_dict_to_arrays  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")
TORCH_THREADS = 1


def _refusal(reply: Message) -> str | None:
    assert not reply.has_error(), reply.error.reason
    if reply.content["metrics"].get(REFUSED_KEY):
        return str(reply.content["refusal"]["reason"])
    return None


# --- the split ------------------------------------------------------------------------------------------


def test_the_split_keeps_each_persons_sessions_together_and_follows_the_key_only() -> None:
    ids = [f"sub-{p:02d}_ses-{s}" for p in range(8) for s in ("a", "b")] + ["sub-08"]
    key = bytes(range(32))
    split = split_subjects(ids, 0.25, key)
    assert split == split_subjects(list(reversed(ids)), 0.25, key)
    assert sorted(split.train + split.test) == sorted(ids) and not set(split.train) & set(split.test)
    test_persons = {s.split("_ses-")[0] for s in split.test}
    assert split.test_persons == len(test_persons) == 3  # ceil(0.25 x 9 persons)
    assert not test_persons & {s.split("_ses-")[0] for s in split.train}  # no person on both sides
    assert split_subjects(ids, 0.25, bytes(32)) != split  # another key, another split
    assert split_subjects(ids[:2], 0.25, key).train == ()  # one person: held out, nothing to train on
    assert split_subjects(ids[:4], 0.25, key).train  # two persons: one still trains
    assert split_subjects(ids, 1.0, key).train == ()  # an unseen site only tests
    assert split_subjects(ids, 0.25, seed_key(3)) == split_subjects(ids, 0.25, seed_key(3))


def test_a_deployed_sites_split_settings_are_its_own_not_the_runs(tmp_path) -> None:
    context = deployed_site_context(tmp_path, "state")
    greedy = RunConfig(test_fraction=0.9, seed=123)
    setup = site_setup(context.node_config, greedy)
    assert setup.policy.test_fraction == SitePolicy().test_fraction == 0.25
    assert setup.policy.min_test_subjects == 5
    context.node_config.update({"test-fraction": 0.4, "min-test-subjects": 2, "max-local-steps": 7})
    setup = site_setup(context.node_config, greedy)
    assert (setup.policy.test_fraction, setup.policy.min_test_subjects) == (0.4, 2)
    assert setup.policy.caps == ResourceCaps(max_local_steps=7)


# --- evaluation -----------------------------------------------------------------------------------------


def test_a_one_person_test_split_answers_no_evaluation(site) -> None:
    state = _initial_state()
    del site.context.node_config["min-test-subjects"]  # the site's default: 5 persons
    assert _refusal(site("fedavg", 1, state)) is None  # it trains
    reason = _refusal(site("fedavg", 1, state, kind="evaluate"))
    assert reason is not None and "min-test-subjects = 5" in reason and "1 person" in reason
    assert "dice-mean" not in str(site("fedavg", 1, state, kind="evaluate").content["metrics"])


def test_the_site_evaluates_rounds_it_trained_in_once_each_and_at_most_max_evaluations(site) -> None:
    state = _initial_state()
    site.context.node_config["max-evaluations"] = 2
    assert "did not train in round 1" in _refusal(site("fedavg", 1, state, kind="evaluate"))
    site("fedavg", 1, state)
    assert _refusal(site("fedavg", 1, state, kind="evaluate")) is None
    assert _refusal(site("fedavg", 1, state, kind="evaluate")) is None  # the same model again: same answer
    crafted = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}
    assert "already evaluated with another model" in _refusal(site("fedavg", 1, crafted, kind="evaluate"))
    for server_round in (2, 3):
        site("fedavg", server_round, state)
    assert _refusal(site("fedavg", 2, state, kind="evaluate")) is None
    assert "max-evaluations = 2" in _refusal(site("fedavg", 3, state, kind="evaluate"))


# --- resource caps --------------------------------------------------------------------------------------


def test_a_run_beyond_the_sites_caps_is_refused_naming_the_cap(site) -> None:
    state = _initial_state()
    site.context.node_config.update({"max-local-steps": 1, "min-spacing-mm": 3.0})
    reason = _refusal(site("fedavg", 1, state))
    assert "local-steps = 2 is above the site's max-local-steps = 1" in reason
    assert "spacing-mm = 2.0 is finer than the site's min-spacing-mm = 3.0" in reason
    assert site.seen == []  # nothing trained
    assert "max-local-steps" in _refusal(site("fedavg", 1, state, kind="evaluate"))
    site.context.node_config.update({"max-local-steps": 2, "min-spacing-mm": 2.0})
    assert _refusal(site("fedavg", 1, state)) is None


# --- DP: the person is the unit, and no unnoised loss leaves ---------------------------------------------


@pytest.fixture()
def dp_reply(monkeypatch, tmp_path, node_grid):
    """``dp_reply(persons)``: the metrics of a DP round-1 reply of a site whose training subjects belong
    to ``persons`` (a person named twice has two sessions)."""
    initial = _initial_state()

    def reply(persons: tuple[str, ...]) -> dict:
        monkeypatch.setattr(site_handlers, "load_site_data", lambda setup, run: _fake_site_data(run, persons))
        run = RunConfig(  # a coordinator sends the clipping norm it chose (server/global_model.py)
            num_sites=2, unseen_sites=1, local_steps=1, patch_size=16, batch_size=1, run_dir=str(tmp_path),
            dp_max_grad_norm=1.0,
        )
        state = "state-" + "-".join(persons)
        init_site(tmp_path / state / LEDGER_FILE, 100.0, 1e-3)  # what the operator runs once: budget --init
        context = deployed_site_context(tmp_path, state)
        record = ConfigRecord(site_task_record(run, server_round=1, run_id="run-1"))
        (message,) = make_strategy(run).configure_train(
            1, state_dict_to_arrays(initial), record, node_grid([7])
        )
        answer = site_app.app(message, context)
        assert _refusal(answer) is None
        return dict(answer.content["metrics"])

    return reply


def test_a_dp_round_samples_persons_not_sessions_and_releases_no_loss(dp_reply) -> None:
    two_persons_three_sessions = dp_reply(("sub-01", "sub-01", "sub-02"))
    # batch 1 of 2 persons: each step includes each person with probability 1/2 (not 1/3 per session).
    assert two_persons_three_sessions["sample-rate"] == pytest.approx(0.5)
    assert dp_reply(("sub-01", "sub-02", "sub-03"))["sample-rate"] == pytest.approx(1 / 3)
    assert "train-loss" not in two_persons_three_sessions  # an unnoised loss would describe the subjects


def test_a_study_may_fix_site_secrets_explicitly_and_then_repeats_its_splits(tmp_path) -> None:
    from client.site_data import site_split_key
    from client.site_setup import SiteSetup
    from contract.run_layout import SITE_STATE_DIR
    from study.simulation import fix_site_secrets

    def key(run: str, seed: int | None) -> bytes:
        site_dir = tmp_path / "data" / "site-01"
        if seed is not None:
            fix_site_secrets(tmp_path / run, [site_dir], seed)
        state = tmp_path / run / SITE_STATE_DIR / "site-01"
        return site_split_key(SiteSetup("site-01", "train", site_dir, None, state, True))

    assert key("a", 7) == key("b", 7) != key("c", 8)
    assert key("d", None) != key("e", None)  # by default every run's sites make their own secrets


def test_the_site_daemon_passes_its_policy_in_the_node_config_and_refuses_a_bad_one() -> None:
    from pathlib import Path

    from client.site_daemon import SiteDaemonConfig, node_config
    from models.errors import NeurofedError

    base = dict(
        coordinator="c:9092", ca_cert=Path("ca"), private_key=Path("k"), data_dir=Path("d"), budget_epsilon=5
    )
    line = node_config(SiteDaemonConfig(**base, policy=("min-test-subjects=8", "max-local-steps=100")))
    assert "min-test-subjects=8.0" in line and "max-local-steps=100.0" in line
    for bad in ("min-test-subject=8", "test-fraction=1.5", "max-evaluations=lots"):
        with pytest.raises(NeurofedError, match="policy|test-fraction"):
            node_config(SiteDaemonConfig(**base, policy=(bad,)))
