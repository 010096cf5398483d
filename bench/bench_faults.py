"""Faults with real processes, the long scenario: every malformed reply over Flower's transport, the
coordinator SIGKILLed in a checkpoint write and in mid-round, a site revoked while online.

The federation and the scenario runner are tests/test_faults.py's (coordinator with TLS and SuperNode
authentication, behind deploy/nginx when nginx is installed; two honest sites and a malicious one):
`FULL` sends each malformed training reply of bench/faulty_site/malformed_replies.py once, in order, and
a Dice of 7 in every evaluation. Printed: each reply the malicious site sent (from its log) and what the
coordinator made of it (its audit log), whether every round was aggregated once, the honest sites'
ledger reservations per round, the wall time of each restart. Exits 1 if a check fails::

    .venv/bin/python bench/bench_faults.py [--out /tmp/neurofed-bench-faults]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from bench.faulty_site.malformed_replies import INFLATED_WEIGHT, KINDS  # noqa: E402
from tests.test_faults import (  # noqa: E402
    MALICIOUS,
    Scenario,
    run_dir,
    run_scenario,
    start_faulty_federation,
)

_KILLED_ATTEMPT = 4
"""Index of the malicious site's reply to round 4's first attempt (rounds 1, 2, 2 again, 3, then 4): the
coordinator is killed in that round, so that reply is never screened; its kind is sent again on the retry."""

FULL = Scenario(
    honest=("site-a", "site-b"),
    rounds=16,
    sent=(*list(KINDS)[: _KILLED_ATTEMPT + 1], *list(KINDS)[_KILLED_ATTEMPT:]),
    kill_in_checkpoint=2,
    kill_mid_round=4,
    revoke_before=16,
    eval_every=5,
)
"""The malicious site gets 17 training messages: rounds 1-15, and again rounds 2 and 4 after the kills;
every kind is judged once by a coordinator that lives to aggregate its round."""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/neurofed-bench-faults"), help="work folder")
    args = parser.parse_args()
    from server.audit_log import AuditLog
    from server.run_directory import RunDirectory

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"scenario: {FULL}", flush=True)
    started = time.perf_counter()
    fed = start_faulty_federation(args.out, FULL)
    try:
        observed = run_scenario(fed, FULL)
        wall = time.perf_counter() - started
        events = RunDirectory(run_dir(fed)).read_events()
        audit = AuditLog(fed.state.audit_path).read()
        sent = re.findall(r"faulty site: round (\d+) answered with '([^']+)'", fed.sites[MALICIOUS].text())
        ledgers = {s: sorted(r.server_round for r in fed.ledger(s).releases()) for s in FULL.honest}
        proxy = "through nginx" if fed.nginx is not None else "directly (nginx not installed)"
    finally:
        fed.stop_all()

    checks: list[tuple[str, bool]] = []
    trained = [e for e in audit if e["event"] == "round-trained"]
    print(f"\nThe malicious site's training replies ({len(sent)}; sites dialled the coordinator {proxy}):\n")
    print("| round | reply | coordinator |")
    print("|---|---|---|")
    last_reply = {server_round: i for i, (server_round, _) in enumerate(sent)}
    for i, (server_round, kind) in enumerate(sent):
        entries = [e for e in trained if e["round"] == int(server_round)]
        reasons = [r["reason"] for e in entries for r in e["rejected"] if r["site"] == MALICIOUS]
        if kind == INFLATED_WEIGHT:
            weights = [e.get("weight") for e in events if e["event"] == "train" and e["site"] == MALICIOUS]
            verdict = f"accepted, weight capped to {weights}" if weights else "no accepted reply logged"
            ok = bool(weights) and all(w is not None and w <= 2 for w in weights)
        elif any(KINDS[kind] in r for r in reasons):
            verdict, ok = "rejected: " + next(r for r in reasons if KINDS[kind] in r)[:110], True
        elif i != last_reply[server_round]:
            # Sent to a coordinator killed in that round before it screened it: the round was retried.
            verdict, ok = "not screened (the coordinator was killed in this round; retried)", True
        else:
            verdict = "not screened (the coordinator was killed before)" if not reasons else f"?? {reasons}"
            ok = not reasons
        checks.append((f"round {server_round} {kind}", ok))
        print(f"| {server_round} | {kind} | {verdict} |")
    evaluations = [e for e in events if e["event"] == "rejected" and e["stage"] == "evaluation"]
    aggregated = [e["round"] for e in events if e["event"] == "aggregate-train"]
    checks += [
        ("every kind of malformed reply sent", {k for _, k in sent} == set(KINDS)),
        ("the run completed", observed["exit"] == 0),
        ("killed submissions did not report success", 0 not in observed["killed_exits"]),
        ("every round aggregated exactly once", aggregated == list(range(1, FULL.rounds + 1))),
        ("malformed evaluations rejected", len(evaluations) >= 1),
        ("revoked site got no message after", f"round {FULL.revoke_before} answered" not in str(sent)),
    ]
    for site, rounds in ledgers.items():
        doubled = [r for r in (FULL.kill_in_checkpoint, FULL.kill_mid_round) if rounds.count(r) == 2]
        checks.append((f"{site}'s ledger counts the killed rounds twice", len(doubled) == 2))
        print(f"\n{site}'s ledger, rounds reserved: {rounds}")
    print(f"\nmalformed evaluations rejected: {[(e['round'], e['reason'][:60]) for e in evaluations]}")
    print(f"rounds aggregated (metrics.jsonl): {aggregated}")
    print("\nchecks:")
    for name, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"\ntotal wall time {wall:.0f} s (federation start, {FULL.rounds} rounds, 2 kills and restarts)")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
