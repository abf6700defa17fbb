"""RESULTS.md is made from the results.json files under results/, never by hand, and tells full cells apart."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

from fewshot.ledger import Revision, _paper_number, differences, ledger_markdown, load_presets
from fewshot.table import collect, main

REPO = Path(__file__).resolve().parents[1]


def test_results_md_is_regenerated_from_results(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the ledger names the folder it was made from, as `make ledger` gives it
    out = tmp_path / "RESULTS.md"
    assert main(["--ledger", "results", "-o", str(out)]) == 0
    assert out.read_text() == (REPO / "RESULTS.md").read_text(), "RESULTS.md is stale: run `make ledger`"


def _result(**changes) -> dict:
    base = {
        "name": "matching_omniglot_5w1s",
        "algo": "matching",
        "dataset": "omniglot",
        "backbone": "conv4_pool",
        "ways": 5,
        "shots": 1,
        "queries": 5,
        "seed": 3,
        "iterations": 20000,
        "device": "cuda (X)",
        "date": "2026-01-01T00:00:00Z",
        "train_seconds": 10.0,
        "command": "fewshot-train experiment=matching_omniglot_5w1s seed=3 device=cuda",
        "test": {"episodes": 1000, "acc_mean": 0.98, "acc_ci95": 0.002},
        "paper": {"source": "Vinyals et al. 2016", "acc": 98.1, "ci95": None},
    }
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def test_full_reduced_and_modified_runs_are_told_apart():
    preset = load_presets()["matching_omniglot_5w1s"]
    assert preset.iterations == 20000 and preset.episodes == 1000 and preset.paper_acc == 98.1
    assert differences(_result(), preset) == []
    assert differences(_result(iterations=500), preset) == ["500 of 20,000 iterations"]
    assert differences(_result(iterations=40000), preset) == ["40,000 of 20,000 iterations"]  # more is not it either
    assert differences(_result(command="fewshot-train experiment=matching_omniglot_5w1s seedx=1"), preset) == [
        "overrides seedx=1"  # neutral keys match whole: seed, device.name, hydra.run.dir; not seedx
    ]
    assert differences(_result(command=None), preset) == ["command not recorded"]
    modified = _result(command="fewshot-train experiment=matching_omniglot_5w1s algo.similarity=cosine seed=3")
    assert differences(modified, preset) == ["overrides algo.similarity=cosine"]


def test_a_setting_the_preset_changed_since_a_run_makes_that_run_modified(tmp_path):
    preset = dataclasses.replace(
        load_presets()["matching_omniglot_5w1s"],
        settings={"trainer.meta_lr": 0.001, "episode.ways": 5},
        revisions=(Revision("trainer.meta_lr", 0.0001, "2026-06-01T00:00:00Z"),),
    )
    before, after = _result(date="2026-05-31T23:59:59Z"), _result(date="2026-06-01T00:00:01Z")
    # results.json without `config`: the revision says what the file held at the run's date
    assert differences(before, preset) == ["trained with trainer.meta_lr=0.0001, the preset now 0.001"]
    assert differences(after, preset) == []
    # an override that restates the preset's value, however written, is the preset's own setting
    for value in ("0.001", "1e-3"):
        restated = _result(date=before["date"], command=before["command"] + f" trainer.meta_lr={value}")
        assert differences(restated, preset) == []
    other = _result(command=after["command"] + " trainer.meta_lr=0.01 ++episode.ways=5")
    assert differences(other, preset) == ["overrides trainer.meta_lr=0.01"]
    # results.json's `config` is the record: it outranks the dates, and keys the preset does not set are ignored
    config = {"trainer": {"meta_lr": 0.0001, "iterations": 20000}, "episode": {"ways": 5}, "algo": {"name": "x"}}
    assert differences({**after, "config": config}, preset) == [
        "trained with trainer.meta_lr=0.0001, the preset now 0.001"
    ]
    config["trainer"]["meta_lr"] = 0.001
    assert differences({**before, "config": config}, preset) == []
    # a config without the key falls back to the revisions
    assert differences({**before, "config": {"episode": {"ways": 5}}}, preset) == [
        "trained with trainer.meta_lr=0.0001, the preset now 0.001"
    ]
    # the preset's only full-budget run trained at the old value: "not yet run" says so
    (tmp_path / "before").mkdir()
    (tmp_path / "before" / "results.json").write_text(json.dumps(before))
    text = ledger_markdown(collect([tmp_path]), {preset.name: preset}, "runs")
    assert "| run at full budget, but trained with trainer.meta_lr=0.0001, the preset now 0.001 |" in text


def test_an_override_to_a_value_the_preset_once_held_shares_the_revisions_row(tmp_path):
    preset = dataclasses.replace(
        load_presets()["matching_omniglot_5w1s"],
        settings={"trainer.meta_lr": 0.001, "episode.ways": 5},
        revisions=(Revision("trainer.meta_lr", 0.0001, "2026-06-01T00:00:00Z"),),
    )
    old = "trained with trainer.meta_lr=0.0001, the preset now 0.001"
    before = _result(seed=1, date="2026-05-31T23:59:59Z")  # no override: the file held 0.0001 then
    asked = _result(seed=2, date="2026-06-02T00:00:00Z", command=_result()["command"] + " trainer.meta_lr=1e-4")
    assert differences(before, preset) == differences(asked, preset) == [old]
    other = _result(command=_result()["command"] + " trainer.meta_lr=0.0001 algo.similarity=cosine")
    assert differences(other, preset) == ["overrides algo.similarity=cosine", old]
    # the last override of a key is the one Hydra applied; results.json's config outranks the command
    twice = _result(command=_result()["command"] + " trainer.meta_lr=0.0001 trainer.meta_lr=0.01")
    assert differences(twice, preset) == ["overrides trainer.meta_lr=0.0001 trainer.meta_lr=0.01"]
    assert differences(_result(command=twice["command"] + " trainer.meta_lr=1e-4"), preset) == [old]
    config = {"trainer": {"meta_lr": 0.0001}, "episode": {"ways": 5}}
    assert differences({**asked, "config": config}, preset) == [old]
    config["trainer"]["meta_lr"] = 0.001
    assert differences({**asked, "config": config}, preset) == []
    # the revision's own value is written (5 and 5.0 alike); budget, neutral and unset keys keep their own words
    revised = dataclasses.replace(
        preset,
        settings={**preset.settings, "algo.scale": 10, "eval.meta_batch_size": 4, "algo.eval_inner_steps": 3},
        test_steps=3,
        revisions=(
            *preset.revisions,
            Revision("algo.scale", 5, "2026-06-01T00:00:00Z"),
            Revision("eval.meta_batch_size", 2, "2026-06-01T00:00:00Z"),
            Revision("algo.eval_inner_steps", 10, "2026-06-01T00:00:00Z"),
            Revision("algo.gone", 1, "2026-06-01T00:00:00Z"),
        ),
    )
    scaled = _result(date=asked["date"], command=_result()["command"] + " algo.scale=5.0")
    assert differences(scaled, revised) == ["trained with algo.scale=5, the preset now 10"]
    recorded = {"algo": {"scale": 5.0, "eval_inner_steps": 10}, "trainer": {"meta_lr": 0.001}}
    assert differences({**asked, "command": _result()["command"], "config": recorded}, revised) == [
        "trained with algo.scale=5, the preset now 10"  # the test's steps are the test's to say (tested_steps)
    ]
    batched = _result(date=asked["date"], command=_result()["command"] + " eval.meta_batch_size=2")
    assert differences(batched, revised) == []  # a batch size for the test: same numbers
    stepped = _result(date=asked["date"], command=_result()["command"] + " algo.eval_inner_steps=10")
    stepped["tested"] = {"inner_steps": 10}
    assert differences(stepped, revised) == ["tested after 10 inner steps, the preset after 3"]
    gone = _result(date=asked["date"], command=_result()["command"] + " algo.gone=1")
    assert differences(gone, revised) == ["overrides algo.gone=1"]
    for k, run in enumerate((before, asked)):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "results.json").write_text(json.dumps(run))
    text = ledger_markdown(collect([tmp_path]), {preset.name: preset}, "runs")
    (row,) = [line for line in text.splitlines() if f"| {old} |" in line]  # one row, both seeds
    assert "| 1, 2 |" in row


def test_neutral_and_group_overrides_of_a_preset_key_are_not_read_as_changed_settings():
    preset = dataclasses.replace(
        load_presets()["matching_omniglot_5w1s"],
        settings={"eval.meta_batch_size": 10, "trainer.val_every": 500, "trainer.meta_lr": 0.001},
    )
    config = {"eval": {"meta_batch_size": 2}, "trainer": {"val_every": 500, "meta_lr": 0.001}}
    neutral = _result(command=_result()["command"] + " eval.meta_batch_size=2")
    assert differences({**neutral, "config": config}, preset) == []  # a batch size for the test: same numbers
    config["trainer"]["val_every"] = 20
    smoke = _result(command=_result()["command"] + " eval.meta_batch_size=2 trainer=smoke")
    assert differences({**smoke, "config": config}, preset) == ["overrides trainer=smoke"]  # said once, as itself


def test_validation_settings_are_neutral_only_where_the_test_reads_the_final_weights(tmp_path):
    preset = load_presets()["reptile_omniglot_5w1s"]
    assert preset.test_weights == "last" and preset.settings["trainer.val_every"] == 2500
    command = "fewshot-train experiment=reptile_omniglot_5w1s seed={} device=cpu"

    def run(seed, val_every, tested="last.pt", ensemble=1, extra=""):
        config = {"trainer": {"val_every": val_every, "val_episodes": 200}, "eval": {"ensemble": ensemble}}
        return _result(
            name=preset.name,
            seed=seed,
            iterations=100000,
            command=command.format(seed) + extra,
            config=config,
            test={"episodes": 10000, "acc_mean": 0.97, "acc_ci95": 0.001},
            tested={"checkpoint": tested},
        )

    curve = run(2, 500, extra=" trainer.val_every=500 trainer.val_episodes=50")
    assert differences(run(1, 2500), preset) == differences(curve, preset) == []  # the same weights tested
    old = run(3, 500)  # from the file when it said 500 (no revision kept): the same weights tested
    assert differences(old, preset) == []
    best = run(4, 500, tested="best.pt", extra=" trainer.val_every=500")
    assert differences(best, preset) == [
        "tested best.pt, the preset tests last.pt",
        "overrides trainer.val_every=500",
    ]  # validation picked what was tested
    top = run(5, 500, ensemble=5, extra=" trainer.val_every=500 eval.ensemble=5")
    assert differences(top, preset) == ["overrides trainer.val_every=500 eval.ensemble=5"]
    for k, r in enumerate((run(1, 2500), curve, old)):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "results.json").write_text(json.dumps(r))
    full = ledger_markdown(collect([tmp_path]), load_presets(), "runs").split("## Reduced budget")[0]
    (row,) = [line for line in full.splitlines() if line.startswith("| reptile_omniglot_5w1s |")]
    assert "| 1, 2, 3 |" in row  # pooled: their recorded val_every differs, and it is no difference here


def test_seeds_that_restate_their_presets_value_are_pooled_as_the_cell(tmp_path):
    preset = load_presets()["matching_omniglot_5w1s"]
    lr = preset.settings["trainer.meta_lr"]
    restated = f"fewshot-train experiment={preset.name} seed=2 trainer.meta_lr={lr}"
    runs = [_result(seed=1), _result(seed=2, command=restated)]
    for k, run in enumerate(runs):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "results.json").write_text(json.dumps(run))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    full = text.split("## Reduced budget")[0]
    assert "| matching_omniglot_5w1s | 5-way 1-shot | 98.00 ± 0.00 † |" in full and "| 1, 2 |" in full


def test_every_preset_revision_names_a_key_the_preset_sets_and_a_utc_date():
    for preset in load_presets().values():
        assert preset.settings, preset.name
        for revision in preset.revisions:
            assert revision.key in preset.settings and revision.was != preset.settings[revision.key], preset.name
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", revision.until), (preset.name, revision)


def test_a_run_that_tested_other_weights_than_its_preset_is_not_the_cell(tmp_path):
    # maml_omniglot_5w1s tests the final weights (eval.weights=last); runs from before the setting tested best.pt
    preset = load_presets()["maml_omniglot_5w1s"]
    assert preset.test_weights == "last" and load_presets()["matching_omniglot_5w1s"].test_weights == "best"
    command = "fewshot-train experiment=maml_omniglot_5w1s seed=1 device=cuda"
    old = _result(
        name="maml_omniglot_5w1s",
        iterations=60000,
        command=command,
        test={"episodes": 600, "acc_mean": 0.99, "acc_ci95": 0.003},
    )
    new = {**old, "tested": {"checkpoint": "last.pt", "iteration": 60000}}
    assert differences(old, preset) == ["tested best.pt, the preset tests last.pt"]
    assert differences(new, preset) == []
    # Its test adapts with the paper's 3 steps; step_acc holds the score before adapting and after each step
    assert preset.test_steps == 3 and load_presets()["maml_omniglot_20w1s"].test_steps == 5
    ten = {**new, "test": {**new["test"], "step_acc": [0.2] + [0.99] * 10}}
    assert differences(ten, preset) == ["tested after 10 inner steps, the preset after 3"]
    assert differences({**new, "test": {**new["test"], "step_acc": [0.2, 0.98, 0.99, 0.99]}}, preset) == []
    # results.json's tested.inner_steps says it where step_acc cannot (Reptile reports no curve)
    reptile = load_presets()["reptile_omniglot_5w1s"]
    run = {**new, "name": reptile.name, "iterations": reptile.iterations, "tested": {"checkpoint": "last.pt"}}
    run["test"] = {"episodes": reptile.episodes, "acc_mean": 0.97, "acc_ci95": 0.003}
    run["command"] = "fewshot-train experiment=reptile_omniglot_5w1s seed=1 algo.eval_inner_steps=20"
    assert differences(run, reptile) == ["overrides algo.eval_inner_steps=20"]  # no record: said as an override
    run["tested"]["inner_steps"] = 20
    assert differences(run, reptile) == ["tested after 20 inner steps, the preset after 50"]
    run["tested"]["inner_steps"], run["command"] = 50, run["command"].replace("=20", "=50")
    assert differences(run, reptile) == []  # the preset's own steps, asked for again: the cell
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    assert "| maml_omniglot_5w1s | 5-way 1-shot | tested best.pt, the preset tests last.pt | 99.00 ± 0.30 |" in text
    assert (
        "| maml_omniglot_5w1s | 98.7 | Finn et al. 2017, Table 1 | run at full budget, but tested best.pt, the preset "
        "tests last.pt |" in text
    )


def test_ledger_sections(tmp_path):
    runs = [
        _result(),
        _result(seed=4, test={"episodes": 1000, "acc_mean": 0.97, "acc_ci95": 0.002}),
        _result(iterations=500, seed=5),
    ]
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    full, rest = text.split("## Reduced budget or modified")
    reduced, pending = rest.split("## Not yet run at full budget")
    assert "| matching_omniglot_5w1s | 5-way 1-shot | 97.50 ± " in full and "| 3, 4 |" in full  # two seeds pooled
    assert "500 of 20,000 iterations" in reduced and "| 5 |" in reduced
    assert "matching_omniglot_5w1s |" not in pending and "| protonet_omniglot_5w1s |" in pending
    assert "miniImageNet images are not on the machines" in pending


def test_a_rerun_of_a_seed_replaces_it_and_is_kept_apart(tmp_path):
    # the recorded date decides, not the file's time: a fresh clone gives every file the same time
    runs = {
        "b_old": _result(test={"episodes": 1000, "acc_mean": 0.95, "acc_ci95": 0.002}),
        "a_new": _result(date="2026-02-01T00:00:00Z", train_seconds=7.0),
    }
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    full, rest = text.split("## Reduced budget or modified")
    replaced = rest.split("## Replaced by a later run of the same seed")[1].split("## Not yet run")[0]
    assert "| 98.00 ± 0.20 |" in full and "| 7 |" in full and "95.00" not in full
    assert "| 95.00 ± 0.20 |" in replaced and "| 10 |" in replaced


def test_a_cell_trained_on_two_machines_names_both(tmp_path):
    """A run resumed on another GPU (train_devices) shows every device it ran on, once, in the device column."""
    runs = [_result(train_devices=["cuda (H100)", "cuda (H200)"], device="cuda (H200)"), _result(seed=4)]
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    full = ledger_markdown(collect([tmp_path]), load_presets(), "runs").split("## Reduced budget")[0]
    assert "| cuda (H100), cuda (H200), cuda (X) |" in full


def test_sequence_cells_are_set_beside_the_papers_instance_columns(tmp_path):
    """MANN's paper reports accuracy per instance of a class (Table 1), not one number: the ledger sets each
    instance's mean over seeds beside the paper's column, and says nothing where the paper has no column."""
    preset = load_presets()["mann_omniglot_5way"]
    assert preset.paper_acc is None and preset.paper_instance_acc[:2] == (36.4, 82.8)
    assert preset.paper_instance_acc[5] is None and preset.paper_instance_acc[9] == 98.1

    def mann(seed: int, first: float, extra: str = "") -> dict:
        curve = [first, 0.80, 0.90, 0.92, 0.94, 0.95, 0.96, 0.96, 0.97, 0.98]
        test = {"episodes": 1000, "acc_mean": 0.93, "acc_ci95": 0.003, "instance_acc": curve}
        command = f"fewshot-train experiment=mann_omniglot_5way seed={seed} device=cpu{extra}"
        return _result(
            name="mann_omniglot_5way", algo="mann", iterations=100000, seed=seed, command=command, test=test, date=date
        )

    date = max((r.until for r in preset.revisions), default="2026-01-01T00:00:00Z")  # at the settings as they stand

    variant = mann(1, 0.25, " algo.add_vector=true")
    runs = [mann(1, 0.30), mann(2, 0.40), _result(), variant]  # and a cell with no instances, and a variant
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    section = text.split("## Accuracy per instance")[1].split("## Reduced budget")[0]
    row = next(line for line in section.splitlines() if line.startswith("| mann_omniglot_5way"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["mann_omniglot_5way", "1, 2", "35.0 (36.4, -1.4)"]  # (30 + 40) / 2 against 36.4
    assert "| preset | seeds | instance 1 |" in section  # no differs-by column for the cells
    assert cells[3] == "80.0 (82.8, -2.8)" and cells[7] == "95.0" and cells[11] == "98.0 (98.1, -0.1)"
    assert "matching_omniglot_5w1s" not in section
    assert text.index("## Full budget") < text.index("## Accuracy per instance") < text.index("## Reduced budget")
    # The variant: in its own per-instance table after the modified runs, with what differs; not pooled above.
    assert "25.0" not in section
    modified = text.split("## Per instance, reduced budget or modified")[1].split("## Not yet run")[0]
    row = next(line for line in modified.splitlines() if line.startswith("| mann_omniglot_5way"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["mann_omniglot_5way", "overrides algo.add_vector=true", "1", "25.0 (36.4, -11.4)"]
    assert "| preset | differs by | seeds | instance 1 |" in modified and "matching" not in modified
    # No sequence run, or only a modified run that is no sequence: no per-instance table.
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "results.json").write_text(json.dumps(_result(iterations=500)))
    alone = ledger_markdown(collect([tmp_path / "2", tmp_path / "4"]), load_presets(), "runs")
    assert "500 of 20,000 iterations" in alone and "per instance" not in alone.lower()


def test_regression_cells_have_their_own_table(tmp_path):
    """A full-budget sinusoid run (test.metric "mse") is a cell like any other: it leaves the not-yet-run list and
    gets its own table, test MSE beside the MSE before adapting and after one step, never an accuracy column."""

    def sinusoid(seed: int, mse: float, **changes) -> dict:
        curve = [3.0, 0.4] + [mse] * 9  # before adapting and after each of the preset's 10 steps
        test = {"episodes": 600, "metric": "mse", "mse_mean": mse, "mse_ci95": 0.002, "step_mse": curve}
        command = f"fewshot-train experiment=maml_sinusoid_k10 seed={seed} device=cpu"
        run = dict(name="maml_sinusoid_k10", algo="maml", dataset="sinusoid", backbone="mlp_sinusoid", ways=1)
        run.update(shots=10, queries=100, iterations=70000, seed=seed, command=command, test=test, paper=None)
        run.update(tested={"checkpoint": "last.pt", "iteration": 70000})  # the preset tests the final weights
        return _result(**{**run, **changes})

    runs = [sinusoid(1, 0.02), sinusoid(2, 0.04), sinusoid(3, 0.5, iterations=8000), _result()]
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    text = ledger_markdown(collect([tmp_path]), load_presets(), "runs")
    full, regression = text.split("## Reduced budget")[0].split("## Regression")
    assert "sinusoid" not in full and "| matching_omniglot_5w1s | 5-way 1-shot | 98.00 ± 0.20 |" in full
    line = next(x for x in regression.splitlines() if x.startswith("| maml_sinusoid_k10"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == [
        "maml_sinusoid_k10",
        "10-shot regression",
        "0.0300 ± 0.1271 †",
        "10",
        "3.0000",
        "0.4000",
        "1, 2",
    ]
    reduced, pending = text.split("## Reduced budget")[1].split("## Not yet run at full budget")
    assert "| maml_sinusoid_k10 | 10-shot regression | 8,000 of 70,000 iterations | 0.5000 ± 0.0020 MSE |" in reduced
    assert "| maml_sinusoid_k10 |" not in pending and "| maml_sinusoid_k5 | – |" in pending


def test_a_run_on_another_split_than_its_preset_is_not_the_cell():
    # protonet_omniglot_5w1s trains on the 1200 train+val characters (omniglot_vinyals_trainval); runs before, on 1028
    preset = load_presets()["protonet_omniglot_5w1s"]
    assert preset.split == "vinyals_trainval" and load_presets()["matching_omniglot_5w1s"].split == "vinyals"
    run = _result(name="protonet_omniglot_5w1s", command="fewshot-train experiment=protonet_omniglot_5w1s seed=1")
    run["tested"] = {"checkpoint": "last.pt", "iteration": 20000}
    assert differences({**run, "dataset_split": "vinyals_trainval"}, preset) == []
    assert differences({**run, "dataset_split": "vinyals"}, preset) == [
        "trained on the vinyals split, the preset on vinyals_trainval"
    ]


def test_paper_numbers_keep_their_published_decimals(tmp_path):
    # YAML reads 43.40 as 43.4; the interval's decimals (0.78) say how the paper printed it
    text = ledger_markdown([], load_presets(), "runs")
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in text.splitlines() if line.startswith("| ")}
    assert rows["matching_miniimagenet_5w1s"] == "43.40" and rows["meta_lstm_miniimagenet_5w5s"] == "60.60"
    assert rows["maml_omniglot_5w1s"] == "98.7" and rows["reptile_omniglot_5w1s"] == "97.68"
    assert rows["maml_pp_omniglot_5w5s"] == "99.85" and rows["meta_sgd_omniglot_5w5s"] == "99.93"  # no interval
    assert _paper_number(0.5, 1e-05) == "0.50000" and _paper_number(99, 0.4) == "99.0"
