"""The embedded lab's scripts: which LoRA ships (lab_winner.py) and the issue's targets table (lab_targets.py)."""

import dataclasses
import json

import pytest

from harness.records.store import append_record
from tests.conftest import load_script, make_record

TEACHER = (0.70, 0.60)
UNDISTILLED = {1: (0.12, 0.30), 2: (0.30, 0.35), 4: (0.50, 0.45)}


def add_row(folder, sampler, steps, fidelity=None, coverage=None, baseline=False, lora=None):
    """Append one successful record, with fidelity and coverage values unless they are None."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = None if fidelity is None else {"fidelity": {"value": fidelity}, "coverage": {"value": coverage}}
    record = make_record(sampler, steps, baseline=baseline, metrics=metrics)
    info = {**record.measured.sampler_info, "lora": lora}
    record = dataclasses.replace(record, measured=dataclasses.replace(record.measured, sampler_info=info))
    append_record(folder / "records.jsonl", record)


def write_run(folder, lora_sampler="flash-lcm", lora=None, teacher=TEACHER, undistilled=None):
    """A lab run folder: the teacher as baseline (unless None), undistilled and one LoRA sampler."""
    if teacher is not None:
        add_row(folder, "vanilla-sd", 30, *teacher, baseline=True)
    for steps, figures in (UNDISTILLED if undistilled is None else undistilled).items():
        add_row(folder, "undistilled", steps, *figures)
    for steps, figures in (lora or {}).items():
        add_row(folder, lora_sampler, steps, *figures)
    return folder


def run_targets(capsys, *folders):
    status = load_script("lab_targets").main([str(folder) for folder in folders])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_targets_table_reports_each_target_met_or_missed(tmp_path, capsys):
    # At 2 steps: 0.15 below the teacher (missed), 0.25 above undistilled (met), coverage 0.05 off (met).
    # At 4 steps: 0.04 below (met), 0.16 above undistilled (missed), coverage 0.15 off (missed).
    run = write_run(tmp_path / "fresh", lora={2: (0.55, 0.55), 4: (0.66, 0.45)})
    status, out, _ = run_targets(capsys, run)
    assert status == 0
    met = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[1]
           for line in out.splitlines() if line.startswith("| ") and not line.startswith("| target")}
    assert met == {
        "teacher fidelity at least 0.90": "no",
        "undistilled at 1 step at least 0.25 below the teacher": "yes",
        "undistilled at 2 steps at least 0.25 below the teacher": "yes",
        "LoRA at 2 steps within 0.05 of the teacher": "no",
        "LoRA at 2 steps at least 0.20 above undistilled": "yes",
        "LoRA coverage at 2 steps within 0.10 of the teacher's": "yes",
        "LoRA at 4 steps within 0.05 of the teacher": "yes",
        "LoRA at 4 steps at least 0.20 above undistilled": "no",
        "LoRA coverage at 4 steps within 0.10 of the teacher's": "no",
    }
    assert "| teacher fidelity at least 0.90 | 0.700 | no |" in out
    assert "| LoRA at 2 steps within 0.05 of the teacher | 0.150 below | no |" in out
    assert out.rstrip().endswith("5 of 9 targets met.")
    assert "(flash-lcm)" in out.splitlines()[0]


def test_the_targets_hold_for_a_lab_that_meets_them_across_folders(tmp_path, capsys):
    teacher = write_run(tmp_path / "teacher", teacher=(0.95, 0.60), undistilled={1: (0.2, 0.3), 2: (0.6, 0.4),
                                                                                  4: (0.7, 0.5)})
    lora = write_run(tmp_path / "lora", lora_sampler="local-student", lora={2: (0.92, 0.62), 4: (0.93, 0.58)},
                     teacher=None, undistilled={})
    status, out, _ = run_targets(capsys, teacher, lora)
    assert status == 0
    assert out.rstrip().endswith("9 of 9 targets met.") and "| no |" not in out


@pytest.mark.parametrize(("change", "message"), [
    (dict(teacher=None), "no teacher row"),
    (dict(undistilled={1: (0.1, 0.3), 4: (0.5, 0.4)}), "no undistilled row at [2] steps"),
    (dict(lora={2: (0.5, 0.5)}), "flash-lcm needs rows at (2, 4) steps; it has [2]"),
    (dict(lora={}), "the runs hold 0 LoRA samplers (none); pass runs with exactly one"),
])
def test_a_lab_without_a_figure_is_refused_in_one_line(tmp_path, capsys, change, message):
    folder = write_run(tmp_path / "run", **{"lora": {2: (0.5, 0.5), 4: (0.6, 0.5)}, **change})
    status, out, err = run_targets(capsys, folder)
    assert status == 1 and out == ""
    assert err.startswith("lab_targets: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_two_lora_samplers_and_a_run_without_the_metrics_are_refused(tmp_path, capsys):
    first = write_run(tmp_path / "a", lora={2: (0.5, 0.5), 4: (0.6, 0.5)})
    second = write_run(tmp_path / "b", lora_sampler="local-student", lora={2: (0.5, 0.5)}, teacher=None,
                       undistilled={})
    status, _, err = run_targets(capsys, first, second)
    assert status == 1 and "the runs hold 2 LoRA samplers (flash-lcm, local-student)" in err
    bare = tmp_path / "bare"
    add_row(bare, "vanilla-sd", 30, baseline=True)
    status, _, err = run_targets(capsys, bare)
    assert status == 1 and "vanilla-sd at 30 steps has no fidelity and coverage values" in err


def test_two_loras_sampled_by_the_same_sampler_are_two_entries_not_one(tmp_path, capsys):
    lab = write_run(tmp_path / "lab", lora={})
    for name, fidelity in (("lcm", 0.5), ("flash", 0.6)):
        for steps in (2, 4):
            add_row(tmp_path / name, "local-student", steps, fidelity, 0.5, lora=f"/w/{name}_lora/lora/final")
    status, out, err = run_targets(capsys, lab, tmp_path / "lcm", tmp_path / "flash")
    assert status == 1 and out == ""
    assert ("the runs hold 2 LoRA samplers (local-student with /w/flash_lora/lora/final, local-student with "
            "/w/lcm_lora/lora/final); pass runs with exactly one") in err
    status, out, _ = run_targets(capsys, lab, tmp_path / "lcm")
    assert status == 0 and "| LoRA at 2 steps at least 0.20 above undistilled | 0.200 above |" in out

def leaderboard_row(sampler, steps, fidelity, coverage, lora=None, baseline=False):
    return {"sampler": sampler, "steps": steps, "baseline": baseline, "lora": lora, "value": fidelity,
            "metrics": {"fidelity": fidelity, "coverage": coverage}}


def test_the_winner_meets_most_targets_before_the_best_mean_fidelity(tmp_path, capsys, monkeypatch):
    rows = [leaderboard_row("vanilla-sd", 30, 0.70, 0.60, baseline=True),
            leaderboard_row("undistilled", 2, 0.30, 0.35), leaderboard_row("undistilled", 4, 0.50, 0.45)]
    # "steady" meets 4 of the 6 targets (the 2-step gain and the 4-step gap, coverage at both), mean 0.585;
    # "sharp" has the better mean (0.600) but meets 2 (the 4-step gap and gain; its coverage is 0.20 off).
    loras = {"steady": {2: (0.51, 0.57), 4: (0.66, 0.58)}, "sharp": {2: (0.49, 0.40), 4: (0.71, 0.40)}}
    for name, by_steps in loras.items():
        rows += [leaderboard_row("local-student", steps, fidelity, coverage, lora=f"/work/{name}_lora/lora/final")
                 for steps, (fidelity, coverage) in by_steps.items()]
    board = tmp_path / "leaderboard.json"
    board.write_text(json.dumps({"metric": "fidelity", "rows": rows}))
    monkeypatch.setattr("sys.argv", ["lab_winner.py", str(board), "steady", "sharp"])
    load_script("lab_winner").main()
    out, err = capsys.readouterr()
    assert out.strip() == "steady"
    assert "steady: 4 of 6 targets met, mean fidelity 0.585" in err
    assert "sharp: 2 of 6 targets met, mean fidelity 0.600" in err
