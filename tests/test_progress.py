"""Progress of long phases (common/progress.py): a plain line per step with counts and time left where no
bar can be drawn (a log, a pipe), and the federated run's stages from its events (server/run_progress.py)."""

from __future__ import annotations

import io
import re

from common.progress import Progress
from contract.run_config import RunConfig
from server.run_progress import RunProgress, stages_from
from study.synthesis import synthesize_sites

COUNTS = re.compile(r"^(?P<title>[\w -]+): (?P<done>\d+)/(?P<total>\d+) ")


def _counted(lines: list[str], title: str) -> list[tuple[int, int]]:
    return [
        (int(m["done"]), int(m["total"]))
        for line in lines
        if (m := COUNTS.match(line)) and m["title"] == title
    ]


def test_a_phase_prints_one_line_per_step_with_counts_and_time_left_where_no_bar_can_be_drawn():
    out = io.StringIO()  # not a terminal
    with Progress("scoring", 3, stream=out) as bar:
        for subject in ("sub-1", "sub-2", "sub-3"):
            bar.working_on(subject)  # shown on a bar only
            bar.advance(f"{subject} done")
    lines = out.getvalue().splitlines()
    assert _counted(lines, "scoring") == [(1, 3), (2, 3), (3, 3)]
    assert lines[0].startswith("scoring: 1/3 sub-1 done (0:00 elapsed, about 0:00 left)")
    assert lines[-1] == "scoring: 3/3 sub-3 done (done in 0:00)"


def test_a_phase_of_many_short_steps_prints_evenly_spaced_lines_and_the_last_step():
    out = io.StringIO()
    with Progress("training", 200, stream=out, lines=10) as bar:
        for _ in range(200):
            bar.advance()
    counts = _counted(out.getvalue().splitlines(), "training")
    assert [done for done, _ in counts] == list(range(20, 201, 20))


def test_a_hidden_phase_prints_nothing():
    out = io.StringIO()
    with Progress("quiet", 2, show=False, stream=out) as bar:
        bar.advance()
        bar.note("a result")
    assert out.getvalue() == ""


def test_synthesis_piped_to_a_log_prints_a_line_per_subject(tmp_path, capsys):
    synthesize_sites(tmp_path / "data", n_sites=2, subjects_per_site=1, spacing_mm=8.0)
    lines = capsys.readouterr().out.splitlines()
    assert _counted(lines, "synthesizing") == [(1, 2), (2, 2)]
    assert "site-02 sub-001" in lines[1]


def test_a_federated_run_shows_a_step_per_stage_and_each_sites_result():
    config = RunConfig(num_rounds=2, eval_every=2)
    assert stages_from(config, 1) == 4  # preparing sites, round 1 training, round 2 training + evaluating
    out = io.StringIO()
    events = [
        {"event": "round-start", "round": 0, "stage": "preparing sites"},
        {"event": "round-start", "round": 1, "stage": "training"},
        {"event": "train", "round": 1, "site": "site-01", "role": "train", "metrics": {"train-loss": 0.5}},
        {"event": "refused", "round": 1, "site": "site-02", "role": "train", "reason": "budget spent"},
        {"event": "round-start", "round": 2, "stage": "training"},
        {"event": "round-start", "round": 2, "stage": "evaluating"},
        {
            "event": "evaluate",
            "round": 2,
            "site": "site-03",
            "role": "holdout",
            "metrics": {"dice-mean": 0.61},
        },
        {"event": "finished", "round": 2},
    ]
    with Progress("federated run", None, stream=out) as bar:
        shown = RunProgress(config, bar)
        for event in events:
            shown(event)
    lines = out.getvalue().splitlines()
    assert _counted(lines, "federated run") == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [line.split(" (")[0] for line in lines if line.startswith("federated run")] == [
        "federated run: 1/4 preparing sites",
        "federated run: 2/4 round 1 training",
        "federated run: 3/4 round 2 training",
        "federated run: 4/4 round 2 evaluating",
    ]
    assert "round 1: site-01 trained, loss 0.500" in lines
    assert "round 1: site-02 refused: budget spent" in lines
    assert "round 2: site-03 (holdout) test Dice 0.610" in lines


def test_a_resumed_run_counts_only_the_stages_left():
    config = RunConfig(num_rounds=5, eval_every=1)
    out = io.StringIO()
    with Progress("federated run", None, stream=out) as bar:
        shown = RunProgress(config, bar)
        shown({"event": "round-start", "round": 0, "stage": "preparing sites"})
        shown({"event": "round-start", "round": 4, "stage": "training"})
    assert out.getvalue().startswith("federated run: 1/5 preparing sites")
