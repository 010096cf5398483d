"""The membership-inference audit (study/membership_audit.py) and its section of the report.

The attacks are checked on hand-made losses; the loss measurement and an overfitted model on tiny random
volumes (16^3 voxels, the tiny network); the report section on a hand-made run directory. The audit of a
real run (evaluation.json and report.md) is tested in tests/test_report.py on its simulated study.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from study.membership_audit import (
    POOLED,
    AuditSettings,
    attack_auc,
    audit_membership,
    calibrated_attack,
    calibrated_threshold,
    subject_losses,
)

# --- the attacks on hand-made losses ----------------------------------------------------------------------


def _pairwise_auc(members, nonmembers) -> float:
    """P(member loss < non-member loss) + P(tie) / 2, counted pair by pair."""
    pairs = list(itertools.product(members, nonmembers))
    return sum(1.0 if m < n else 0.5 if m == n else 0.0 for m, n in pairs) / len(pairs)


def test_auc_is_one_when_every_member_has_a_lower_loss_and_zero_when_every_member_has_a_higher_one() -> None:
    assert attack_auc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert attack_auc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0


def test_auc_is_one_half_for_identical_losses() -> None:
    assert attack_auc([0.4, 0.7, 1.1], [0.4, 0.7, 1.1]) == 0.5
    assert attack_auc([0.3] * 4, [0.3] * 2) == 0.5


def test_auc_counts_ties_half_by_hand() -> None:
    # Pairs (member, non-member): (1,2) 1, (1,3) 1, (2,2) 1/2, (2,3) 1, (2,2) 1/2, (2,3) 1 -> 5 of 6.
    assert attack_auc([1.0, 2.0, 2.0], [2.0, 3.0]) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        members = rng.integers(0, 5, rng.integers(1, 7)).astype(float)
        nonmembers = rng.integers(0, 5, rng.integers(1, 7)).astype(float)
        assert attack_auc(members, nonmembers) == pytest.approx(_pairwise_auc(members, nonmembers))


def test_auc_is_undefined_without_members_or_non_members() -> None:
    assert attack_auc([], [0.5]) is None and attack_auc([0.5], []) is None


def test_calibrated_threshold_keeps_the_reference_false_positive_rate_at_most_the_target() -> None:
    # 10 reference losses at 10 %: one may fall below the threshold, so it is the second smallest.
    reference = [0.9, 0.2, 0.5, 0.3, 0.8, 0.4, 0.7, 0.6, 1.0, 0.1]
    assert calibrated_threshold(reference, 0.1) == 0.2
    # 6 reference losses: 10 % of 6 is less than one subject, so nothing may fall below it.
    assert calibrated_threshold([0.5, 0.1, 0.3, 0.2, 0.4, 0.6], 0.1) == 0.1
    rng = np.random.default_rng(1)
    for n in range(1, 40):
        losses = rng.normal(size=n)
        for fpr in (0.05, 0.1, 0.25, 0.5):
            threshold = calibrated_threshold(losses, fpr)
            assert np.mean(losses < threshold) <= fpr


def test_calibrated_attack_rates_by_hand() -> None:
    reference = [0.9, 0.2, 0.5, 0.3, 0.8, 0.4, 0.7, 0.6, 1.0, 0.1]  # threshold 0.2 at 10 %
    members = [0.05, 0.15, 0.25, 0.12]  # 3 of 4 below 0.2
    nonmembers = [0.18, 0.6]  # 1 of 2 below 0.2
    attack = calibrated_attack(members, nonmembers, reference, 0.1)
    assert attack.threshold == 0.2
    assert attack.reference_fpr == pytest.approx(0.1)
    assert attack.tpr == pytest.approx(0.75) and attack.fpr == pytest.approx(0.5)
    assert attack.advantage == pytest.approx(0.25)
    assert attack.auc_members_vs_reference == pytest.approx(_pairwise_auc(members, reference))
    assert attack.n_reference == 10


def test_settings_refuse_a_reference_rate_outside_zero_one_naming_it() -> None:
    from models.errors import NeurofedError

    with pytest.raises(NeurofedError, match="reference_fpr"):
        AuditSettings(patch_size=(16, 16, 16), reference_fpr=1.0)


# --- losses of a model ------------------------------------------------------------------------------------

SIZE = 16


def _random_subject(rng: np.random.Generator, name: str):
    """A 16^3 volume of noise with random labels: only memorising it lowers a model's loss on it."""
    image = rng.normal(size=(1, SIZE, SIZE, SIZE)).astype(np.float32)
    label = rng.integers(0, 4, size=(SIZE, SIZE, SIZE)).astype(np.uint8)
    return name, image, label


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    from models.networks import NetworkConfig, build_network

    return build_network(NetworkConfig.preset("tiny", in_channels=1, out_channels=4), seed=seed)


def test_subject_losses_are_deterministic_per_subject_and_leave_the_model_mode_alone() -> None:
    rng = np.random.default_rng(2)
    subjects = [_random_subject(rng, f"sub-{i}") for i in range(3)]
    settings = AuditSettings(patch_size=(SIZE,) * 3, patches_per_subject=2)
    model = _tiny_model()
    model.train()
    losses = subject_losses(model, subjects, settings)
    assert model.training
    assert list(losses) == ["sub-0", "sub-1", "sub-2"]
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    # A subject's loss depends on the subject, not on the others or their order.
    again = subject_losses(model, subjects[::-1], settings)
    assert again == pytest.approx(losses)
    assert subject_losses(model, subjects[1:2], settings) == pytest.approx({"sub-1": losses["sub-1"]})


@pytest.fixture(scope="module")
def overfitted():
    """A tiny network trained many steps on the 2 members of site a (and nothing else)."""
    from models.training import TrainingConfig, train_steps

    rng = np.random.default_rng(3)
    sites = {
        "site-a": (
            [_random_subject(rng, f"a-member-{i}") for i in range(2)],
            [_random_subject(rng, "a-test")],
        ),
        "site-b": ([_random_subject(rng, "b-member")], [_random_subject(rng, "b-test")]),
    }
    reference = {"site-u": [_random_subject(rng, f"u-{i}") for i in range(4)]}
    model = _tiny_model()
    config = TrainingConfig(patch_size=(SIZE,) * 3, batch_size=2, learning_rate=0.03, augment=False)
    train_steps(model, [(image, label) for _, image, label in sites["site-a"][0]], config, 30)
    return model, sites, reference


def test_an_overfitted_model_gives_its_members_away_and_an_untrained_one_does_not(overfitted) -> None:
    model, sites, reference = overfitted
    settings = AuditSettings(patch_size=(SIZE,) * 3, patches_per_subject=2, reference_fpr=0.25)
    audit = audit_membership(model, sites, reference, settings)
    site_a, site_b = audit.sites
    assert (site_a.name, site_a.n_members, site_a.n_nonmembers) == ("site-a", 2, 1)
    assert site_a.auc == 1.0
    # Calibrated on the unseen subjects, the threshold catches every member.
    assert site_a.calibrated.tpr == 1.0 and site_a.calibrated.auc_members_vs_reference == 1.0
    assert site_a.calibrated.reference_fpr <= 0.25
    # The same network untrained has seen no subject: the attack does no better than on the overfitted one.
    untrained = audit_membership(_tiny_model(), sites, reference, settings)
    assert untrained.sites[0].calibrated.auc_members_vs_reference < 1.0


def test_audit_pools_training_sites_and_writes_plain_json(overfitted) -> None:
    model, sites, reference = overfitted
    settings = AuditSettings(patch_size=(SIZE,) * 3, patches_per_subject=1)
    audit = audit_membership(model, sites, reference, settings)
    assert audit.pooled is not None and audit.pooled.name == POOLED
    assert audit.pooled.n_members == 3 and audit.pooled.n_nonmembers == 2
    assert set(audit.pooled.member_losses) == {"site-a/a-member-0", "site-a/a-member-1", "site-b/b-member"}
    assert audit.pooled.auc == pytest.approx(
        _pairwise_auc(list(audit.pooled.member_losses.values()), list(audit.pooled.nonmember_losses.values()))
    )
    assert set(audit.reference_losses) == {f"site-u/u-{i}" for i in range(4)}
    document = json.loads(json.dumps(audit.to_dict()))
    assert [s["n_members"] for s in document["sites"]] == [2, 1]
    assert document["settings"]["patch_size"] == [SIZE] * 3
    # Without an unseen site there is nothing to calibrate on.
    alone = audit_membership(model, {"site-a": sites["site-a"]}, {}, settings)
    assert alone.sites[0].calibrated is None and alone.pooled is None and alone.sites[0].auc is not None


# --- the report's section ---------------------------------------------------------------------------------


def _records(tmp_path, dp: bool, with_audit: bool = True, data_root: str = "data"):
    from server.report import RunRecords

    group = {
        "name": "site-01",
        "n_members": 4,
        "n_nonmembers": 2,
        "auc": 0.625,
        "calibrated": {"tpr": 0.25, "fpr": 0.0, "advantage": 0.25, "auc_members_vs_reference": 0.7},
    }
    audit = {
        "settings": {"patches_per_subject": 8, "reference_fpr": 0.1},
        "sites": [group, {**group, "name": "site-02", "auc": 0.5}],
        "pooled": {**group, "name": POOLED, "n_members": 8, "n_nonmembers": 4, "auc": 0.5625},
        "reference_sites": ["site-03"],
    }
    events = [
        {"event": "train", "site": site, "round": r, "epsilon": eps * r}
        for site, eps in (("site-01", 1.5), ("site-02", 2.0))
        for r in (1, 2)
        if dp
    ]
    evaluation = {"membership_audit": audit} if with_audit else {}
    config = {"run_config": {"dp": dp, "dp_delta": 1e-5, "data_root": data_root}, "sites": []}
    return RunRecords(tmp_path, config, events, evaluation)


def _table_rows(section) -> dict[str, list[str]]:
    from server.report import Table

    (table,) = [b for b in section.blocks if isinstance(b, Table)]
    return {row[0]: row for row in table.rows}


def test_report_section_puts_each_sites_epsilon_beside_its_attack_results(tmp_path) -> None:
    from server.report import _epsilon_series, privacy_audit_section

    records = _records(tmp_path, dp=True)
    section = privacy_audit_section(records, _epsilon_series(records.events))
    assert section.title == "Privacy audit"
    rows = _table_rows(section)
    assert rows["site-01"][:5] == ["site-01", "3", "4", "2", "0.62"]
    assert rows["site-02"][1] == "4" and rows["site-02"][4] == "0.50"
    assert rows["site-01"][5:] == ["0.25", "0.00", "0.25", "0.70"]
    assert rows[POOLED][1:4] == ["max 4", "8", "4"]


def test_report_section_says_no_dp_and_how_to_measure_a_missing_audit(tmp_path) -> None:
    from server.report import privacy_audit_section, render_markdown

    rows = _table_rows(privacy_audit_section(_records(tmp_path, dp=False), {}))
    assert rows["site-01"][1] == "no DP" and rows[POOLED][1] == "no DP"
    missing = render_markdown(
        "r", [privacy_audit_section(_records(tmp_path, dp=False, with_audit=False), {})]
    )
    assert "Not measured" in missing and f"neurofed report {tmp_path} --re-evaluate" in missing
    # A deployed run (no data root): the coordinator holds no scans, so the report says where it can be built.
    deployed = render_markdown(
        "r", [privacy_audit_section(_records(tmp_path, dp=False, with_audit=False, data_root=""), {})]
    )
    assert "coordinator cannot build it" in deployed and "--data-root DIR" in deployed
