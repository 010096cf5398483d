"""The report while a run goes on (every eval-every rounds) and FedBN's personalised models in the report.

One tiny FedBN run is made once for the module through `neurofed simulate` (tests/report_fixtures.py:
2 training sites + 1 unseen, 2 rounds, 20^3-voxel phantoms; here with evaluation after every round); a
hook reads the run directory's report.md when round 2 starts, i.e. what the interim report after round 1
left there.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from report_fixtures import ROUNDS, simulate_study


@pytest.fixture(scope="module")
def fedbn_study(tmp_path_factory):
    """A finished FedBN `neurofed simulate` run, and report.md as it was when round 2 started."""
    import study.simulation

    root = tmp_path_factory.mktemp("fedbn")
    run = root / "run"
    seen_at_round_two: list[str | None] = []
    real_run_simulation = study.simulation.run_simulation

    def watching_run_simulation(*args, **kwargs):
        def on_event(event: dict) -> None:
            if event.get("event") == "round-start" and event["round"] == 2 and event["stage"] == "training":
                report = run / "report.md"
                seen_at_round_two.append(report.read_text() if report.is_file() else None)

        return real_run_simulation(*args, **kwargs, on_event=on_event)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study.simulation, "run_simulation", watching_run_simulation)
        return {
            **simulate_study(root, run, "--strategy", "fedbn", "--eval-every", "1"),
            "interim": seen_at_round_two,
        }


def _sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in re.split(r"\n#{2,3} ", text)}


@pytest.mark.slow
def test_an_interim_report_of_round_one_is_there_before_round_two_trains(fedbn_study) -> None:
    (interim,) = fedbn_study["interim"]
    assert interim is not None, "no report.md in the run directory when round 2 started"
    assert "interim report after round 1 of 2" in interim
    sites = [s["site"] for s in fedbn_study["evaluation"]["sites"]]
    # The federated metrics so far: round 1's Dice per site is plotted; no comparison yet.
    assert "figures/dice_per_round.png" in interim
    assert "Per-site results" not in interim and "Generalization matrix" not in interim
    # The summary first, with the unseen site's Dice so far; the comparison is announced for the end.
    summary = _sections(interim)["Summary"]
    assert "Global model after round 1" in summary and "interim report" in summary
    # One row per site (FedBN: global and personalised) of round 1's evaluation.
    progress = _sections(interim)["Training progress"]
    rows = [line for line in progress.splitlines() if line.startswith("| site-")]
    assert sorted((r.split("|")[1].strip(), r.split("|")[3].strip()) for r in rows) == sorted(
        (site, model) for site in sites for model in ("global", "personal")
    )
    assert not any(e["event"] == "report-failed" for e in fedbn_study["events"])
    # The final report replaces it.
    final = (fedbn_study["run"] / "report.md").read_text()
    assert "interim report" not in final and "Generalization matrix" in final


def test_a_failing_interim_report_is_logged_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    import server.report
    from contract.run_config import RunConfig
    from server.federated_run import FederatedRun
    from server.run_directory import RunDirectory

    config = RunConfig(run_dir=str(tmp_path / "run"), dp=False)
    RunDirectory(config.run_dir).start(config)

    def broken(*args, **kwargs):
        raise RuntimeError("the figure backend is gone")

    monkeypatch.setattr(server.report, "build_sections", broken)
    run = FederatedRun(config, grid=None)  # type: ignore[arg-type]  # the report needs no sites
    run.write_interim_report(3)  # must not raise
    (event,) = [e for e in RunDirectory(config.run_dir).read_events() if e["event"] == "report-failed"]
    assert event["round"] == 3 and "the figure backend is gone" in event["reason"]
    assert not (tmp_path / "run" / "report.md").exists()


@pytest.mark.slow
def test_personalised_models_are_scored_on_their_own_sites_test_split(fedbn_study) -> None:
    evaluation, run = fedbn_study["evaluation"], fedbn_study["run"]
    sites = {s["site"]: s for s in evaluation["sites"]}
    training = sorted(name for name, s in sites.items() if s["role"] == "train")
    (described,) = [m for m in evaluation["models"] if m["name"] == "personalised"]
    assert described["trained_on"] == training
    for site in training:
        assert (run / described["site_layers"][site]).is_file()
    scored = {(r["site"], r["subject"]) for r in evaluation["results"] if r["model"] == "personalised"}
    assert scored == {(site, subject) for site in training for subject in sites[site]["test_subjects"]}
    # The same model, split and inference as the site's own final evaluation of its personalised model.
    final_personal = {
        e["site"]: e["metrics"]["dice-mean"]
        for e in fedbn_study["events"]
        if e["event"] == "evaluate" and e["round"] == ROUNDS and e.get("model") == "personal"
    }
    for site in training:
        ours = [
            r["mean_dice"]
            for r in evaluation["results"]
            if r["model"] == "personalised" and r["site"] == site
        ]
        assert np.mean(ours) == pytest.approx(final_personal[site], abs=1e-5)


@pytest.mark.slow
def test_report_shows_personalised_beside_global_local_only_and_pooled(fedbn_study) -> None:
    evaluation = fedbn_study["evaluation"]
    text = (fedbn_study["run"] / "report.md").read_text()
    sections = _sections(text)
    training = [s["site"] for s in evaluation["sites"] if s["role"] == "train"]
    unseen = [s["site"] for s in evaluation["sites"] if s["role"] == "holdout"]
    personal_label = "personalised (own site's normalization layers)"
    for site in training:
        table = [line for line in sections[site].splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert header[2:] == ["federated", personal_label, f"{site} (local-only)", "pooled"]
        # Per-class rows: one per class and metric, each with a cell for the personalised model.
        assert len(table) - 2 == 1 + len(evaluation["classes"]) * len(evaluation["metrics"])
        personal_mean = [
            r["mean_dice"]
            for r in evaluation["results"]
            if r["model"] == "personalised" and r["site"] == site
        ]
        all_classes = [c.strip() for c in table[2].strip("|").split("|")]
        assert all_classes[3].startswith(f"{np.mean(personal_mean):.3f}")
    matrix = sections["Generalization matrix (train site x test site)"]
    (row,) = [line for line in matrix.splitlines() if line.startswith(f"| {personal_label}")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    columns = [s["site"] for s in evaluation["sites"]]
    assert cells[1 + columns.index(unseen[0])] == "n/a"
    assert all(cells[1 + columns.index(site)] != "n/a" for site in training)
