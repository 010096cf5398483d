"""The coordinator's Flower ServerApp: runs the federated rounds and writes the run directory.

``app`` is what ``flwr run .`` loads (``[tool.flwr.app.components] serverapp = "server.app:app"``); it
reads every setting from Flower's run config. ``make_server_app`` builds the same app with settings
given in code (``neurofed simulate`` passes its options this way, since Flower's in-process simulation
hands the app an empty run config) and with hooks for a live view and for tests.

One run:

1. Send every site a ``query`` message: each answers its site id, its role (``train`` or ``holdout``,
   a site that never trains) and its number of training / test subjects. Sites prepare (and cache)
   their data on this first message.
2. Each round: training sites get the global arrays and train locally; the strategy aggregates their
   replies (in site-id order, so a run is reproducible to the bit); every ``eval-every`` rounds and
   after the last one every site, holdout sites included, evaluates the global model on its test split.
   Each site's reply is logged with its site id to ``metrics.jsonl``; the global model and strategy
   state are checkpointed.
3. A resumed run (``resume = true``) continues after the last complete checkpoint of ``run-dir`` with
   the settings stored there, so it ends with the weights an uninterrupted run would have.

A site that fails or does not answer within ``round-timeout-s`` is dropped from that round (a ``dropped``
event with the site, round and reason) as long as ``min-sites`` training sites replied; otherwise the run
stops with an error that names the sites. Site discovery needs every site.

Deployed (the coordinator's SuperLink sets ``NEUROFED_COORDINATOR_STATE_DIR``, server/coordinator_state.py),
a relative ``run-dir`` lies in the coordinator's state directory, every run, site, round, contribution,
refusal, dropout and reported ε goes to its audit log (server/audit_log.py), and the run's report is
written when it finishes.

Messages to and from sites carry only the model arrays, run settings (ConfigRecord) and aggregate
metrics (MetricRecord of scalars); see client/app.py for what the sites send.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from models.errors import NeurofedError
from server.audit_log import AuditLog
from server.coordinator_state import CoordinatorState
from server.run_config import RunConfig
from server.run_directory import RunDirectory
from server.site_registry import SiteRegistry
from server.strategies import (
    check_float_arrays,
    check_updates,
    make_strategy,
    restore_strategy_state,
    state_dict_to_arrays,
    strategy_state,
)

if TYPE_CHECKING:
    from models.networks import NetworkConfig

RESUME_KEY = "resume"
"""Flower run-config key (bool): continue the run in ``run-dir`` instead of starting a new one."""
RESUME_ROUNDS_KEY = "resume-rounds"
"""Flower run-config key (int): with ``resume``, extend the run to this many rounds (0: as it was started).
Flower hands the app pyproject's ``num-server-rounds`` whether or not it was asked for, so that key cannot
say whether a resumed run should grow."""

EventHook = Callable[[dict[str, Any]], None]
"""Called with every event written to metrics.jsonl (and ``round-start`` events), e.g. for a live view."""
MessageHook = Callable[[str, Message], None]
"""Called as ``hook("to-site" | "from-site", message)`` for every message the server sends or receives."""

ROLE_TRAIN = "train"
ROLE_HOLDOUT = "holdout"
PERSONAL_PREFIX = "personal-"
"""Evaluation metrics of a site's personalised model (FedBN) carry this prefix in its reply."""
WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class Site:
    """A site as the server knows it: its node, its self-declared id and role, its subject counts."""

    node_id: int
    site_id: str
    role: str
    num_train: int
    num_test: int


def _short_reason(reason: str) -> str:
    # The simulation engine wraps a site's exception in layers of Ray tracebacks; its message is last.
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    reason = reason.strip().rstrip(">'").strip()
    return reason if len(reason) <= 600 else reason[:600] + " ..."


class _NodeView:
    """The part of a Grid a strategy's ``configure_*`` uses, limited to some nodes."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


SERVER_ONLY_SETTINGS = frozenset(
    {
        "proximal-mu",
        "server-learning-rate",
        "round-timeout-s",
        "server-dp",
        "server-dp-noise-multiplier",
        "server-dp-clipping-norm",
        "update-norm-limit",
    }
)
"""Run settings sites do not get: strategies add what a site needs (FedProx adds ``proximal-mu``)."""

REFUSED_KEY = "refused"
"""Training-reply metric (1) of a site that declines a round (its privacy budget); see client/app.py."""


def site_config(config: RunConfig, server_round: int, run_id: str = "") -> ConfigRecord:
    """The ConfigRecord a site gets: the run settings it needs, the round number and the run's id.

    ``run-id`` names the run in each site's privacy ledger; it stays the same when the run is resumed.
    """
    # Every message carries the recipe, so sites train and evaluate exactly as the server was
    # configured, also in a deployment where sites have no access to the run config file.
    record = ConfigRecord({k: v for k, v in config.to_flower().items() if k not in SERVER_ONLY_SETTINGS})
    record["server-round"] = server_round
    if run_id:
        record["run-id"] = run_id
    return record


def server_dp_epsilon(config: RunConfig, releases: int) -> float:
    """Site-level ε (at ``dp-delta``) of ``releases`` noised aggregates of the server-side DP wrapper.

    Every training site takes part in every round (sample rate 1), and Flower's wrapper adds noise of std
    ``noise_multiplier x clipping_norm`` to the sum of clipped updates: the Gaussian mechanism, composed
    by the RDP accountant of privacy/accounting.py. Infinite without noise. Adaptive clipping splits the
    same privacy between the update and the clipped-count release (Andrew et al., 2021), so it has the
    same ε.
    """
    from privacy.accounting import epsilon_for

    if config.server_dp_noise_multiplier == 0:
        return float("inf")
    return epsilon_for(releases, 1.0, config.server_dp_noise_multiplier, config.dp_delta)


def initial_state_dict(config: RunConfig) -> dict[str, Any]:
    """The global model before round 1: the configured network, initialised from the run seed."""
    from models.networks import build_network

    return build_network(network_config(config), seed=config.seed).state_dict()


def network_config(config: RunConfig) -> NetworkConfig:
    """The NetworkConfig the run trains: the preset, one input channel per contrast, one output per class."""
    from models.label_protocols import get_protocol
    from models.networks import NetworkConfig

    protocol = get_protocol(config.protocol)
    return NetworkConfig.preset(
        config.network_preset,
        in_channels=1,
        out_channels=protocol.num_classes,
        architecture=config.architecture,
    )


def write_model_file(
    path: Path, state_dict: Mapping[str, Any], config: RunConfig, plan: Mapping[str, Any]
) -> None:
    """Write a self-describing model file (models/model_file.py) of a global model of this run."""
    from models.label_protocols import get_protocol
    from models.model_file import save_model

    training = {
        "kind": "federated",
        "strategy": config.strategy,
        "rounds": config.num_rounds,
        "local_steps": config.local_steps,
        "seed": config.seed,
        "dp": config.dp,
        "run_dir": str(config.run_dir),
    }
    save_model(
        path,
        dict(state_dict),
        network=network_config(config),
        protocol=get_protocol(config.protocol),
        plan=dict(plan),
        training=training,
    )


def read_model_state(path: Path) -> dict[str, Any]:
    """The state dict in a model file written by `write_model_file`."""
    from models.model_file import load_model

    return load_model(path).model.state_dict()


class FederatedRun:
    """One federated run over a Flower Grid, writing into its run directory."""

    def __init__(
        self,
        config: RunConfig,
        grid: Grid,
        *,
        resume: bool = False,
        on_event: EventHook | None = None,
        on_message: MessageHook | None = None,
        audit: AuditLog | None = None,
        enrolled_names: Mapping[int, str] | None = None,
        flower_run_id: int | None = None,
    ) -> None:
        self.run_dir = RunDirectory(config.run_dir)
        if resume:
            stored = self.run_dir.read_config()
            # The stored settings win: a resumed run must repeat the interrupted one exactly. Only the
            # number of rounds may grow, to extend a finished run.
            config = stored.replace(
                run_dir=config.run_dir, num_rounds=max(stored.num_rounds, config.num_rounds)
            )
        self.config = config
        self.grid = grid
        self.resume = resume
        self.on_event = on_event
        self.on_message = on_message
        self.sites: list[Site] = []
        self.plan: dict[str, Any] = {}
        self.run_id = ""
        self.audit = audit
        self.enrolled_names = dict(enrolled_names or {})
        self.flower_run_id = flower_run_id

    # -- messaging ----------------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any], *, log_it: bool = True) -> None:
        # Wall-clock time of each event, so round times and overhead can be read from the log alone.
        event = {**event, "time": round(time.time(), 3)}
        if log_it:
            self.run_dir.append_event(event)
        if self.on_event is not None:
            self.on_event(event)

    def audit_event(self, event: str, **fields: Any) -> None:
        """Write one event to the coordinator's audit log (deployments only), tagged with the run."""
        if self.audit is not None:
            self.audit.record(event, run_id=self.run_id or None, flower_run_id=self.flower_run_id, **fields)

    def _site_name(self, node_id: int) -> str:
        site = next((s for s in self.sites if s.node_id == node_id), None)
        if site is not None:
            return site.site_id
        return self.enrolled_names.get(node_id, f"node {node_id}")

    def _send(
        self, messages: Iterable[Message], what: str, server_round: int, required: int | None = None
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Send, wait up to ``round-timeout-s``; returns the good replies (in site-id order) and dropouts.

        A site whose reply is an error or missing is dropped from this step (a ``dropped`` event each) when
        at least ``required`` sites (default: all) replied; otherwise NeurofedError names them all.
        """
        messages = list(messages)
        required = len(messages) if required is None else required
        if self.on_message is not None:
            for m in messages:
                self.on_message("to-site", m)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout_s))
        if self.on_message is not None:
            for r in replies:
                self.on_message("from-site", r)
        # The SuperLink answers for a node it lost (no heartbeat) with an error reply of its own: match
        # replies to what was sent, not to their sender.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}

        def node_of(reply: Message) -> int:
            return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

        answered = {node_of(r) for r in replies}
        dropped = [
            {"node_id": node_of(r), "reason": _short_reason(r.error.reason)} for r in replies if r.has_error()
        ] + [
            {
                "node_id": m.metadata.dst_node_id,
                "reason": f"no answer within round-timeout-s = {self.config.round_timeout_s:.0f} s",
            }
            for m in messages
            if m.metadata.dst_node_id not in answered
        ]
        for d in dropped:
            d["site"] = self._site_name(d["node_id"])
        good = [r for r in replies if not r.has_error()]
        if len(good) < required:
            reasons = "; ".join(f"{d['site']}: {d['reason']}" for d in dropped)
            then = (
                f"continue with --resume {self.config.run_dir}"
                if self.run_dir.config_path.is_file()
                else "start the run again"
            )
            raise NeurofedError(
                f"round {server_round} {what}: {len(good)} of {len(messages)} site(s) replied, {required} "
                f"needed ({reasons}); fix the site(s) and {then}"
            )
        by_node = {s.node_id: s for s in self.sites}
        for d in dropped:
            site = by_node.get(d["node_id"])
            self._emit(
                {
                    "event": "dropped",
                    "round": server_round,
                    "stage": what,
                    "site": d["site"],
                    "role": site.role if site else None,
                    "reason": d["reason"],
                }
            )
        # Aggregation sums in reply order; a fixed order (by site id) makes runs reproducible to the bit.
        order = {s.node_id: s.site_id for s in self.sites}
        good.sort(key=lambda r: order.get(r.metadata.src_node_id, str(r.metadata.src_node_id)))
        return good, [{"site": d["site"], "reason": d["reason"]} for d in dropped]

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.config.round_timeout_s
        while len(node_ids := list(self.grid.get_node_ids())) < self.config.num_sites:
            if time.monotonic() > deadline:
                raise NeurofedError(
                    f"only {len(node_ids)} of {self.config.num_sites} sites connected within "
                    f"{self.config.round_timeout_s:.0f} s; start the missing sites or lower num-sites"
                )
            time.sleep(0.5)
        return node_ids

    def discover_sites(self) -> list[Site]:
        """Ask every node for its site id, role and subject counts (one ``query`` message each)."""
        self._emit({"event": "round-start", "round": 0, "stage": "preparing sites"}, log_it=False)
        node_ids = self._wait_for_nodes()
        content = RecordDict({"config": site_config(self.config, 0)})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        replies, _ = self._send(messages, "site discovery", 0)
        sites = []
        for r in replies:
            info, counts = r.content["site"], r.content["metrics"]
            sites.append(
                Site(
                    node_id=r.metadata.src_node_id,
                    site_id=str(info["site-id"]),
                    role=str(info["role"]),
                    num_train=int(counts["num-train"]),
                    num_test=int(counts["num-test"]),
                )
            )
        sites.sort(key=lambda s: s.site_id)
        ids = [s.site_id for s in sites]
        if len(set(ids)) != len(ids):
            raise NeurofedError(f"two sites declare the same site id: {ids}; give each site its own site-id")
        if not any(s.role == ROLE_TRAIN for s in sites):
            raise NeurofedError(
                f"no site has role {ROLE_TRAIN!r} (sites: {ids}); at least one site must train"
            )
        plans = {str(r.content["site"]["plan"]) for r in replies}
        if len(plans) != 1:
            raise NeurofedError(
                f"sites prepare their data with different preprocessing plans ({sorted(plans)}); every site "
                "must run the same neurofed version with the run's settings"
            )
        trainers = sum(s.role == ROLE_TRAIN for s in sites)
        if self.config.min_sites > trainers:
            raise NeurofedError(
                f"run setting 'min-sites' is {self.config.min_sites} but only {trainers} training site(s) "
                f"joined ({ids}); lower min-sites or start more sites"
            )
        self.sites = sites
        self.plan = json.loads(plans.pop())
        return sites

    # -- the run ------------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        """Run (or resume) all rounds; returns the final global state dict."""
        config = self.config
        start_round = 1
        state_dict = None
        saved_state: dict[str, Any] = {}
        if self.resume:
            checkpoint = self.run_dir.latest_checkpoint(read_model_state)
            if checkpoint is not None:
                start_round = checkpoint.server_round + 1
                state_dict = checkpoint.state_dict
                saved_state = checkpoint.strategy_state
        else:
            self.run_dir.check_new()

        sites = self.discover_sites()
        if self.resume:
            stored_plan = self.run_dir.read_document().get("plan")
            if stored_plan is not None and stored_plan != self.plan:
                raise NeurofedError(
                    f"the sites now preprocess with plan {self.plan}, but the run in {config.run_dir} used "
                    f"{stored_plan}; resume with the same settings and neurofed version"
                )
            self.run_dir.drop_events_after(start_round - 1)
            self.run_id = str(self.run_dir.read_document().get("run_id", ""))
        if not self.run_id:
            # Names the run in the sites' privacy ledgers, so a resumed run continues their count.
            self.run_id = uuid.uuid4().hex
        self.audit_event(
            "run-started",
            run_dir=str(config.run_dir),
            resume=self.resume,
            first_round=start_round,
            num_rounds=config.num_rounds,
        )
        for s in sites:
            self.audit_event(
                "site-joined",
                node_id=s.node_id,
                site=s.site_id,
                enrolled_as=self.enrolled_names.get(s.node_id),
                role=s.role,
            )
        if not self.resume:
            self.run_dir.start(
                config,
                {
                    "run_id": self.run_id,
                    "network": network_config(config).to_dict(),
                    "plan": self.plan,
                    "sites": [
                        {"site": s.site_id, "role": s.role, "num_train": s.num_train, "num_test": s.num_test}
                        for s in sites
                    ],
                },
            )
            self._emit(
                {
                    "event": "sites",
                    "round": 0,
                    "sites": [
                        {"site": s.site_id, "role": s.role, "num_train": s.num_train, "num_test": s.num_test}
                        for s in sites
                    ],
                }
            )
        if state_dict is None:
            state_dict = initial_state_dict(config)
        if config.server_dp != "off":
            try:
                check_float_arrays(state_dict_to_arrays(state_dict))
            except ValueError as exc:
                raise NeurofedError(f"run setting 'server-dp': {exc}; use a network without them") from exc

        trainers = [s for s in sites if s.role == ROLE_TRAIN]
        # The strategy samples from what actually connected, which in a deployment may differ from the
        # num-sites / unseen-sites settings.
        strategy = make_strategy(
            config.replace(num_sites=len(sites), unseen_sites=len(sites) - len(trainers))
        )
        restore_strategy_state(strategy, saved_state)
        arrays = state_dict_to_arrays(state_dict)
        dtypes = {k: v.numpy().dtype for k, v in arrays.items()}

        def write_model(path: Path, sd: Mapping[str, Any]) -> None:
            write_model_file(path, sd, config, self.plan)

        for server_round in range(start_round, config.num_rounds + 1):
            self._emit({"event": "round-start", "round": server_round, "stage": "training"}, log_it=False)
            messages = strategy.configure_train(
                server_round,
                arrays,
                site_config(config, server_round, self.run_id),
                _NodeView(s.node_id for s in trainers),
            )
            replies, dropped = self._send(
                messages, "training", server_round, required=config.min_sites or len(trainers)
            )
            accepted = self._screen_updates(server_round, replies, arrays, dropped)
            if not accepted:
                # No site's update is usable this round: the global model stays as it was.
                self._emit(
                    {
                        "event": "aggregate-train",
                        "round": server_round,
                        "metrics": {},
                        "skipped": "no site update was accepted this round",
                    }
                )
                self._finish_round(strategy, server_round, arrays, write_model)
                continue
            new_arrays, train_metrics = strategy.aggregate_train(server_round, accepted)
            if new_arrays is None:
                raise NeurofedError(
                    f"round {server_round}: the strategy could not aggregate the site updates"
                )
            # Adaptive strategies compute in float64 (numpy scalars); the global model stays in its own
            # dtypes, so a resumed run (which reads the float32 checkpoint) continues from the same values.
            arrays = ArrayRecord(
                {k: Array(new_arrays[k].numpy().astype(dtypes[k], copy=False)) for k in new_arrays}
            )
            aggregate_event: dict[str, Any] = {
                "event": "aggregate-train",
                "round": server_round,
                "metrics": dict(train_metrics or {}),
            }
            if config.server_dp != "off":
                aggregate_event["site_level_epsilon"] = server_dp_epsilon(config, server_round)
                aggregate_event["site_level_delta"] = config.dp_delta
            self._emit(aggregate_event)
            self._finish_round(strategy, server_round, arrays, write_model)

        final = arrays.to_torch_state_dict()
        write_model(self.run_dir.final_model_path, final)
        self._emit(
            {
                "event": "finished",
                "round": config.num_rounds,
                "final_model": str(self.run_dir.final_model_path),
            }
        )
        self.audit_event("run-finished", run_dir=str(config.run_dir), num_rounds=config.num_rounds)
        return final

    def _finish_round(
        self, strategy: Any, server_round: int, arrays: ArrayRecord, write_model: Callable[..., None]
    ) -> None:
        if self.config.evaluates_after(server_round):
            self._emit({"event": "round-start", "round": server_round, "stage": "evaluating"}, log_it=False)
            self._evaluate(strategy, server_round, arrays)
            self.write_interim_report(server_round)
        self.run_dir.save_checkpoint(
            server_round, arrays.to_torch_state_dict(), strategy_state(strategy), write_model
        )
        self._emit({"event": "checkpoint", "round": server_round}, log_it=False)

    def write_interim_report(self, server_round: int) -> None:
        """Rebuild report.md / report.html from the metrics so far (server/report.py; no model is evaluated).

        The report is a view of the run, never a reason to stop it: a failure is logged as a
        ``report-failed`` event with the reason, and the run goes on.
        """
        from server.report import write_report

        try:
            write_report(self.run_dir.root, after_round=server_round)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._emit({"event": "report-failed", "round": server_round, "reason": reason})

    def _screen_updates(
        self,
        server_round: int,
        replies: list[Message],
        global_arrays: ArrayRecord,
        dropped: list[dict[str, Any]] | None = None,
    ) -> list[Message]:
        """Log every training reply; return those to aggregate.

        A site that declined the round (``refused`` = 1: its privacy budget) and an update failing
        `server.strategies.check_updates` (NaN/Inf, or a norm far above the other sites') are logged as
        ``refused`` / ``rejected`` events with the site, round and reason, and left out.
        """
        by_node = {s.node_id: s for s in self.sites}
        offered: list[Message] = []
        refused: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        epsilon: dict[str, Any] = {}
        for r in replies:
            site = by_node[r.metadata.src_node_id]
            metrics = dict(r.content["metrics"])
            event: dict[str, Any] = {
                "event": "train",
                "round": server_round,
                "site": site.site_id,
                "role": site.role,
                "split": "train",
                "metrics": metrics,
            }
            if "epsilon" in metrics:
                event["epsilon"] = metrics["epsilon"]
                event["delta"] = metrics.get("delta")
                epsilon[site.site_id] = {"epsilon": metrics["epsilon"], "delta": metrics.get("delta")}
            if metrics.get(REFUSED_KEY):
                reason = str(r.content["refusal"]["reason"]) if "refusal" in r.content else "no reason given"
                self._emit({**event, "event": "refused", "reason": reason})
                refused.append({"site": site.site_id, "reason": reason})
                continue
            self._emit(event)
            offered.append(r)
        checks = check_updates(
            [r.content["arrays"] for r in offered], global_arrays, self.config.update_norm_limit
        )
        accepted = []
        for r, check in zip(offered, checks, strict=True):
            if check.accepted:
                accepted.append(r)
                continue
            site = by_node[r.metadata.src_node_id]
            self._emit(
                {
                    "event": "rejected",
                    "round": server_round,
                    "site": site.site_id,
                    "role": site.role,
                    "reason": check.reason,
                    "update_norm": None if math.isnan(check.norm) else check.norm,
                }
            )
            rejected.append({"site": site.site_id, "reason": check.reason})
        self.audit_event(
            "round-trained",
            round=server_round,
            contributed=[by_node[r.metadata.src_node_id].site_id for r in accepted],
            refused=refused,
            rejected=rejected,
            dropped=list(dropped or []),
            epsilon=epsilon,
        )
        return accepted

    def _evaluate(self, strategy: Any, server_round: int, arrays: ArrayRecord) -> None:
        by_node = {s.node_id: s for s in self.sites}
        messages = strategy.configure_evaluate(
            server_round, arrays, site_config(self.config, server_round, self.run_id), _NodeView(by_node)
        )
        replies, dropped = self._send(messages, "evaluation", server_round, required=1)
        self.audit_event(
            "round-evaluated",
            round=server_round,
            evaluated=[by_node[r.metadata.src_node_id].site_id for r in replies],
            dropped=dropped,
        )
        for r in replies:
            site = by_node[r.metadata.src_node_id]
            metrics = dict(r.content["metrics"])
            models = {"global": {k: v for k, v in metrics.items() if not k.startswith(PERSONAL_PREFIX)}}
            personal = {
                k.removeprefix(PERSONAL_PREFIX): v
                for k, v in metrics.items()
                if k.startswith(PERSONAL_PREFIX)
            }
            if personal:
                models["personal"] = {**personal, WEIGHT_KEY: metrics[WEIGHT_KEY]}
            for model, values in models.items():
                self._emit(
                    {
                        "event": "evaluate",
                        "round": server_round,
                        "site": site.site_id,
                        "role": site.role,
                        "split": "test",
                        "model": model,
                        "metrics": values,
                    }
                )
        # The aggregate covers the training sites' test splits; unseen sites are reported apart.
        trained = [r for r in replies if by_node[r.metadata.src_node_id].role == ROLE_TRAIN]
        aggregated = strategy.aggregate_evaluate(server_round, trained)
        self._emit(
            {
                "event": "aggregate-evaluate",
                "round": server_round,
                "role": ROLE_TRAIN,
                "metrics": dict(aggregated or {}),
            }
        )


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    *,
    on_event: EventHook | None = None,
    on_message: MessageHook | None = None,
) -> ServerApp:
    """A ServerApp whose settings are Flower's run config overridden by ``run_config`` (flat keys).

    Args:
        run_config: flat Flower keys (``num-server-rounds``, ``strategy``, ..., and ``resume``) that
            override the run config Flower passes in.
        on_event: receives every metrics event (and progress events) as it happens.
        on_message: receives every message to and from the sites (for audits and tests).
    """
    server_app = ServerApp()
    overrides = dict(run_config or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = {**dict(context.run_config), **overrides}
        resume = bool(settings.pop(RESUME_KEY, False))
        has_resume_rounds = RESUME_ROUNDS_KEY in settings
        resume_rounds = int(settings.pop(RESUME_ROUNDS_KEY, 0))
        config = RunConfig.from_flower(settings)
        if resume and has_resume_rounds:
            # The stored rounds win (FederatedRun keeps the larger of the two) unless resume-rounds asks for more.
            config = config.replace(num_rounds=max(resume_rounds, 1))
        deployment = CoordinatorState.from_environment()
        if deployment is None:
            FederatedRun(config, grid, resume=resume, on_event=on_event, on_message=on_message).execute()
            return
        config = config.replace(run_dir=str(deployment.resolve_run_dir(config.run_dir)))
        run = FederatedRun(
            config,
            grid,
            resume=resume,
            on_event=on_event,
            on_message=on_message,
            audit=AuditLog(deployment.audit_path),
            enrolled_names=SiteRegistry(deployment).names_by_node_id(),
            flower_run_id=context.run_id,
        )
        try:
            run.execute()
        except BaseException as exc:
            run.audit_event("run-failed", run_dir=config.run_dir, reason=str(exc) or type(exc).__name__)
            raise
        try:
            write_deployed_report(Path(config.run_dir))
        except Exception as exc:  # the run itself completed: its files are all there
            run.audit_event("report-failed", run_dir=config.run_dir, reason=f"{type(exc).__name__}: {exc}")
            print(
                f"neurofed: the run finished but its report failed ({exc}); run `neurofed report {config.run_dir}`"
            )

    return server_app


def write_deployed_report(run_dir: Path) -> None:
    """The report of a finished deployed run (from its metrics; the cross-site study evaluation needs the
    sites' data, which never reaches the coordinator)."""
    from server.report import write_report

    write_report(run_dir)


app = make_server_app()
