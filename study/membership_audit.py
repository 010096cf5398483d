"""Membership-inference audit of a trained model: can an attacker tell a site's training subjects (members)
from its held-out subjects (non-members) by the model's loss on them?

The loss of a subject is the training loss (Dice + cross-entropy, `models.training.make_loss`) of the
model in eval mode, averaged over a fixed, deterministic set of patches of the subject's preprocessed
volume: ``patches_per_subject`` patches of the training patch size, drawn by the training sampler
(`models.training.PatchDataset`, the same foreground share) without augmentation, from a generator seeded
by ``(seed, subject id)``. The same subject therefore always gets the same patches, whichever model is
audited and whichever group it is in. Patches, not the whole volume, because they are what the model was
trained on (the loss an attacker would exploit).

Two attacks, both "a low loss means a member":

- loss-threshold attack: the AUC of ``-loss`` separating members from non-members, the Mann-Whitney U
  statistic over all (member, non-member) pairs divided by their number; a tie counts half. 0.5 is chance,
  1.0 every member has a lower loss than every non-member.
- calibrated attack: the attacker knows the subjects of the unseen (reference) site are non-members and
  sets a loss threshold giving at most ``reference_fpr`` false positives there (`calibrated_threshold`);
  then reports the true-positive rate on the site's members, the false-positive rate on the site's own
  non-members, their difference (the membership advantage) and the AUC of members vs reference subjects.
  The reference site has its own scanner: a model's loss there is higher for site shift alone, so the
  calibrated attack overstates membership leakage where the model does not generalize; the within-site
  loss-threshold AUC is free of that.

Small samples: with ~4 members and ~2 non-members per site the AUC takes one of only ~9 values, so each
result states its group sizes, and a pooled audit over all training sites is given beside the per-site ones.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.errors import NeurofedError

AuditSubject = tuple[str, np.ndarray, np.ndarray]
"""``(subject id, image (C, X, Y, Z) float32, label (X, Y, Z) integer class indices)``, preprocessed."""

POOLED = "all training sites"


@dataclass(frozen=True)
class AuditSettings:
    """How subject losses are measured and the calibrated attack is set.

    Attributes:
        patch_size: patch ``(X, Y, Z)`` in voxels; the run's training patch size.
        patches_per_subject: patches whose mean loss is a subject's loss.
        foreground_share: share of patches centred on a foreground class (as in training).
        seed: with the subject id, seeds the patch positions.
        reference_fpr: the largest false-positive rate the calibrated threshold may give on the reference
            (unseen-site) subjects, in (0, 1).
    """

    patch_size: tuple[int, int, int]
    patches_per_subject: int = 8
    foreground_share: float = 0.5
    seed: int = 0
    reference_fpr: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise NeurofedError(
                f"membership audit: patch_size {self.patch_size} must be three positive sizes"
            )
        if self.patches_per_subject < 1:
            raise NeurofedError(
                f"membership audit: patches_per_subject={self.patches_per_subject} must be at least 1"
            )
        if not 0.0 < self.reference_fpr < 1.0:
            raise NeurofedError(f"membership audit: reference_fpr={self.reference_fpr} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


def subject_losses(
    model: torch.nn.Module,
    subjects: Sequence[AuditSubject],
    settings: AuditSettings,
    on_subject: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Subject id -> mean training loss (Dice + CE) of ``model`` over the subject's fixed audit patches.

    The model runs in eval mode without gradients; its mode is restored afterwards.
    """
    from models.training import PatchDataset, make_loss

    loss_fn = make_loss()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    try:
        with torch.inference_mode():
            for subject_id, image, label in subjects:
                patches = PatchDataset(
                    [(image, label)],
                    settings.patch_size,
                    length=settings.patches_per_subject,
                    seed=_subject_seed(settings.seed, subject_id),
                    foreground_share=settings.foreground_share,
                    augmentation=None,
                )
                per_patch = []
                for image_patch, label_patch in patches:
                    logits = model(image_patch[None].to(device))
                    per_patch.append(float(loss_fn(logits, label_patch[None].to(device))))
                losses[subject_id] = float(np.mean(per_patch))
                if on_subject is not None:
                    on_subject(subject_id)
    finally:
        model.train(was_training)
    return losses


def _subject_seed(seed: int, subject_id: str) -> int:
    return int(np.random.default_rng([seed, zlib.crc32(subject_id.encode())]).integers(0, 2**63 - 1))


def attack_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float | None:
    """AUC of the loss-threshold attack: P(member loss < non-member loss) + P(tie) / 2; None if a group is empty.

    The Mann-Whitney U statistic of the non-member losses against the member losses, over
    ``n_members * n_nonmembers`` pairs.
    """
    members = np.asarray(member_losses, dtype=float)
    nonmembers = np.asarray(nonmember_losses, dtype=float)
    if members.size == 0 or nonmembers.size == 0:
        return None
    from scipy.stats import mannwhitneyu

    # U of the first sample counts pairs where it is larger (ties half): a non-member's loss above a member's.
    u = mannwhitneyu(nonmembers, members, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (members.size * nonmembers.size)


def calibrated_threshold(reference_losses: Sequence[float], fpr: float) -> float:
    """Loss threshold ``t`` ("member" when loss < t) giving at most ``fpr`` false positives on the reference.

    ``t`` is the ``k``-th smallest reference loss (0-based) with ``k = floor(fpr * n)``: at most ``k`` of the
    ``n`` reference losses lie strictly below it. With few reference subjects ``k`` may be 0, and then only
    a loss below every reference subject's counts as a member.
    """
    reference = np.sort(np.asarray(reference_losses, dtype=float))
    if reference.size == 0:
        raise ValueError("the calibrated attack needs at least one reference (non-member) loss")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr={fpr} must be in (0, 1)")
    k = math.floor(fpr * reference.size + 1e-9)
    return float(reference[k])


@dataclass(frozen=True)
class CalibratedAttack:
    """The calibrated attack on one group of members and non-members.

    Attributes:
        threshold: the loss threshold (member when loss < threshold), from the reference subjects.
        reference_fpr: the share of reference subjects below the threshold (at most the target).
        tpr: the share of members below the threshold.
        fpr: the share of the group's own non-members below the threshold.
        advantage: ``tpr - fpr``.
        auc_members_vs_reference: loss-threshold AUC of members vs reference subjects.
        n_reference: reference subjects.
    """

    threshold: float
    reference_fpr: float
    tpr: float
    fpr: float
    advantage: float
    auc_members_vs_reference: float | None
    n_reference: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrated_attack(
    member_losses: Sequence[float],
    nonmember_losses: Sequence[float],
    reference_losses: Sequence[float],
    target_fpr: float,
) -> CalibratedAttack:
    """The calibrated attack: threshold from ``reference_losses`` (`calibrated_threshold`), rates on the others."""
    threshold = calibrated_threshold(reference_losses, target_fpr)

    def below(losses: Sequence[float]) -> float:
        values = np.asarray(losses, dtype=float)
        return float(np.mean(values < threshold)) if values.size else math.nan

    tpr, fpr = below(member_losses), below(nonmember_losses)
    return CalibratedAttack(
        threshold=threshold,
        reference_fpr=below(reference_losses),
        tpr=tpr,
        fpr=fpr,
        advantage=tpr - fpr,
        auc_members_vs_reference=attack_auc(member_losses, reference_losses),
        n_reference=len(reference_losses),
    )


@dataclass(frozen=True)
class GroupAudit:
    """Both attacks on one training site (or on all training sites pooled).

    Attributes:
        name: the site id, or `POOLED`.
        member_losses / nonmember_losses: subject -> loss (pooled: ``site/subject`` -> loss).
        auc: loss-threshold AUC, members vs the group's non-members (None without non-members).
        calibrated: the calibrated attack (None without reference subjects).
    """

    name: str
    member_losses: dict[str, float]
    nonmember_losses: dict[str, float]
    auc: float | None
    calibrated: CalibratedAttack | None

    @property
    def n_members(self) -> int:
        return len(self.member_losses)

    @property
    def n_nonmembers(self) -> int:
        return len(self.nonmember_losses)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "auc": self.auc,
            "calibrated": self.calibrated.to_dict() if self.calibrated is not None else None,
            "member_losses": self.member_losses,
            "nonmember_losses": self.nonmember_losses,
        }


def audit_group(
    name: str,
    member_losses: Mapping[str, float],
    nonmember_losses: Mapping[str, float],
    reference_losses: Mapping[str, float],
    reference_fpr: float,
) -> GroupAudit:
    """Both attacks on one group, from losses already measured."""
    members, nonmembers = list(member_losses.values()), list(nonmember_losses.values())
    reference = list(reference_losses.values())
    return GroupAudit(
        name=name,
        member_losses=dict(member_losses),
        nonmember_losses=dict(nonmember_losses),
        auc=attack_auc(members, nonmembers),
        calibrated=calibrated_attack(members, nonmembers, reference, reference_fpr) if reference else None,
    )


@dataclass(frozen=True)
class MembershipAudit:
    """The audit of one model: per training site, pooled over them, and the reference it was calibrated on.

    Attributes:
        settings: how losses were measured.
        sites: one per training site, in the order given.
        pooled: all training sites' members vs all their non-members (None with fewer than two sites).
        reference_sites: the unseen sites whose subjects calibrate the attack.
        reference_losses: ``site/subject`` -> loss of the reference subjects.
    """

    settings: AuditSettings
    sites: list[GroupAudit]
    pooled: GroupAudit | None
    reference_sites: list[str]
    reference_losses: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": (
                "per-subject loss = mean Dice+CE training loss of the model over a fixed set of patches of "
                "the subject (training sampler, no augmentation); loss-threshold attack AUC = Mann-Whitney "
                "U / (n_members * n_nonmembers), ties half; calibrated attack: threshold at the reference "
                "(unseen-site) losses giving at most reference_fpr false positives there"
            ),
            "settings": self.settings.to_dict(),
            "sites": [s.to_dict() for s in self.sites],
            "pooled": self.pooled.to_dict() if self.pooled is not None else None,
            "reference_sites": list(self.reference_sites),
            "reference_losses": dict(self.reference_losses),
        }


def audit_membership(
    model: torch.nn.Module,
    training_sites: Mapping[str, tuple[Sequence[AuditSubject], Sequence[AuditSubject]]],
    reference_sites: Mapping[str, Sequence[AuditSubject]],
    settings: AuditSettings,
    on_subject: Callable[[str], None] | None = None,
) -> MembershipAudit:
    """Run both attacks against ``model`` for every training site.

    Args:
        model: the audited network (e.g. a run's final global model).
        training_sites: site id -> (its training subjects (members), its held-out subjects (non-members)).
        reference_sites: unseen site id -> its subjects, all non-members; may be empty (then no calibrated
            attack).
        settings: patches and the calibrated attack's reference false-positive rate.
        on_subject: called with each subject id once its loss is measured (progress).
    """
    reference: dict[str, float] = {}
    for site_id, subjects in reference_sites.items():
        for subject_id, loss in subject_losses(model, subjects, settings, on_subject).items():
            reference[f"{site_id}/{subject_id}"] = loss
    sites = []
    for site_id, (members, nonmembers) in training_sites.items():
        sites.append(
            audit_group(
                site_id,
                subject_losses(model, members, settings, on_subject),
                subject_losses(model, nonmembers, settings, on_subject),
                reference,
                settings.reference_fpr,
            )
        )
    pooled = None
    if len(sites) > 1:
        pooled = audit_group(
            POOLED,
            {f"{s.name}/{k}": v for s in sites for k, v in s.member_losses.items()},
            {f"{s.name}/{k}": v for s in sites for k, v in s.nonmember_losses.items()},
            reference,
            settings.reference_fpr,
        )
    return MembershipAudit(
        settings=settings,
        sites=sites,
        pooled=pooled,
        reference_sites=list(reference_sites),
        reference_losses=reference,
    )
