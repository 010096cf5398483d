"""What one message asks of a site: the run's settings and the message's own keys, parsed once.

The coordinator builds a site message's ConfigRecord with `site_task_record`; the site parses it with
`SiteTask.from_record`. Both use `contract.run_config.RunConfig`, so a setting is declared, defaulted and
validated in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.run_config import RunConfig, site_settings
from contract.version import CONTRACT_VERSION, CONTRACT_VERSION_KEY, contract_mismatch
from contract.wire import (
    EVALUATE_PERSONAL_KEY,
    PERSONAL_LAYERS_KEY,
    RUN_ID_KEY,
    SERVER_ROUND_KEY,
)
from models.errors import NeurofedError

PROXIMAL_MU_KEY = "proximal-mu"


@dataclass(frozen=True)
class SiteTask:
    """One message's instructions to a site.

    Attributes:
        run: the run's settings as the coordinator sent them (server-only settings at their defaults;
            a site never reads those).
        server_round: the round this message belongs to (1-based).
        run_id: names the run in the site's privacy ledger (empty: not sent).
        proximal_mu: FedProx's proximal weight; 0 unless the strategy sent one.
        personal_layers: ``norm`` (FedBN: the site keeps its normalization layers) or ``none``.
        evaluate_personal: also score the site's personalised model (FedBN evaluation).
    """

    run: RunConfig
    server_round: int
    run_id: str = ""
    proximal_mu: float = 0.0
    personal_layers: str = "none"
    evaluate_personal: bool = False

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteTask:
        """Parse a message's ConfigRecord; a missing run setting means a different neurofed version."""
        missing = sorted(site_settings() - set(record))
        if SERVER_ROUND_KEY not in record:
            missing.append(SERVER_ROUND_KEY)
        if CONTRACT_VERSION_KEY in record:
            theirs = int(record[CONTRACT_VERSION_KEY])
            if (mismatch := contract_mismatch(theirs, CONTRACT_VERSION, "this site")) is not None:
                raise NeurofedError(mismatch)
        else:
            missing.append(CONTRACT_VERSION_KEY)
        if missing:
            raise NeurofedError(
                f"the server's message lacks settings {missing}: server and site run different neurofed "
                "versions; update both"
            )
        run = RunConfig.from_flower({k: v for k, v in record.items() if k in site_settings()})
        return cls(
            run=run,
            server_round=int(record[SERVER_ROUND_KEY]),
            run_id=str(record.get(RUN_ID_KEY, "")),
            proximal_mu=float(record.get(PROXIMAL_MU_KEY, 0.0)),
            personal_layers=str(record.get(PERSONAL_LAYERS_KEY, "none")),
            evaluate_personal=bool(record.get(EVALUATE_PERSONAL_KEY, False)),
        )


def site_task_record(config: RunConfig, server_round: int, run_id: str = "") -> dict[str, Any]:
    """The flat ConfigRecord values a site message carries: the run settings a site needs, the round
    number, the contract version and the run's id (strategies add their own keys, e.g. FedProx's ``proximal-mu``)."""
    record: dict[str, Any] = {k: v for k, v in config.to_flower().items() if k in site_settings()}
    record[SERVER_ROUND_KEY] = server_round
    record[CONTRACT_VERSION_KEY] = CONTRACT_VERSION
    if run_id:
        record[RUN_ID_KEY] = run_id
    return record
