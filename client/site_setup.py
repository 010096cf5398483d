"""Who and where this site is: its id, role, data, cache, state folder, ledger and privacy stance.

Deployed, the site's operator sets them in the SuperNode's node config (``flower-supernode --node-config
"data-dir='/data/mri' site-id='hospital-a' role='train'"``):

- ``data-dir``: the site's data folder (BIDS or flat, see README); ``site-id`` (default: the folder's
  name); ``role`` (``train``, default, or ``holdout``: evaluates only, never trains);
  ``cache-dir`` (preprocessed cache); ``state-dir`` (what the site keeps between rounds, e.g. its
  personalised normalization layers); ``ledger`` (the privacy ledger, default
  ``<state-dir>/privacy-ledger.jsonl``); ``budget-epsilon`` / ``budget-delta`` (the lifetime privacy
  budget written into the ledger; without one, and without one set by `neurofed-site budget`, every DP
  round is declined); ``require-dp`` (default true: refuse every round without DP); the site's split,
  evaluation and resource rules (``test-fraction``, ``min-test-subjects``, ``max-evaluations``, the
  ``max-*`` caps: client/site_policy.py); ``contract-version`` (of the installed neurofed,
  contract/version.py).
- In Flower's simulation the node config only holds ``partition-id`` / ``num-partitions``: partition
  i is then the i-th site folder (`contract.run_layout.site_folders`) under the run's ``data-root``, the
  last ``unseen-sites`` partitions are holdout sites, and cache, state and ledger go under the run's
  ``run-dir``; a simulated ledger without a budget gets `SIMULATED_BUDGET`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.site_policy import SitePolicy, deployed_policy, simulated_policy
from contract.run_config import RunConfig
from contract.run_layout import SITE_CACHE_DIR, SITE_STATE_DIR, site_folders
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY
from contract.wire import ROLE_HOLDOUT, ROLE_TRAIN, ROLES
from models.errors import NeurofedError

if TYPE_CHECKING:
    from privacy.privacy_ledger import PrivacyLedger

LEDGER_FILE = "privacy-ledger.jsonl"
SIMULATED_BUDGET = (100.0, 1e-3)
"""Lifetime (ε, δ) budget a simulated site's ledger gets when it has none: generous, so that only a run
far beyond any sane privacy level is refused (a simulated site's ledger lives in the run directory and
records that run only). Real sites set theirs with `neurofed-site budget` or the node config."""


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
    policy: SitePolicy = SitePolicy()
    """The site's own split, evaluation and resource rules (client/site_policy.py)."""
    contract_version: int | None = CONTRACT_VERSION
    """The contract version of the site's installed neurofed (node config ``contract-version``, written by
    `neurofed-site start`; None when a deployed site's daemon wrote none: one older than the versions)."""

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger (node config ``ledger``, default ``<state-dir>/privacy-ledger.jsonl``)."""
        from privacy.privacy_ledger import PrivacyLedger

        return PrivacyLedger(self.ledger_path or self.state_dir / LEDGER_FILE)


def node_budget(node_config: Mapping[str, Any]) -> tuple[float, float] | None:
    """The lifetime (ε, δ) budget in the node config, or None."""
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


def node_flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    """A true/false node-config value (Flower's node config may give a bool or a string)."""
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise NeurofedError(f"node config {key!r} must be true or false, got {value!r}")


def site_setup(node_config: Mapping[str, Any], run: RunConfig) -> SiteSetup:
    """Resolve the site from its node config (deployment) or its partition id (simulation)."""
    if "data-dir" in node_config:
        return _deployed_setup(node_config)
    if "partition-id" in node_config:
        return _simulated_setup(node_config, run)
    raise NeurofedError(
        "this site does not know its data: start the SuperNode with "
        "--node-config \"data-dir='/path/to/site/data' site-id='my-hospital'\""
    )


def _deployed_setup(node_config: Mapping[str, Any]) -> SiteSetup:
    data_dir = Path(str(node_config["data-dir"])).expanduser()
    site_id = str(node_config.get("site-id", data_dir.name))
    role = str(node_config.get("role", ROLE_TRAIN))
    if role not in ROLES:
        raise NeurofedError(f"node config 'role' must be {ROLE_TRAIN!r} or {ROLE_HOLDOUT!r}, got {role!r}")
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
        budget=node_budget(node_config),
        require_dp=node_flag(node_config, "require-dp", default=True),
        policy=deployed_policy(node_config),
        contract_version=_node_contract_version(node_config),
    )


def _node_contract_version(node_config: Mapping[str, Any]) -> int | None:
    value = node_config.get(CONTRACT_VERSION_KEY)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        raise NeurofedError(f"node config {CONTRACT_VERSION_KEY!r} must be a whole number, got {value!r}") from None


def _simulated_setup(node_config: Mapping[str, Any], run: RunConfig) -> SiteSetup:
    if not run.data_root:
        raise NeurofedError(
            "simulated site has no data: set the run setting 'data-root' to a folder of site folders "
            "(e.g. written by `neurofed synth`)"
        )
    root = Path(run.data_root)
    folders = site_folders(root) if root.is_dir() else []
    partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if partition >= len(folders):
        raise NeurofedError(
            f"data-root {root} holds {len(folders)} site folder(s) but the simulation has {partitions} "
            "sites; synthesize more sites or simulate fewer"
        )
    data_dir = folders[partition]
    role = ROLE_HOLDOUT if partition >= partitions - run.unseen_sites else ROLE_TRAIN
    run_dir = Path(run.run_dir)
    return SiteSetup(
        data_dir.name,
        role,
        data_dir,
        run_dir / SITE_CACHE_DIR,
        run_dir / SITE_STATE_DIR / data_dir.name,
        True,
        budget=node_budget(node_config),
        policy=simulated_policy(run),
    )
