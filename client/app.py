"""The site's Flower ClientApp: prepares the site's data once, trains and evaluates the shared network.

``app`` is what ``flwr run .`` and ``neurofed simulate`` load
(``[tool.flwr.app.components] clientapp = "client.app:app"``). It answers three messages:

- ``query``: the site's id, role (``train`` / ``holdout``), subject counts and preprocessing plan.
- ``train``: load the global arrays, train ``local-steps`` steps on the site's training split, reply
  with the updated arrays and the training loss. With ``dp`` on, training is subject-level DP-SGD, and
  the site first checks the round against its privacy ledger: a round that would exceed the site's
  lifetime budget is declined (a reply with metric ``refused`` = 1, the reason in ConfigRecord
  ``refusal``, no arrays); otherwise the reply's metrics carry the run's cumulative ``epsilon`` and
  ``delta`` as recorded in the ledger.
- ``evaluate``: score the global model (and, for FedBN, the site's personalised model) on the site's
  test split; reply with mean Dice / HD95 / ASSD per class and the number of test subjects.

What leaves the site: model arrays (the state dict of the shared network) and a MetricRecord of
scalar aggregates. Never an image, a label map, a prediction, a subject id or a per-subject value.

Where a site's data is (node config, set when starting the SuperNode, e.g.
``flower-supernode --node-config "data-dir='/data/mri' site-id='hospital-a' role='train'"``):

- ``data-dir``: the site's data folder (BIDS or flat, see README); ``site-id`` (default: the folder's
  name); ``role`` (``train``, default, or ``holdout``: evaluates only, never trains);
  ``cache-dir`` (preprocessed cache); ``state-dir`` (what the site keeps between rounds, e.g. its
  personalised normalization layers); ``ledger`` (the privacy ledger, default
  ``<state-dir>/privacy-ledger.jsonl``); ``budget-epsilon`` / ``budget-delta`` (the lifetime privacy
  budget written into the ledger; without one, and without one set by `neurofed-site budget`, every DP
  round is declined).
- In Flower's simulation the node config only holds ``partition-id`` / ``num-partitions``: partition
  i is then the i-th site folder (name order) under the run's ``data-root``, the last ``unseen-sites``
  partitions are holdout sites, and cache, state and ledger go under the run's ``run-dir``; a simulated
  ledger without a budget gets `SIMULATED_BUDGET`.

Every setting of how to train and evaluate comes from the server in each message's ConfigRecord (the
flat run-config keys of server/run_config.py), so all sites follow one recipe.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_split import split_subjects
from models.errors import NeurofedError

if TYPE_CHECKING:
    from client.preprocessing import PreprocessingPlan
    from privacy.dp_sgd import DPConfig
    from privacy.privacy_ledger import PrivacyLedger

ROLE_TRAIN = "train"
ROLE_HOLDOUT = "holdout"
PERSONAL_PREFIX = "personal-"
_NORM_TYPES = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


@dataclass(frozen=True)
class Recipe:
    """The part of the run settings a site needs (parsed from the message's ConfigRecord)."""

    server_round: int
    local_steps: int
    protocol: str
    network_preset: str
    architecture: str
    patch_size: int
    batch_size: int
    learning_rate: float
    seed: int
    test_fraction: float
    unseen_sites: int
    contrast: str
    spacing_mm: float
    field_of_view_mm: str
    data_root: str
    run_dir: str
    proximal_mu: float
    personal_layers: str
    evaluate_personal: bool
    num_rounds: int = 1
    run_id: str = ""
    dp: bool = True
    dp_target_epsilon: float = 8.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_grad_sample_mode: str = "vmap"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Recipe:
        def get(key: str, default: Any = None) -> Any:
            if key in config:
                return config[key]
            if default is None:
                raise NeurofedError(
                    f"the server's message lacks setting {key!r}: server and site run different neurofed "
                    "versions; update both"
                )
            return default

        return cls(
            server_round=int(get("server-round")),
            local_steps=int(get("local-steps")),
            protocol=str(get("protocol")),
            network_preset=str(get("network-preset")),
            architecture=str(get("architecture")),
            patch_size=int(get("patch-size")),
            batch_size=int(get("batch-size")),
            learning_rate=float(get("learning-rate")),
            seed=int(get("seed")),
            test_fraction=float(get("test-fraction")),
            unseen_sites=int(get("unseen-sites")),
            contrast=str(get("contrast")),
            spacing_mm=float(get("spacing-mm")),
            field_of_view_mm=str(get("field-of-view-mm", "")),
            data_root=str(get("data-root", "")),
            run_dir=str(get("run-dir", "")),
            proximal_mu=float(get("proximal-mu", 0.0)),
            personal_layers=str(get("personal-layers", "none")),
            evaluate_personal=bool(get("evaluate-personal", False)),
            num_rounds=int(get("num-server-rounds", 1)),
            run_id=str(get("run-id", "")),
            dp=bool(get("dp", True)),
            dp_target_epsilon=float(get("dp-target-epsilon", 8.0)),
            dp_noise_multiplier=float(get("dp-noise-multiplier", 0.0)),
            dp_max_grad_norm=float(get("dp-max-grad-norm", 1.0)),
            dp_delta=float(get("dp-delta", 1e-5)),
            dp_grad_sample_mode=str(get("dp-grad-sample-mode", "vmap")),
        )

    def dp_config(self) -> DPConfig:
        """The site's DP-SGD settings for this run (the noise multiplier wins over the target ε)."""
        from privacy.dp_sgd import DPConfig

        return DPConfig(
            enabled=True,
            noise_multiplier=self.dp_noise_multiplier or None,
            target_epsilon=self.dp_target_epsilon,
            max_grad_norm=self.dp_max_grad_norm,
            delta=self.dp_delta,
            grad_sample_mode=self.dp_grad_sample_mode,
        )


@dataclass(frozen=True)
class SiteSetup:
    """Where this site's data, cache and between-round state are, and its id and role."""

    site_id: str
    role: str
    data_dir: Path
    cache_dir: Path | None
    state_dir: Path
    simulated: bool
    ledger_path: Path | None = None
    budget: tuple[float, float] | None = None
    require_dp: bool = False
    """Refuse every round the coordinator asks to train without DP. On by default for a deployed site
    (node config ``require-dp``, off only by the site's own choice): the privacy promise is enforced by
    the site, not by the coordinator's settings."""

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger (node config ``ledger``, default ``<state-dir>/privacy-ledger.jsonl``)."""
        from privacy.privacy_ledger import PrivacyLedger

        return PrivacyLedger(self.ledger_path or self.state_dir / LEDGER_FILE)


LEDGER_FILE = "privacy-ledger.jsonl"
SIMULATED_BUDGET = (100.0, 1e-3)
"""Lifetime (ε, δ) budget a simulated site's ledger gets when it has none: generous, so that only a run
far beyond any sane privacy level is refused (a simulated site's ledger lives in the run directory and
records that run only). Real sites set theirs with `neurofed-site budget` or the node config."""


def _node_budget(node_config: Mapping[str, Any]) -> tuple[float, float] | None:
    if "budget-epsilon" not in node_config:
        if "budget-delta" in node_config:
            raise NeurofedError(
                "node config 'budget-delta' needs 'budget-epsilon' (the lifetime ε) beside it"
            )
        return None
    try:
        return float(node_config["budget-epsilon"]), float(node_config.get("budget-delta", 1e-5))
    except (TypeError, ValueError) as exc:
        raise NeurofedError(
            f"node config 'budget-epsilon' / 'budget-delta' must be numbers, e.g. budget-epsilon=10 "
            f"budget-delta=1e-5 ({exc})"
        ) from exc


def _node_flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise NeurofedError(f"node config {key!r} must be true or false, got {value!r}")


def site_setup(node_config: Mapping[str, Any], recipe: Recipe) -> SiteSetup:
    """Resolve the site from its node config (deployment) or its partition id (simulation)."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        site_id = str(node_config.get("site-id", data_dir.name))
        role = str(node_config.get("role", ROLE_TRAIN))
        if role not in (ROLE_TRAIN, ROLE_HOLDOUT):
            raise NeurofedError(
                f"node config 'role' must be {ROLE_TRAIN!r} or {ROLE_HOLDOUT!r}, got {role!r}"
            )
        cache = node_config.get("cache-dir")
        state = node_config.get("state-dir") or Path.home() / ".neurofed" / "site-state" / site_id
        ledger = node_config.get("ledger")
        return SiteSetup(
            site_id,
            role,
            data_dir,
            Path(str(cache)) if cache else None,
            Path(str(state)),
            False,
            ledger_path=Path(str(ledger)).expanduser() if ledger else None,
            budget=_node_budget(node_config),
            require_dp=_node_flag(node_config, "require-dp", default=True),
        )
    if "partition-id" in node_config:
        if not recipe.data_root:
            raise NeurofedError(
                "simulated site has no data: set the run setting 'data-root' to a folder of site folders "
                "(e.g. written by `neurofed synth`)"
            )
        root = Path(recipe.data_root)
        folders = (
            sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if root.is_dir()
            else []
        )
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if partition >= len(folders):
            raise NeurofedError(
                f"data-root {root} holds {len(folders)} site folder(s) but the simulation has {partitions} "
                "sites; synthesize more sites or simulate fewer"
            )
        data_dir = folders[partition]
        role = ROLE_HOLDOUT if partition >= partitions - recipe.unseen_sites else ROLE_TRAIN
        run_dir = Path(recipe.run_dir)
        return SiteSetup(
            data_dir.name,
            role,
            data_dir,
            run_dir / "cache",
            run_dir / "sites" / data_dir.name,
            True,
            budget=_node_budget(node_config),
        )
    raise NeurofedError(
        "this site does not know its data: start the SuperNode with "
        "--node-config \"data-dir='/path/to/site/data' site-id='my-hospital'\""
    )


# --- the site's data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteData:
    """The site's preprocessed subjects, split; arrays as ``(image (C,X,Y,Z) float32, label (X,Y,Z) uint8)``."""

    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray]]
    plan: PreprocessingPlan
    spacing_mm: tuple[float, float, float]


_LOADED: OrderedDict[tuple, SiteData] = OrderedDict()
_MAX_LOADED = 4
"""Sites whose arrays one worker process keeps in memory (a simulation worker serves several sites)."""


def preprocessing_plan(recipe: Recipe) -> PreprocessingPlan:
    """The federation's preprocessing plan, from the run settings every site gets."""
    from client.preprocessing import PreprocessingPlan

    spacing = (recipe.spacing_mm,) * 3
    if recipe.field_of_view_mm:
        fov = tuple(float(v) for v in recipe.field_of_view_mm.replace("x", ",").split(","))
        return PreprocessingPlan(
            input_contrasts=(recipe.contrast,), target_spacing_mm=spacing, field_of_view_mm=fov
        )
    return PreprocessingPlan(input_contrasts=(recipe.contrast,), target_spacing_mm=spacing)


def load_site_data(setup: SiteSetup, recipe: Recipe) -> SiteData:
    """Preprocess (or read from the cache) the site's labelled subjects and split them."""
    from client.preprocessed_cache import PreprocessedCache, default_cache_dir
    from client.site_data import prepare_site
    from models.label_protocols import get_protocol

    plan = preprocessing_plan(recipe)
    role_fraction = 1.0 if setup.role == ROLE_HOLDOUT else recipe.test_fraction
    key = (str(setup.data_dir), plan.fingerprint(), recipe.protocol, role_fraction, recipe.seed)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    cache = PreprocessedCache(setup.cache_dir or default_cache_dir())
    prepared = prepare_site(
        setup.data_dir, plan, get_protocol(recipe.protocol), cache=cache, require_label=True, progress=False
    )
    by_id = {s.subject_id: s for s in prepared.subjects if s.label is not None}
    if not by_id:
        raise NeurofedError(
            f"site {setup.site_id}: no usable labelled subject in {setup.data_dir}; run "
            f"`neurofed-site check {setup.data_dir}` to see why"
        )
    split = split_subjects(by_id, role_fraction, recipe.seed)
    data = SiteData(
        train=[(by_id[i].image, by_id[i].label) for i in split.train],
        test=[(by_id[i].image, by_id[i].label) for i in split.test],
        plan=plan,
        spacing_mm=tuple(plan.target_spacing_mm),
    )
    _LOADED[key] = data
    while len(_LOADED) > _MAX_LOADED:
        _LOADED.popitem(last=False)
    return data


# --- the model ---------------------------------------------------------------------------------------


def build_model(recipe: Recipe) -> torch.nn.Module:
    from models.label_protocols import get_protocol
    from models.networks import NetworkConfig, build_network

    protocol = get_protocol(recipe.protocol)
    config = NetworkConfig.preset(
        recipe.network_preset,
        in_channels=1,
        out_channels=protocol.num_classes,
        architecture=recipe.architecture,
    )
    return build_network(config, seed=recipe.seed)


def normalization_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the normalization layers (InstanceNorm, BatchNorm, GroupNorm, LayerNorm)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict(keep_vars=True))
    return keys


def _personal_path(setup: SiteSetup, server_round: int) -> Path:
    return setup.state_dir / f"personal-layers-round-{server_round:03d}.pt"


def _latest_personal(setup: SiteSetup, up_to_round: int) -> dict[str, torch.Tensor] | None:
    # Keyed by round, so a resumed run reads the layers of the round it continues from, not later ones.
    for r in range(up_to_round, 0, -1):
        path = _personal_path(setup, r)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    return None


def _save_personal(setup: SiteSetup, server_round: int, layers: Mapping[str, torch.Tensor]) -> None:
    setup.state_dir.mkdir(parents=True, exist_ok=True)
    path = _personal_path(setup, server_round)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({k: v.detach().cpu().clone() for k, v in layers.items()}, tmp)
    os.replace(tmp, path)


def _site_rng(recipe: Recipe, site_id: str) -> np.random.Generator:
    # Training depends only on (seed, round, site), so a resumed round repeats the interrupted one.
    return np.random.default_rng([recipe.seed, recipe.server_round, zlib.crc32(site_id.encode())])


def _context(msg: Message, context: Context) -> tuple[Recipe, SiteSetup]:
    recipe = Recipe.from_config(msg.content["config"])
    setup = site_setup(context.node_config, recipe)
    if setup.simulated:
        # Several simulated sites share the machine's cores: one thread each.
        torch.set_num_threads(1)
    return recipe, setup


def evaluation_metrics(
    model: torch.nn.Module, data: SiteData, recipe: Recipe, prefix: str = ""
) -> dict[str, float]:
    """Mean over the test subjects of Dice, HD95 (mm) and ASSD (mm) per class, and of Dice over classes."""
    from models.label_protocols import get_protocol
    from models.metrics import summarize
    from models.training import evaluate_subjects

    protocol = get_protocol(recipe.protocol)
    per_subject = evaluate_subjects(
        model, data.test, protocol.class_names, (recipe.patch_size,) * 3, spacing_mm=data.spacing_mm
    )
    summary = summarize(per_subject)
    out: dict[str, float] = {}
    for name in protocol.class_names[1:]:
        for metric, short in (("dice", "dice"), ("hd95_mm", "hd95"), ("assd_mm", "assd")):
            out[f"{prefix}{short}-{name}"] = float(summary[name][metric]["mean"])
    out[f"{prefix}dice-mean"] = float(np.mean([out[f"{prefix}dice-{n}"] for n in protocol.class_names[1:]]))
    return out


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe the site; preparing its data here makes the first round's timing honest."""
    recipe, setup = _context(msg, context)
    data = load_site_data(setup, recipe)
    site = ConfigRecord(
        {
            "site-id": setup.site_id,
            "role": setup.role,
            "plan": json.dumps(data.plan.to_dict(), sort_keys=True),
        }
    )
    counts = MetricRecord({"num-train": len(data.train), "num-test": len(data.test)})
    return Message(content=RecordDict({"site": site, "metrics": counts}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally for ``local-steps`` steps; reply with its arrays and the loss."""
    from models.label_protocols import get_protocol
    from models.training import TrainingConfig, train_steps

    recipe, setup = _context(msg, context)
    if setup.role != ROLE_TRAIN:
        raise NeurofedError(f"site {setup.site_id} has role {setup.role!r} and never trains")
    if setup.require_dp and not recipe.dp:
        return _refusal_reply(
            msg,
            Refusal(
                f"site {setup.site_id} trains only with differential privacy and this run has dp=false; "
                "run with dp=true, or the site operator starts the site with --allow-no-dp",
                setup.ledger.run_epsilon(recipe.run_id) if setup.ledger.path.is_file() else 0.0,
                recipe.dp_delta,
            ),
        )
    data = load_site_data(setup, recipe)
    if not data.train:
        raise NeurofedError(f"site {setup.site_id}: no training subjects after holding out the test split")
    model = build_model(recipe)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    personal_keys = normalization_keys(model) if recipe.personal_layers == "norm" else set()
    if personal_keys:
        own = _latest_personal(setup, recipe.server_round - 1)
        if own is not None:
            model.load_state_dict(own, strict=False)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = TrainingConfig.for_protocol(
        get_protocol(recipe.protocol),
        patch_size=(recipe.patch_size,) * 3,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        seed=recipe.seed,
    )
    proximal_to = global_weights if recipe.proximal_mu > 0 else None
    privacy: dict[str, float] = {}
    if recipe.dp:
        outcome = train_private_round(model, data.train, config, recipe, setup, proximal_to)
        if isinstance(outcome, Refusal):
            return _refusal_reply(msg, outcome)
        result, privacy = outcome
    else:
        result = train_steps(
            model,
            data.train,
            config,
            recipe.local_steps,
            rng=_site_rng(recipe, setup.site_id),
            proximal_to=proximal_to,
            proximal_mu=recipe.proximal_mu,
        )
    state = model.state_dict()
    if personal_keys:
        _save_personal(setup, recipe.server_round, {k: state[k] for k in personal_keys})
    shared = {k: v.detach().cpu() for k, v in state.items() if k not in personal_keys}
    metrics = MetricRecord(
        {
            "num-examples": len(data.train),
            "train-loss": float(result.mean_loss),
            "steps": int(result.steps),
            "seconds": float(result.seconds),
            **privacy,
        }
    )
    return Message(content=RecordDict({"arrays": ArrayRecord(shared), "metrics": metrics}), reply_to=msg)


# --- differential privacy ----------------------------------------------------------------------------

REFUSED_KEY = "refused"
"""Metric of a training reply (1) in which the site declines the round; the reason is in ConfigRecord
``refusal`` under ``reason``. Such a reply carries no arrays."""


@dataclass(frozen=True)
class Refusal:
    """The site declines to train a round: the round would exceed its lifetime privacy budget, or the run
    asks for training without DP at a site that requires it."""

    reason: str
    epsilon: float
    delta: float


def _refusal_reply(msg: Message, refusal: Refusal) -> Message:
    metrics = MetricRecord(
        {REFUSED_KEY: 1, "num-examples": 0, "epsilon": refusal.epsilon, "delta": refusal.delta}
    )
    reason = ConfigRecord({"reason": refusal.reason})
    return Message(content=RecordDict({"metrics": metrics, "refusal": reason}), reply_to=msg)


def prepare_ledger(setup: SiteSetup) -> PrivacyLedger:
    """The site's ledger, its folder created and its lifetime budget set from the node config.

    A budget in the node config (``budget-epsilon``, ``budget-delta``) replaces the ledger's; a simulated
    site whose ledger has none gets `SIMULATED_BUDGET`. A deployed site without either is refused every
    DP round, with a reason that says how to set one.
    """
    ledger = setup.ledger
    ledger.path.parent.mkdir(parents=True, exist_ok=True)
    current = ledger.budget()
    wanted = setup.budget or (SIMULATED_BUDGET if setup.simulated and current is None else None)
    if wanted is not None and (current is None or (current.epsilon, current.delta) != wanted):
        ledger.set_budget(*wanted)
    return ledger


class SubjectPatches(torch.utils.data.Dataset):
    """Patches arranged as ``privacy.dp_sgd.PrivacyUnitDataset`` requires: item ``u + n * k`` is the
    ``k``-th patch of subject ``u`` (of ``n``), each ``(image (C, *patch) float32, label (1, *patch) int64)``.

    One `models.training.PatchDataset` per subject, so a unit never draws another subject's patch.
    """

    def __init__(self, subjects: list, config: Any, patches_per_subject: int, seed: int) -> None:
        from models.training import PatchDataset

        seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=len(subjects))
        self.per_subject = [
            PatchDataset.from_config([subject], config, length=patches_per_subject, seed=int(s))
            for subject, s in zip(subjects, seeds, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.per_subject) * len(self.per_subject[0])

    def __getitem__(self, index: int) -> Any:
        draw, unit = divmod(index, len(self.per_subject))
        return self.per_subject[unit][draw]


def train_private_round(
    model: torch.nn.Module,
    subjects: list,
    config: Any,
    recipe: Recipe,
    setup: SiteSetup,
    proximal_to: Mapping[str, torch.Tensor] | None,
) -> tuple[Any, dict[str, float]] | Refusal:
    """Train one round with subject-level DP-SGD, checked against and recorded in the site's ledger.

    The privacy unit is the subject: each step includes each training subject with probability
    ``batch_size / len(subjects)`` (one fresh patch of it). The accountant continues from the run's
    releases in the ledger, so ε is cumulative for the run; the noise multiplier comes from
    ``dp-noise-multiplier`` or from ``dp-target-epsilon`` for the planned rounds x local steps.

    Returns:
        ``(TrainResult, {"epsilon", "delta", "noise-multiplier", "sample-rate"})`` with the run's ε after
        this round, or a `Refusal` when the ledger does not allow the round (nothing is trained or recorded).
    """
    import time
    from functools import partial

    from models.training import TrainResult, make_loss, make_optimizer, training_step
    from privacy.dp_sgd import PrivacyUnitDataset, make_private_training
    from privacy.errors import PrivacyBudgetExceeded, PrivacyError

    if not recipe.run_id:
        raise NeurofedError("the server's message lacks 'run-id', which DP needs; update the coordinator")
    dp = recipe.dp_config()
    ledger = prepare_ledger(setup)
    n_subjects = len(subjects)
    # Poisson sampling over subjects: a batch larger than the site's subjects is not possible.
    batch_size = min(recipe.batch_size, n_subjects)
    sample_rate = batch_size / n_subjects
    planned_steps = recipe.num_rounds * recipe.local_steps
    try:
        noise = dp.resolve_noise_multiplier(sample_rate, planned_steps)
        decision = ledger.check_round(recipe.run_id, recipe.local_steps, sample_rate, noise, dp.delta)
    except PrivacyError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    spent = ledger.run_epsilon(recipe.run_id)
    if not decision.allowed:
        return Refusal(decision.reason, spent, dp.delta)

    seed = int(_site_rng(recipe, setup.site_id).integers(0, 2**63 - 1))
    units = PrivacyUnitDataset(SubjectPatches(subjects, config, max(recipe.local_steps, 1), seed), n_subjects)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, config)
    started = time.perf_counter()
    model.train()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            make_private_training(
                model,
                optimizer,
                units,
                batch_size,
                dp,
                loss_fn=make_loss(),
                planned_steps=planned_steps,
                accountant_state=ledger.accountant_state(recipe.run_id),
                generator=generator,
            ) as private,
        ):
            torch.manual_seed(seed)  # dropout
            with ledger.reserved_round(
                recipe.run_id,
                recipe.server_round,
                steps=recipe.local_steps,
                sample_rate=private.sample_rate,
                noise_multiplier=private.noise_multiplier,
                delta=dp.delta,
            ):
                losses = private.run_steps(
                    recipe.local_steps,
                    step_fn=partial(training_step, proximal_to=proximal_to, proximal_mu=recipe.proximal_mu),
                )
    except PrivacyBudgetExceeded as exc:
        # Another run spent the budget between the check and the reservation.
        return Refusal(exc.reason, ledger.run_epsilon(recipe.run_id), dp.delta)
    except PrivacyError as exc:
        raise NeurofedError(f"site {setup.site_id}: {exc}") from exc
    result = TrainResult(
        steps=len(losses),
        n_samples_seen=len(losses) * batch_size,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
    privacy = {
        "epsilon": ledger.run_epsilon(recipe.run_id),
        "delta": dp.delta,
        "noise-multiplier": private.noise_multiplier,
        "sample-rate": private.sample_rate,
    }
    return result, privacy


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model (and the personalised one, if asked) on the site's test split."""
    recipe, setup = _context(msg, context)
    data = load_site_data(setup, recipe)
    model = build_model(recipe)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    metrics: dict[str, float | int] = {"num-examples": len(data.test)}
    metrics.update(evaluation_metrics(model, data, recipe))
    if recipe.evaluate_personal:
        own = _latest_personal(setup, recipe.server_round) if setup.role == ROLE_TRAIN else None
        if own is None:
            # A site that never trained has no layers of its own: its personalised model is the global one.
            metrics.update({PERSONAL_PREFIX + k: v for k, v in list(metrics.items()) if k != "num-examples"})
        else:
            model.load_state_dict(own, strict=False)
            metrics.update(evaluation_metrics(model, data, recipe, prefix=PERSONAL_PREFIX))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
