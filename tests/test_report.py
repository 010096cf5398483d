"""The cross-site generalization study of a run: `neurofed simulate` -> evaluation.json -> report.

One small run is made once for the module through the real command line (tests/report_fixtures.py:
2 training sites + 1 unseen, 2 rounds, the tiny network on 20^3-voxel phantoms).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import LOCAL_STEPS, ROUNDS, SITES, UNSEEN, simulate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished `neurofed simulate` run with its evaluation and report, and what the command printed."""
    root = tmp_path_factory.mktemp("study")
    return simulate_study(root, root / "run")


@pytest.mark.slow
def test_every_model_is_scored_on_every_test_subject_of_every_site(study) -> None:
    evaluation = study["evaluation"]
    sites = {s["site"]: s for s in evaluation["sites"]}
    assert len(sites) == SITES
    assert [s["role"] for s in sites.values()].count("holdout") == UNSEEN
    models = [m["name"] for m in evaluation["models"]]
    training = [name for name, s in sites.items() if s["role"] == "train"]
    assert sorted(models) == sorted(["federated", "pooled"] + [f"local-only:{s}" for s in training])
    scored = {(r["model"], r["site"], r["subject"]) for r in evaluation["results"]}
    expected = {
        (m, site, subject) for m in models for site, s in sites.items() for subject in s["test_subjects"]
    }
    assert scored == expected and len(evaluation["results"]) == len(expected)
    for s in sites.values():
        # A holdout site tests on all its subjects; a training site never tests on a training subject.
        assert s["test_subjects"] and not set(s["test_subjects"]) & set(s["train_subjects"])
        assert (s["train_subjects"] == []) == (s["role"] == "holdout")
    for r in evaluation["results"]:
        assert set(r["metrics"]) == set(evaluation["classes"])
        for values in r["metrics"].values():
            assert set(values) == {"dice", "hd95_mm", "assd_mm", "abs_volume_diff_ml"}
            assert 0.0 <= values["dice"] <= 1.0
        assert r["mean_dice"] == pytest.approx(np.mean([v["dice"] for v in r["metrics"].values()]))


@pytest.mark.slow
def test_the_federated_scores_are_those_the_sites_reported_for_the_final_model(study) -> None:
    # Same model, same test split, same inference: the study reproduces each site's own last evaluation.
    final = {
        e["site"]: e["metrics"]["dice-mean"]
        for e in study["events"]
        if e["event"] == "evaluate" and e["round"] == ROUNDS and e.get("model", "global") == "global"
    }
    assert len(final) == SITES
    for site, dice in final.items():
        ours = [
            r["mean_dice"]
            for r in study["evaluation"]["results"]
            if r["model"] == "federated" and r["site"] == site
        ]
        assert np.mean(ours) == pytest.approx(dice, abs=1e-5)


@pytest.mark.slow
def test_baselines_get_the_federations_budget_and_are_saved_as_model_files(study) -> None:
    from models.model_file import load_model

    run, evaluation = study["run"], study["evaluation"]
    n_training = SITES - UNSEEN
    budget = evaluation["budget"]
    assert budget["local_only_steps"] == ROUNDS * LOCAL_STEPS
    assert budget["pooled_steps"] == ROUNDS * LOCAL_STEPS * n_training == budget["federated_steps_total"]
    for model in evaluation["models"]:
        if model["kind"] == "federated":
            continue
        expected = budget["pooled_steps"] if model["kind"] == "pooled" else budget["local_only_steps"]
        assert model["steps"] == expected
        loaded = load_model(run / model["file"])
        assert loaded.training["steps"] == expected and loaded.training["sites"] == model["trained_on"]
    kinds = sorted(m["kind"] for m in evaluation["models"])
    assert kinds == ["federated", "local-only", "local-only", "pooled"]


@pytest.mark.slow
def test_report_has_every_site_the_unseen_section_the_matrix_and_the_tests(study) -> None:
    run, evaluation = study["run"], study["evaluation"]
    text = (run / "report.md").read_text()
    sites = [s["site"] for s in evaluation["sites"]]
    unseen = [s["site"] for s in evaluation["sites"] if s["role"] == "holdout"]
    for site in sites:
        assert site in text
    sections = re.split(r"\n## ", text)
    assert sections[1].startswith("Summary") and "Differential privacy: OFF" in sections[1]
    (run_section,) = [s for s in sections if s.startswith("Run\n")]
    postprocessing = json.loads((run / "config.json").read_text())["run_config"]["postprocessing"]
    assert f"label-map post-processing {postprocessing} " in run_section
    (unseen_section,) = [s for s in sections if s.startswith(f"Unseen site {unseen[0]}")]
    assert "better" in unseen_section and "Wilcoxon signed-rank test" in unseen_section
    # The per-site section covers training sites only; the unseen one is reported apart.
    (per_site,) = [s for s in sections if s.startswith("Per-site results")]
    assert unseen[0] not in per_site

    (matrix_section,) = [s for s in sections if s.startswith("Generalization matrix")]
    table = [line for line in matrix_section.splitlines() if line.startswith("|")]
    header, rows = table[0], table[2:]
    assert header.count("|") - 1 == 1 + SITES and f"{unseen[0]} (unseen)" in header
    assert len(rows) == len(evaluation["models"])
    assert len(re.findall(r"Wilcoxon signed-rank test, federated vs local-only on", text)) == SITES - UNSEEN
    assert "pooled over training sites" in text
    assert f"report: {run / 'report.html'}" in study["printed"]
    assert f"open in a browser: {(run / 'report.html').resolve().as_uri()}" in study["printed"]


@pytest.mark.slow
def test_the_unseen_site_is_scored_on_each_scans_own_grid_as_neurofed_segment_would_label_it(
    study, tmp_path
) -> None:
    """The native scores are those of the clinician's output: `segment_file` of the final model on the
    unseen scan, scored against the scan's own label map, gives the federated record's Dice."""
    import nibabel as nib

    from client.segmentation import segment_file
    from client.site_layout import discover_site
    from models.label_protocols import get_protocol
    from models.metrics import segmentation_metrics
    from models.model_file import load_model

    run, evaluation = study["run"], study["evaluation"]
    models = [m["name"] for m in evaluation["models"]]
    holdout = {s["site"]: s["test_subjects"] for s in evaluation["sites"] if s["role"] == "holdout"}
    native = {(r["model"], r["site"], r["subject"]): r for r in evaluation["native_results"]}
    assert set(native) == {
        (m, site, subj) for m in models for site, subjs in holdout.items() for subj in subjs
    }
    ceilings = {(r["site"], r["subject"]): r["mean_dice"] for r in evaluation["native_ceiling"]}
    assert set(ceilings) == {(site, subj) for site, subjs in holdout.items() for subj in subjs}
    # A segmentation perfect on the working grid is near perfect, not perfect, on the scan (partial volumes).
    assert all(0.85 < c < 1.0 for c in ceilings.values())

    site, subject = next(iter(holdout.items()))[0], next(iter(holdout.values()))[0]
    files = {s.subject_id: s for s in discover_site(Path(evaluation["data_root"]) / site).subjects}[subject]
    loaded = load_model(run / "final-model.pt")
    out = segment_file(loaded, files.images["T1w"], tmp_path / "dseg.nii.gz")
    reference = nib.load(files.label)
    protocol = get_protocol(evaluation["protocol"])
    scores = segmentation_metrics(
        np.asanyarray(nib.load(out.label_map).dataobj),
        protocol.map_freesurfer(np.asanyarray(reference.dataobj)),
        protocol.class_names,
        reference.header.get_zooms()[:3],
    )
    record = native[("federated", site, subject)]
    assert record["spacing_mm"] == pytest.approx(reference.header.get_zooms()[:3])
    assert record["mean_dice"] == pytest.approx(np.mean([v["dice"] for v in scores.values()]), abs=1e-6)

    (unseen_table,) = [
        line
        for line in (run / "report.md").read_text().splitlines()
        if "scan's own grid" in line and "|" in line
    ]
    assert unseen_table.endswith("mean Dice, scan's own grid (4 mm) |")
    assert "perfect on the working grid (partial-volume limit)" in (run / "report.md").read_text()
    # The unseen site's detailed section has the per-class table on the scans' own grid too.
    (section,) = [
        s for s in re.split(r"\n#+ ", (run / "report.md").read_text()) if s.startswith("Unseen site")
    ]
    assert (
        section.count("| all (mean over classes) | Dice |") == 2 and "as `neurofed segment` labels" in section
    )
    own_grid_table = section[section.index("as `neurofed segment` labels") :]
    assert (
        f"{np.mean([r['mean_dice'] for r in native.values() if r['model'] == 'federated']):.3f}"
        in own_grid_table
    )


def test_a_label_map_off_its_scans_grid_is_refused_by_name(tmp_path) -> None:
    import nibabel as nib

    from client.preprocessing import NativeTransform
    from models.errors import NeurofedError
    from models.label_protocols import get_protocol
    from study.native_scoring import load_native_reference

    path = tmp_path / "sub-01_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), path)
    transform = NativeTransform((9, 8, 8), np.eye(4), (8, 8, 8), np.eye(4))
    with pytest.raises(
        NeurofedError, match=r"sub-01_dseg\.nii\.gz has shape \(8, 8, 8\), its scan \(9, 8, 8\)"
    ):
        load_native_reference(path, transform, get_protocol("tissue"))


@pytest.mark.slow
def test_html_report_references_only_existing_images_including_unseen_qc(study) -> None:
    run = study["run"]
    page = (run / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources
    for source in sources:
        assert (run / source).is_file(), source
    assert "figures/generalization_matrix.png" in sources and "figures/dice_per_round.png" in sources
    qc = [s for s in sources if s.startswith("qc/")]
    unseen = [s["site"] for s in study["evaluation"]["sites"] if s["role"] == "holdout"]
    assert qc and all(Path(s).name.startswith(unseen[0]) for s in qc)
    assert "Differential privacy: OFF" in page


@pytest.mark.slow
def test_report_command_rebuilds_the_report_without_reevaluating(study, tmp_path, capsys) -> None:
    from study.cli import main

    run = tmp_path / "copy"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "report.*"))
    before = (run / "evaluation.json").read_bytes()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "evaluation.json").read_bytes() == before
    assert str(run / "report.html") in capsys.readouterr().out


@pytest.mark.slow
def test_epsilon_per_round_is_plotted_when_sites_report_it(study, tmp_path) -> None:
    from server.report import write_report

    run = tmp_path / "dp"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "baselines"))
    events = [{**e, "epsilon": 0.5 * e["round"]} if e["event"] == "train" else e for e in study["events"]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    markdown, page = write_report(run)
    summary = re.split(r"\n## ", markdown.read_text())[1]
    assert summary.startswith("Summary")
    assert (
        "Differential privacy: ON" in summary and f"largest final ε over sites {0.5 * ROUNDS:.3g}" in summary
    )
    assert (run / "figures" / "epsilon_per_round.png").is_file()
    assert "figures/epsilon_per_round.png" in page.read_text()


def test_wilcoxon_line_says_not_applicable_with_too_few_pairs_and_tests_otherwise() -> None:
    from scipy.stats import wilcoxon

    from server.report import wilcoxon_line

    line = wilcoxon_line("federated vs local-only on a", [0.8, 0.9], [0.7, 0.6])
    assert "n = 2" in line and "not applicable" in line
    rng = np.random.default_rng(3)
    fed, local = rng.uniform(0.6, 0.9, 8), rng.uniform(0.5, 0.8, 8)
    line = wilcoxon_line("federated vs local-only on a", fed, local)
    assert "n = 8" in line and f"p = {wilcoxon(fed, local).pvalue:.3g}" in line
    assert "not applicable" in wilcoxon_line("x", [0.5] * 7, [0.5] * 7)


def test_the_unseen_sites_subjects_are_spread_through_the_cross_site_evaluation() -> None:
    # They cost more (scored on their own grid too); bunched at the end, the time left printed from the
    # first steps' pace would be far too short.
    from study.study_evaluation import _spread_evenly

    training = [[("a", i) for i in range(4)], [("b", i) for i in range(4)]]
    unseen = [("unseen", i) for i in range(8)]
    order = _spread_evenly([*training, unseen])
    assert sorted(order) == sorted([*training[0], *training[1], *unseen])
    for group in (*training, unseen):
        assert [item for item in order if item in group] == group  # each site's own order kept
    positions = [order.index(item) for item in unseen]
    assert positions[0] < 2 and positions[-1] == len(order) - 1  # in the first steps and the last
    assert max(np.diff(positions)) <= 3  # never more than two other subjects between two of its own


def test_report_of_a_folder_without_a_run_names_the_folder(tmp_path, capsys) -> None:
    from study.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "config.json" in err


@pytest.mark.slow
def test_report_has_a_privacy_audit_of_every_training_site_beside_its_epsilon(study, tmp_path) -> None:
    from server.report import write_report

    evaluation = study["evaluation"]
    sites = {s["site"]: s for s in evaluation["sites"]}
    training = [name for name, s in sites.items() if s["role"] == "train"]
    (unseen,) = [name for name, s in sites.items() if s["role"] == "holdout"]
    audit = evaluation["membership_audit"]
    # Members are exactly a site's training split, non-members its test split; the unseen site calibrates.
    assert [g["name"] for g in audit["sites"]] == training
    for group in audit["sites"]:
        assert sorted(group["member_losses"]) == sorted(sites[group["name"]]["train_subjects"])
        assert sorted(group["nonmember_losses"]) == sorted(sites[group["name"]]["test_subjects"])
        assert 0.0 <= group["auc"] <= 1.0 and group["calibrated"]["n_reference"] == len(
            sites[unseen]["test_subjects"]
        )
    assert audit["reference_sites"] == [unseen]
    assert audit["pooled"]["n_members"] == sum(len(sites[s]["train_subjects"]) for s in training)

    text = (study["run"] / "report.md").read_text()
    sections = re.split(r"\n## ", text)
    titles = [s.splitlines()[0] for s in sections]
    # The summary (with each site's ε and AUC) and the figures first; the audit leads the details.
    assert titles[1:3] == ["Summary", "Figures"]
    assert titles.index("Privacy audit") < titles.index("Per-site results (training sites' test splits)")
    (section,) = [s for s in sections if s.startswith("Privacy audit")]
    rows = [line for line in section.splitlines() if line.startswith("| site-")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == training
    assert all(" | no DP | " in row for row in rows)

    # The same run with ε reported by the sites: each site's ε stands beside its attack results.
    run = tmp_path / "dp"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "baselines"))
    spent = {site: 0.5 + i for i, site in enumerate(training)}
    events = [
        {**e, "epsilon": spent[e["site"]] * e["round"]} if e["event"] == "train" else e
        for e in study["events"]
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    markdown, _ = write_report(run)
    (section,) = [s for s in re.split(r"\n## ", markdown.read_text()) if s.startswith("Privacy audit")]
    for site, eps in spent.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {site} |")]
        assert f" | {eps * ROUNDS:.3g} | " in row


def test_the_participation_section_names_every_site_left_out_of_a_round_and_why() -> None:
    from server.report import participation_section, render_markdown

    events = [
        {"event": "train", "round": 1, "site": "site-a"},
        {"event": "dropped", "round": 1, "site": "site-c", "stage": "training", "reason": "node lost"},
        {"event": "refused", "round": 2, "site": "site-b", "reason": "budget ε=1 would be exceeded"},
        {"event": "rejected", "round": 2, "site": "site-a", "reason": "update has NaN"},
    ]
    text = render_markdown("r", [participation_section(events)])
    assert "| 1 | site-c | dropped (training) | node lost |" in text
    assert "| 2 | site-b | refused | budget ε=1 would be exceeded |" in text
    assert "| 2 | site-a | rejected | update has NaN |" in text
    assert "site-a | dropped" not in text
    text = render_markdown("r", [participation_section(events[:1])])
    assert "Every training site contributed to every round." in text


def _markdown_sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in re.split(r"\n## ", text)[1:]}


def _table(section: str, first_cell: str) -> list[str]:
    """The cells of the row of a Markdown table whose first cell is ``first_cell``."""
    (row,) = [line for line in section.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in row.strip("|").split(" | ")]


@pytest.mark.slow
def test_the_summary_answers_first_from_evaluation_json(study) -> None:
    run, evaluation = study["run"], study["evaluation"]
    sites = {s["site"]: s for s in evaluation["sites"]}
    (unseen,) = [name for name, s in sites.items() if s["role"] == "holdout"]
    training = [name for name, s in sites.items() if s["role"] == "train"]

    def mean_dice(model: str, site: str) -> float:
        return float(
            np.mean(
                [r["mean_dice"] for r in evaluation["results"] if (r["model"], r["site"]) == (model, site)]
            )
        )

    summary = _markdown_sections((run / "report.md").read_text())["Summary"]
    assert _table(summary, "federated")[1].startswith(f"{mean_dice('federated', unseen):.3f}")
    local = {site: mean_dice(f"local-only:{site}", unseen) for site in training}
    best, worst = max(local, key=local.__getitem__), min(local, key=local.__getitem__)
    assert _table(summary, f"best local-only ({best})")[1].startswith(f"{local[best]:.3f}")
    assert _table(summary, f"worst local-only ({worst})")[1].startswith(f"{local[worst]:.3f}")
    pooled = _table(summary, "pooled")
    assert pooled[1].startswith(f"{mean_dice('pooled', unseen):.3f}") and "fewer than 6 pairs" in pooled[3]
    # evaluation.json scores no starting model: the summary says so rather than invent a number.
    assert "not scored" in _table(summary, "starting model (initial weights)")[1]
    chance = np.mean(list(sites[unseen]["chance_mean_dice"].values()))
    assert _table(summary, "chance level (random labels)")[1] == f"{chance:.3f}"
    assert "DP vs no DP: not applicable" in summary
    # Who took part: each training site's rounds, ε and membership-inference AUC, beside the unseen one.
    aucs = {g["name"]: g["auc"] for g in evaluation["membership_audit"]["sites"]}
    for site in training:
        assert _table(summary, site)[3:] == [f"{ROUNDS} of {ROUNDS}", "none", "no DP", f"{aucs[site]:.2f}"]
    assert _table(summary, unseen)[1] == "unseen"
    assert re.search(r"wall time \d+ (s|min)", summary)
    # The figures come next, the comparison per site first; the rest is collapsed in the HTML.
    figures = _markdown_sections((run / "report.md").read_text())["Figures"]
    assert "(figures/dice_per_site.png)" in figures and (run / "figures" / "dice_per_site.png").is_file()
    page = (run / "report.html").read_text()
    assert page.index('id="summary"') < page.index('id="figures"') < page.index("<details>")
    assert "<details open" not in page and page.count("<details>") == page.count("</details>")


@pytest.mark.slow
def test_the_summary_names_who_was_left_out_and_what_each_site_spent(study, tmp_path) -> None:
    from server.report import write_report

    run = tmp_path / "left-out"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "baselines"))
    training = [s["site"] for s in study["evaluation"]["sites"] if s["role"] == "train"]
    refusing, rejected = training[0], training[1]
    events = []
    for e in study["events"]:
        if e["event"] == "train" and e["site"] == refusing and e["round"] == 2:
            e = {**e, "event": "refused", "reason": "budget would be exceeded"}
        elif e["event"] == "train":
            e = {**e, "epsilon": 0.5 * e["round"]}
        events.append(e)
        if e["event"] == "train" and e["site"] == rejected and e["round"] == 1:
            events.append({"event": "rejected", "round": 1, "site": rejected, "reason": "update has NaN"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    markdown, _ = write_report(run)
    summary = _markdown_sections(markdown.read_text())["Summary"]
    assert _table(summary, refusing)[3:6] == [f"1 of {ROUNDS}", "refused (round 2)", "0.5"]
    assert _table(summary, rejected)[3:6] == [f"1 of {ROUNDS}", "rejected (round 1)", f"{0.5 * ROUNDS:.3g}"]
    assert "DP vs the same configuration without DP: not measured" in summary


@pytest.mark.slow
def test_the_summary_shows_further_models_that_evaluation_json_scored(study, tmp_path) -> None:
    """A starting model or a run without DP, where evaluation.json has them, get a row each beside the
    federated model, with the paired difference (here fabricated from the federated scores, shifted)."""
    from contract.evaluation import STARTING_KIND
    from server.report import write_report

    run = tmp_path / "more-models"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "baselines"))
    evaluation = json.loads((run / "evaluation.json").read_text())
    federated = [r for r in evaluation["results"] if r["model"] == "federated"]
    for name, kind, shift in (("initial", STARTING_KIND, -0.05), ("no-dp", "federated without DP", 0.02)):
        evaluation["models"].append({"name": name, "kind": kind})
        evaluation["results"] += [
            {**r, "model": name, "mean_dice": r["mean_dice"] + shift} for r in federated
        ]
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    markdown, _ = write_report(run)
    summary = _markdown_sections(markdown.read_text())["Summary"]
    assert _table(summary, "initial (starting model)")[2] == "+0.050"
    assert _table(summary, "no-dp (federated without DP)")[2] == "-0.020"
    assert "starting model (initial weights)" not in summary  # scored now, no placeholder row


def test_scans_already_on_the_working_grid_get_no_duplicate_own_grid_column(study, tmp_path) -> None:
    """Where each scan's own grid is the working grid (the demo's 2 mm data), the own-grid scores repeat the
    grid's: the report says so in a sentence instead of repeating the column and the per-class table."""
    from server.report import write_report

    run = tmp_path / "on-the-grid"
    shutil.copytree(study["run"], run, ignore=shutil.ignore_patterns("cache", "checkpoints", "baselines"))
    evaluation = json.loads((run / "evaluation.json").read_text())
    holdout = [r for r in evaluation["results"] if r["role"] == "holdout"]
    evaluation["native_results"] = [{**r, "mean_dice": r["mean_dice"] + 1e-5} for r in holdout]
    for ceiling in evaluation["native_ceiling"]:
        ceiling["mean_dice"] = 1.0
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    markdown, _ = write_report(run)
    text = markdown.read_text()
    assert "the same figures (the scans lie on the working grid)" in text
    assert "scan's own grid (" not in text and "as `neurofed segment` labels" not in text


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
PROBE = """<script>
addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect();
    return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; };
  const closed = (d) => [...d.children].every((c) => c.tagName === "SUMMARY" || !c.checkVisibility());
  document.body.setAttribute("data-probe", JSON.stringify({
    summary: box(document.getElementById("summary")),
    images: [...document.images].map((i) => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]),
    collapsed: [...document.querySelectorAll("details")].map((d) => !d.open && closed(d)),
  }));
});
</script>"""


@pytest.fixture(scope="module")
def browser() -> str:
    """A Chromium or Chrome on PATH; skips the test where none is (module-scoped and listed first, so
    before the run fixture is built)."""
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)})")
    return found


@pytest.mark.slow
def test_report_html_in_headless_chromium_loads_its_images_and_shows_the_summary_first(
    browser, study, tmp_path
) -> None:
    """A real browser at 1280x800: every image loads, the summary lies within the first screen, the
    detailed sections are closed."""
    import html
    import subprocess

    run, page = study["run"], tmp_path / "page"
    page.mkdir()
    for folder in ("figures", "qc"):  # what the report links to, relative to report.html
        shutil.copytree(run / folder, page / folder)
    probe = page / "report.html"
    probe.write_text((run / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,800",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    (found,) = re.findall(r'data-probe="([^"]*)"', dom)
    seen = json.loads(html.unescape(found))
    sources = re.findall(r'<img src="([^"]+)"', (run / "report.html").read_text())
    assert sorted(src for src, _ in seen["images"]) == sorted(sources)
    assert all(loaded for _, loaded in seen["images"]), [src for src, ok in seen["images"] if not ok]
    left, top, right, bottom = seen["summary"]
    assert 0 <= left and 0 <= top < bottom <= 800 and right <= 1280, seen["summary"]
    assert seen["collapsed"] and all(seen["collapsed"])
