"""One federated run over a Flower Grid: discovery, rounds, screening, evaluation, checkpoints.

See server/app.py for the whole run; this module holds its loop. Events go to the run directory's
metrics.jsonl (and to hooks, for a live view); deployed, the audit log gets one event per step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from contract.resume_settings import resumed_config
from contract.run_config import RunConfig
from contract.site_task import site_task_record
from contract.version import CONTRACT_VERSION
from contract.wire import CONFIG_RECORD, ROLE_TRAIN
from models.errors import NeurofedError
from models.model_file import weights_sha256
from server.audit_log import AuditLog
from server.evaluation_round import evaluate_round
from server.global_model import read_model_state, starting_point, starting_weights, write_model_file
from server.run_directory import RunDirectory
from server.site_admission import Enrolment, enrolled_nodes
from server.site_discovery import Site, compatible_replies, site_summaries, sites_from_replies
from server.site_replies import NodeView, lost_nodes, no_contributor_reason, send_and_wait
from server.strategies import (
    FALLBACK_STRATEGY,
    make_strategy,
    released_rounds,
    restore_strategy_state,
    round_aggregator,
    server_dp_epsilon,
    state_dict_to_arrays,
    strategy_state,
    training_schemas,
    unreleased_reason,
)
from server.update_screening import TrainingSchemas, check_float_arrays, screen_training_replies

EventHook = Callable[[dict[str, Any]], None]
"""Called with every event written to metrics.jsonl (and ``round-start`` events), e.g. for a live view."""
MessageHook = Callable[[str, Message], None]
"""Called as ``hook("to-site" | "from-site", message)`` for every message the server sends or receives."""


def site_config(config: RunConfig, server_round: int, run_id: str = "") -> ConfigRecord:
    """The ConfigRecord a site gets (contract/site_task.py): the run settings it needs, the round number
    and the run's id, so sites train and evaluate exactly as the server was configured, also in a
    deployment where sites have no access to the run config file."""
    return ConfigRecord(site_task_record(config, server_round, run_id))


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
        enrolment: Enrolment | None = None,
        flower_run_id: int | None = None,
        known_cause: Callable[[int], str | None] | None = None,
    ) -> None:
        """
        Args:
            enrolment: reads the deployment's enrolment registry (node id -> enrolled name); None in
                simulation. Only enrolled nodes declaring their enrolled name take part, and a node whose
                enrolment is revoked leaves the run from the next round on (server/site_admission.py).
        """
        self.run_dir = RunDirectory(config.run_dir)
        if resume:
            # The stored settings win, but for the few a resumed run may change (RESUMABLE_SETTINGS).
            config = resumed_config(self.run_dir.read_config(), config)
        self.config = config
        self.grid = grid
        self.resume = resume
        self.on_event = on_event
        self.on_message = on_message
        self.sites: list[Site] = []
        self.not_admitted: list[dict[str, Any]] = []
        """``{"node_id", "site", "reason"}`` of each node site discovery left out (logged once the run starts)."""
        self.plan: dict[str, Any] = {}
        self.run_id = ""
        self.audit = audit
        self.enrolment = enrolment
        self.enrolled_names: dict[int, str] = dict(enrolment()) if enrolment else {}
        self.flower_run_id = flower_run_id
        self.known_cause = known_cause  # what the coordinator knows of a lost node (revoked)

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
            # Flower's 64-bit ids as strings: JSON readers such as jq round large numbers.
            flower_run_id = None if self.flower_run_id is None else str(self.flower_run_id)
            self.audit.record(event, run_id=self.run_id or None, flower_run_id=flower_run_id, **fields)

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
        replies = send_and_wait(self.grid, messages, self.config.round_timeout_s)
        if self.on_message is not None:
            for r in replies:
                self.on_message("from-site", r)
        dropped = lost_nodes(messages, replies, self.config.round_timeout_s, self.known_cause)
        for d in dropped:
            d["site"] = self._site_name(d["node_id"])
        good = [r for r in replies if not r.has_error()]
        if len(good) < required:
            reasons = "; ".join(f"{d['site']}: {d['reason']}" for d in dropped)
            raise NeurofedError(
                f"round {server_round} {what}: {len(good)} of {len(messages)} site(s) replied, {required} "
                f"needed ({reasons}); fix the site(s) and {self._how_to_continue()}"
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

    def _how_to_continue(self) -> str:
        if self.run_dir.completed_rounds():
            return f"continue from the last checkpoint with --resume {self.config.run_dir}"
        return "start the run again (it has no checkpoint to resume from)"

    def round_config(self, server_round: int) -> ConfigRecord:
        """The ConfigRecord of this run's messages of ``server_round`` (see `site_config`)."""
        return site_config(self.config, server_round, self.run_id)

    def _wait_for_nodes(self) -> list[int]:
        """The enrolled nodes, once ``num-sites`` of them are connected; nodes that are not enrolled are
        never sent anything (a ``rejected`` event each)."""
        deadline = time.monotonic() + self.config.round_timeout_s
        while len((admission := enrolled_nodes(self.grid.get_node_ids(), self.enrolment)).admitted) < (
            self.config.num_sites
        ):
            if time.monotonic() > deadline:
                raise NeurofedError(
                    f"only {len(admission.admitted)} of {self.config.num_sites} enrolled sites connected within "
                    f"{self.config.round_timeout_s:.0f} s; start the missing sites or lower num-sites"
                )
            time.sleep(0.5)
        for node_id, reason in admission.refused.items():
            self.not_admitted.append({"node_id": node_id, "site": f"node {node_id}", "reason": reason})
        return admission.admitted

    def discover_sites(self) -> list[Site]:
        """Ask every enrolled node for its site id, role and subject counts (one ``query`` message each)."""
        self._emit({"event": "round-start", "round": 0, "stage": "preparing sites"}, log_it=False)
        node_ids = self._wait_for_nodes()
        if self.enrolment is not None:
            self.enrolled_names = dict(self.enrolment())
        content = RecordDict({CONFIG_RECORD: site_config(self.config, 0)})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        # A site that fails here (or speaks another contract version) takes no part; min-sites decides.
        replies, _ = self._send(messages, "site discovery", 0, required=1)
        replies, incompatible = compatible_replies(replies, self._site_name)
        for left_out in incompatible:
            self._emit({"event": "dropped", "round": 0, "stage": "site discovery", **left_out})
        enrolled = self.enrolled_names if self.enrolment is not None else None
        discovery = sites_from_replies(replies, self.config.min_sites, enrolled)
        self.not_admitted.extend(discovery.rejected)
        self.sites = discovery.sites
        self.plan = discovery.plan
        return self.sites

    def _left_out(
        self, server_round: int, stage: str, site: str, role: str | None, reason: str, **audit: Any
    ) -> None:
        """A site the coordinator leaves out of a step: a ``rejected`` event and an audit entry."""
        event = {"event": "rejected", "round": server_round, "stage": stage, "site": site, "role": role}
        self._emit({**event, "reason": reason})
        self.audit_event("site-rejected", round=server_round, stage=stage, site=site, reason=reason, **audit)

    def _active_sites(self, server_round: int) -> list[Site]:
        """The sites still enrolled (all of them in simulation); each revoked one is logged once."""
        if self.enrolment is None:
            return list(self.sites)
        enrolled = self.enrolment()
        for s in self.sites:
            if enrolled.get(s.node_id) != s.site_id:
                reason = (
                    f"site {s.site_id} is no longer enrolled (revoked); it takes no further part in the run"
                )
                self._left_out(server_round, "enrolment", s.site_id, s.role, reason, node_id=s.node_id)
        self.sites = [s for s in self.sites if enrolled.get(s.node_id) == s.site_id]
        return list(self.sites)

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
            contract_version=CONTRACT_VERSION,
            run_dir=str(config.run_dir),
            resume=self.resume,
            first_round=start_round,
            num_rounds=config.num_rounds,
        )
        for s in sites:
            self.audit_event(
                "site-joined",
                node_id=str(s.node_id),
                site=s.site_id,
                enrolled_as=self.enrolled_names.get(s.node_id),
                role=s.role,
            )
        if not self.resume:
            state_dict, config, starting = starting_point(config, self.plan)
            self.config = config
            self.run_dir.start(
                config,
                {
                    "run_id": self.run_id,
                    "network": config.network_config().to_dict(),
                    "plan": self.plan,
                    "sites": site_summaries(sites),
                    **starting,
                },
            )
            self._emit({"event": "sites", "round": 0, "sites": site_summaries(sites)})
        for r in self.not_admitted:
            self._left_out(0, "discovery", r["site"], None, r["reason"], node_id=r["node_id"])
        if state_dict is None:
            # A resumed run that never wrote a checkpoint starts again from its starting weights.
            state_dict, _ = starting_weights(config, self.plan)
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
        restore_strategy_state(strategy, saved_state, completed_rounds=start_round - 1)
        arrays = state_dict_to_arrays(state_dict)
        dtypes = {k: v.numpy().dtype for k, v in arrays.items()}
        schemas = training_schemas(config, arrays)

        def write_model(path: Path, sd: Mapping[str, Any]) -> None:
            write_model_file(path, sd, config, self.plan)

        for server_round in range(start_round, config.num_rounds + 1):
            self._emit({"event": "round-start", "round": server_round, "stage": "training"}, log_it=False)
            trainers = [s for s in self._active_sites(server_round) if s.role == ROLE_TRAIN]
            if len(trainers) < max(1, config.min_sites):
                raise NeurofedError(
                    f"round {server_round}: {len(trainers)} enrolled training site(s) left, min-sites is "
                    f"{config.min_sites}; enroll sites and {self._how_to_continue()}"
                )
            messages = strategy.configure_train(
                server_round, arrays, self.round_config(server_round), NodeView(s.node_id for s in trainers)
            )
            replies, dropped = self._send(
                messages, "training", server_round, required=config.min_sites or len(trainers)
            )
            accepted = self._screen_updates(
                server_round, replies, arrays, schemas, dropped
            )  # raises when none
            new_arrays, train_metrics, skipped = None, None, None
            aggregator, instead = round_aggregator(strategy, config, len(accepted))
            if aggregator is None:
                skipped = instead
            else:
                new_arrays, train_metrics = aggregator.aggregate_train(server_round, accepted)
                skipped = unreleased_reason(strategy, server_round)
            if new_arrays is None and skipped:
                # Too few updates for site-level DP: the global model stays as it was.
                event = {"event": "aggregate-train", "round": server_round, "metrics": {}, "skipped": skipped}
                self._emit(event)
                self._finish_round(strategy, server_round, arrays, write_model)
                continue
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
            if instead:
                aggregate_event["aggregated_by"] = {"strategy": FALLBACK_STRATEGY, "why": instead}
            if config.server_dp != "off":
                releases = released_rounds(strategy)
                aggregate_event["site_level_epsilon"] = server_dp_epsilon(config, releases)
                aggregate_event["site_level_delta"] = config.dp_delta
                aggregate_event["site_level_releases"] = releases
            self._emit(aggregate_event)
            self._finish_round(strategy, server_round, arrays, write_model)

        final = arrays.to_torch_state_dict()
        write_model(self.run_dir.final_model_path, final)
        model = {"final_model": str(self.run_dir.final_model_path), "weights_sha256": weights_sha256(final)}
        self._emit({"event": "finished", "round": config.num_rounds, **model})
        self.audit_event("run-finished", run_dir=str(config.run_dir), num_rounds=config.num_rounds, **model)
        return final

    def _finish_round(
        self, strategy: Any, server_round: int, arrays: ArrayRecord, write_model: Callable[..., None]
    ) -> None:
        if self.config.evaluates_after(server_round):
            self._emit({"event": "round-start", "round": server_round, "stage": "evaluating"}, log_it=False)
            evaluate_round(self, strategy, server_round, arrays, self.sites)
            self.write_interim_report(server_round)
        self.run_dir.save_checkpoint(
            server_round, arrays.to_torch_state_dict(), strategy_state(strategy), write_model
        )
        self._emit({"event": "checkpoint", "round": server_round}, log_it=False)

    def write_interim_report(self, server_round: int) -> None:
        """Rebuild report.md / report.html from the metrics so far (server/report/; no model is evaluated).

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
        schemas: TrainingSchemas,
        dropped: list[dict[str, Any]] | None = None,
    ) -> list[Message]:
        """Log every training reply (server/update_screening.py); return those to aggregate."""
        by_node = {s.node_id: s for s in self.sites}

        def site_of(reply: Message) -> dict[str, Any]:
            site = by_node[reply.metadata.src_node_id]
            return {"site": site.site_id, "role": site.role, "num_train": site.num_train}

        screened = screen_training_replies(server_round, replies, global_arrays, schemas, site_of)
        for event in screened.events:
            self._emit(event)
        self.audit_event(
            "round-trained",
            round=server_round,
            contributed=screened.accepted_sites,
            refused=screened.refused,
            rejected=screened.rejected,
            dropped=list(dropped or []),
            epsilon=screened.epsilon,
        )
        if not screened.accepted:
            left_out = [
                {**e, "how": how}
                for how, group in (("refused", screened.refused), ("rejected", screened.rejected))
                for e in group
            ] + [{**e, "how": "dropped"} for e in dropped or []]
            raise NeurofedError(f"{no_contributor_reason(server_round, left_out)}; {self._how_to_continue()}")
        return screened.accepted
