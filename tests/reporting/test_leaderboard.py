"""harness leaderboard: rows, ranks, the Pareto front, LoRA labels, training cost, the three files, refusals.

Runs are built from typed records (no image is generated): a teacher run, an eval run of a LoRA that a fake
`harness train` run folder wrote, one of a checkpoint of another training run, and a bench run of flash-lcm and
undistilled.
"""

import dataclasses
import json

import pytest
from PIL import Image

from harness.records.training_run import CONFIG_FILE as TRAIN_CONFIG
from harness.records.training_run import LOG_FILE as TRAIN_LOG
from harness.reporting.leaderboard import LEADERBOARD_JSON, LEADERBOARD_MD, LEADERBOARD_PLOT, build_leaderboard
from harness.reporting.runs import load_runs
from harness.reporting.training_cost import lora_name
from tests.conftest import invoke, make_record
from tests.reporting.test_compare import write_run

CONFIG = {"model": "embedded", "prompts": ["a red circle", "two blue squares"], "num_images": 2, "seed": 42,
          "warmup": 0, "repeats": 3}


def scored(sampler, steps, seconds, fidelity, *, lora=None, baseline=False, config=None, **metrics):
    """A successful record with fidelity (and any other metric) values and, optionally, the LoRA it loaded."""
    values = {"fidelity": fidelity, **metrics}
    record = make_record(sampler, steps, seconds, baseline=baseline, guidance_scale=7.5 if baseline else 0.0,
                         config=config or CONFIG,
                         metrics={name: {"value": value, "higher_is_better": True} for name, value in values.items()})
    info = {**record.measured.sampler_info, "lora": lora}
    return dataclasses.replace(record, measured=dataclasses.replace(record.measured, sampler_info=info))


def train_run(folder, trainer, logged):
    """A training run folder as harness train writes it: config.json, train_log.jsonl, lora/final."""
    (folder / "lora" / "final").mkdir(parents=True)
    (folder / "lora" / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (folder / TRAIN_CONFIG).write_text(json.dumps({"trainer": trainer, "config": {"max_steps": logged[-1][0]},
                                                   "resolved": {}, "environment": {}}, indent=2) + "\n")
    (folder / TRAIN_LOG).write_text("".join(json.dumps({"step": step, "loss": 0.1, "lr": 1e-4, "seconds": seconds})
                                            + "\n" for step, seconds in logged))
    return folder


@pytest.fixture
def runs(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    distill = train_run(checkpoints / "distill", "distill", [(step, step * 3.0) for step in range(1, 101)])
    lcm = train_run(checkpoints / "lcm", "lcm", [(step, step * 0.5) for step in range(1, 1001)])
    (lcm / "lora" / "checkpoint-500").mkdir()
    teacher = scored("vanilla-sd", 30, 2.0, 0.90, baseline=True)
    folders = {
        "teacher": write_run(tmp_path / "teacher", [teacher]),
        "distill": write_run(tmp_path / "distill", [
            scored("vanilla-sd", 30, 2.5, 0.90, baseline=True),  # eval's own baseline: shown once, the teacher's
            *[scored("local-student", steps, seconds, value, lora=str(distill / "lora" / "final"), psnr=psnr)
              for steps, seconds, value, psnr in [(1, 0.05, 0.50, 20.0), (2, 0.10, 0.70, 22.0),
                                                  (4, 0.20, 0.80, 24.0), (8, 0.40, 0.85, 25.0)]]]),
        "lcm": write_run(tmp_path / "lcm", [
            scored("local-student", steps, seconds, value, lora=str(lcm / "lora" / "checkpoint-500"))
            for steps, seconds, value in [(2, 0.10, 0.60), (4, 0.25, 0.70)]]),
        "flash": write_run(tmp_path / "flash", [
            scored("flash-lcm", 2, 0.08, 0.75, lora="jasperai/flash-sd"),
            scored("flash-lcm", 4, 0.18, 0.82, lora="jasperai/flash-sd"),
            scored("undistilled", 4, 0.15, 0.30),
            make_record("undistilled", 8, error="RuntimeError: out of memory", config=CONFIG)]),
    }
    return folders


def board(folders, *names, metric="fidelity", labels=None):
    warnings = []
    runs = load_runs([folders[name] for name in names or folders], warnings.append)
    return build_leaderboard(runs, metric, labels, warnings.append), warnings


def row(leaderboard, label, steps):
    (found,) = [r for r in leaderboard.rows if r.label == label and r.steps == steps]
    return found


def test_ranks_per_step_count_best_first(runs):
    leaderboard, _ = board(runs)
    at_4 = [(r.label, r.rank) for r in leaderboard.rows if r.steps == 4]
    assert at_4 == [("flash-lcm (flash-sd)", 1), ("local-student (distill)", 2),
                    ("local-student (lcm checkpoint-500)", 3), ("undistilled", 4)]
    at_2 = [(r.label, r.rank) for r in leaderboard.rows if r.steps == 2]
    assert at_2 == [("flash-lcm (flash-sd)", 1), ("local-student (distill)", 2),
                    ("local-student (lcm checkpoint-500)", 3)]
    assert row(leaderboard, "local-student (distill)", 1).rank == 1  # alone at its step count


def test_baseline_is_shown_once_on_top_from_the_first_run(runs):
    leaderboard, _ = board(runs)
    baselines = [r for r in leaderboard.rows if r.baseline]
    assert leaderboard.rows[0] is baselines[0] and len(baselines) == 1
    assert (baselines[0].label, baselines[0].steps, baselines[0].seconds_per_image) == ("vanilla-sd", 30, 2.0)
    assert baselines[0].run == str(runs["teacher"])
    assert [r.steps for r in leaderboard.rows] == [30, 1, 2, 2, 2, 4, 4, 4, 4, 8]


def test_lower_is_better_ranks_the_other_way(runs, tmp_path):
    lower = {name: {"value": value, "higher_is_better": False} for name, value in [("lpips", 0.2)]}
    folder = write_run(tmp_path / "lower", [
        make_record("flash-lcm", 4, 0.1, config=CONFIG, metrics=lower),
        make_record("undistilled", 4, 0.1, config=CONFIG, metrics={"lpips": {**lower["lpips"], "value": 0.5}})])
    leaderboard = build_leaderboard(load_runs([folder], print), "lpips")
    assert not leaderboard.higher_is_better
    assert [(r.sampler, r.rank) for r in leaderboard.rows] == [("flash-lcm", 1), ("undistilled", 2)]


def test_ties_share_the_better_rank(tmp_path):
    folder = write_run(tmp_path / "ties", [scored("flash-lcm", 4, 0.1, 0.8), scored("undistilled", 4, 0.2, 0.8),
                                           scored("local-student", 4, 0.3, 0.5, lora="x/RUN/lora/final")])
    leaderboard = build_leaderboard(load_runs([folder], print), "fidelity")
    assert [r.rank for r in leaderboard.rows] == [1, 1, 3]


def test_pareto_front_leaves_out_dominated_points(runs):
    leaderboard, _ = board(runs)
    front = {(r.label, r.steps) for r in leaderboard.rows if r.pareto}
    # fastest first: distill 1 step, flash 2, flash 4 (0.18 s, 0.82), distill 8 (0.40 s, 0.85), the teacher (0.90)
    assert front == {("local-student (distill)", 1), ("flash-lcm (flash-sd)", 2), ("flash-lcm (flash-sd)", 4),
                     ("local-student (distill)", 8), ("vanilla-sd", 30)}
    # Slower and worse than flash-lcm at 4 steps (0.18 s, 0.82): dominated.
    assert not row(leaderboard, "local-student (lcm checkpoint-500)", 4).pareto
    assert not row(leaderboard, "undistilled", 4).pareto  # faster than flash 4, but worse than flash 2, faster still


@pytest.mark.parametrize("location, name", [
    ("/home/me/checkpoints/distill/lora/final", "distill"),
    ("checkpoints/distill/lora/final/pytorch_lora_weights.safetensors", "distill"),
    ("./checkpoints/lcm/lora/checkpoint-500", "lcm checkpoint-500"),
    ("jasperai/flash-sd", "flash-sd"),
    ("/opt/harness/models/weights/tiny-sd-flash-lora", "tiny-sd-flash-lora"),
    ("final", "final"),
])
def test_lora_names_come_from_the_training_run_folder(location, name):
    assert lora_name(location) == name


def test_labels_and_overrides(runs):
    leaderboard, _ = board(runs)
    assert list(dict.fromkeys(r.label for r in leaderboard.rows)) == [
        "vanilla-sd", "local-student (distill)", "flash-lcm (flash-sd)", "local-student (lcm checkpoint-500)",
        "undistilled"]
    result = invoke("leaderboard", *runs.values(), "--outdir", runs["teacher"].parent / "out",
                    "--label", f"{runs['lcm']}=lcm-500", "--label", f"{runs['teacher']}=teacher",
                    "--label", f"my student={runs['distill']}")  # NAME=RUN_DIR is understood too
    assert result.exit_code == 0, result.output
    labels = {r["label"] for r in json.loads((runs["teacher"].parent / "out" / LEADERBOARD_JSON).read_text())["rows"]}
    assert {"vanilla-sd (teacher)", "local-student (my student)", "local-student (lcm-500)",
            "flash-lcm (flash-sd)"} <= labels
    bad = invoke("leaderboard", runs["teacher"], "--label", "elsewhere=x", "--outdir", runs["teacher"].parent / "o2")
    assert bad.exit_code == 2 and bad.output.startswith("Error: --label 'elsewhere=x' does not name one of the runs")
    assert not (runs["teacher"].parent / "o2").exists()


def test_the_same_entry_in_two_runs_is_told_apart_by_run(runs, tmp_path):
    again = write_run(tmp_path / "again", [scored("undistilled", 4, 0.16, 0.31)])
    leaderboard = build_leaderboard(load_runs([runs["flash"], again], print), "fidelity")
    assert {r.label for r in leaderboard.rows if r.sampler == "undistilled"} == {"undistilled [flash]",
                                                                                 "undistilled [again]"}


def test_training_cost_from_the_train_run_folder(runs):
    leaderboard, _ = board(runs)
    final = row(leaderboard, "local-student (distill)", 4).training
    assert (final.trainer, final.steps, final.seconds) == ("distill", 100, 300.0)
    assert final.minutes == pytest.approx(5.0) and final.steps_per_s == pytest.approx(1 / 3)
    checkpoint = row(leaderboard, "local-student (lcm checkpoint-500)", 2).training
    assert (checkpoint.trainer, checkpoint.steps, checkpoint.seconds) == ("lcm", 500, 250.0)  # not the whole run
    assert checkpoint.steps_per_s == pytest.approx(2.0)
    assert row(leaderboard, "flash-lcm (flash-sd)", 2).training is None  # a hub LoRA: unknown
    assert row(leaderboard, "undistilled", 4).training is None


def test_a_relative_lora_path_is_found_from_where_the_eval_ran(tmp_path, monkeypatch):
    project = tmp_path / "project"
    train_run(project / "checkpoints" / "mine", "distill", [(10, 60.0)])
    config = {**CONFIG, "outdir": "runs/mine"}
    (project / "runs").mkdir()
    folder = write_run(project / "runs" / "mine",
                       [scored("local-student", 4, 0.2, 0.8, lora="checkpoints/mine/lora/final", config=config)])
    monkeypatch.chdir(tmp_path)  # not where the eval ran: the path is found through the run's --outdir
    (entry,) = build_leaderboard(load_runs([folder.relative_to(tmp_path)], print), "fidelity").rows
    assert (entry.label, entry.training.steps, entry.training.minutes) == ("local-student (mine)", 10, 1.0)


def test_writes_the_three_files_and_prints_the_table(runs, tmp_path):
    out = tmp_path / "board"
    result = invoke("leaderboard", *runs.values(), "--metric", "fidelity", "--outdir", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [LEADERBOARD_JSON, LEADERBOARD_MD, LEADERBOARD_PLOT]
    assert "Warning: '" in result.output and "undistilled at 8 steps failed" in result.output
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["rank", "entry", "steps", "guidance", "s/image", "fidelity", "psnr", "Pareto", "train steps",
                      "train min", "train steps/s"]
    first = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert first[:6] == ["1", "vanilla-sd (baseline)", "30", "7.5", "2", "0.9"]
    distill_4 = next(line for line in table if "local-student (distill)" in line and "| 4 " in line)
    assert [cell.strip() for cell in distill_4.strip("|").split("|")][5:] == ["0.8", "24", "", "100", "5.0", "0.333"]
    markdown = (out / LEADERBOARD_MD).read_text()
    assert "\n".join(table) in markdown and f"]({LEADERBOARD_PLOT})" in markdown
    document = json.loads((out / LEADERBOARD_JSON).read_text())
    assert (document["metric"], document["higher_is_better"]) == ("fidelity", True)
    assert document["runs"] == [str(path) for path in runs.values()]
    assert len(document["rows"]) == 10
    student = next(r for r in document["rows"] if r["label"] == "local-student (distill)" and r["steps"] == 8)
    assert student["rank"] == 1 and student["pareto"] and student["value"] == 0.85
    assert student["metrics"] == {"fidelity": 0.85, "psnr": 25.0}
    assert student["training"]["steps"] == 100 and student["training"]["trainer"] == "distill"
    with Image.open(out / LEADERBOARD_PLOT) as image:
        assert image.format == "PNG" and image.size[0] >= 400


def test_existing_outdir_keeps_its_other_files_and_default_outdir_is_new(runs, tmp_path, monkeypatch):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert invoke("leaderboard", runs["flash"], "--outdir", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [LEADERBOARD_JSON, LEADERBOARD_MD, LEADERBOARD_PLOT, "notes.txt"]
    monkeypatch.chdir(tmp_path)
    assert invoke("leaderboard", runs["flash"]).exit_code == 0  # the first metric with values: fidelity
    (made,) = (tmp_path / "results").iterdir()
    assert made.name.endswith("-leaderboard") and (made / LEADERBOARD_JSON).is_file()


@pytest.mark.parametrize("config, message", [
    ({**CONFIG, "seed": 7}, "(seed 42 against 7)"),
    ({**CONFIG, "prompts": ["a red circle", "a green star"]},
     "(prompt 2: 'two blue squares' against 'a green star')"),
    ({**CONFIG, "prompts": ["a red circle"]}, "(2 against 1 prompts)"),
    ({**CONFIG, "num_images": 4}, "(2 against 4 image(s) per prompt)"),
])
def test_runs_of_other_prompts_or_seeds_are_refused(runs, tmp_path, config, message):
    other = write_run(tmp_path / "other", [scored("flash-lcm", 4, 0.1, 0.9, config=config)])
    out = tmp_path / "out"
    result = invoke("leaderboard", runs["teacher"], runs["flash"], other, "--outdir", out)
    assert result.exit_code == 2
    assert result.output == (f"Error: runs '{runs['teacher']}' and '{other}' did not score the same prompts and "
                             f"seeds {message}; rerun '{other}' with the --prompts, --seed and --num_images of "
                             f"'{runs['teacher']}'.\n")
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (("--metric", "clip"), "no record of these runs has a value for metric 'clip'; they have fidelity, psnr: pass"),
    (("--metric", "psnr"), None),  # psnr exists: accepted
])
def test_unknown_metric_is_refused(runs, tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke("leaderboard", runs["teacher"], runs["distill"], *args, "--outdir", out)
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and result.output.startswith(f"Error: {message}")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_metric_that_only_failed_says_why(tmp_path):
    folder = write_run(tmp_path / "run", [make_record("flash-lcm", 4, 0.1, config=CONFIG,
                                                      metrics={"fidelity": {"error": "not a shapes prompt"}})])
    result = invoke("leaderboard", folder, "--metric", "fidelity", "--outdir", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.startswith("Error: no record of these runs has a value for metric 'fidelity' (e.g. "
                                    "'not a shapes prompt'); evaluate the runs with --metric fidelity (they have no "
                                    "metric value at all).\n")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "missing' does not exist; pass a run folder"),
    (lambda tmp: write_run(tmp / "empty", []), "empty' holds no records"),
    (lambda tmp: write_run(tmp / "twice", [scored("flash-lcm", 4, 0.1, 0.9), scored("flash-lcm", 4, 0.2, 0.9)]),
     "twice' measures flash-lcm at 4 steps twice"),
])
def test_bad_runs_are_refused_in_one_line(runs, tmp_path, make, message):
    out = tmp_path / "out"
    result = invoke("leaderboard", runs["teacher"], make(tmp_path), "--outdir", out)
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_the_same_run_twice_is_refused(runs, tmp_path):
    result = invoke("leaderboard", runs["teacher"], runs["teacher"] / "records.jsonl", "--outdir", tmp_path / "out")
    assert result.exit_code == 2 and "is the same run as" in result.output


def test_infinite_values_rank_first_and_stay_out_of_the_plot_and_strict_json(tmp_path):
    folder = write_run(tmp_path / "same", [scored("flash-lcm", 4, 0.1, float("inf")),
                                           scored("undistilled", 4, 0.1, 0.5)])
    out = tmp_path / "out"
    out.mkdir()
    (out / LEADERBOARD_PLOT).write_bytes(b"an earlier leaderboard's plot")
    assert invoke("leaderboard", folder, "--outdir", out).exit_code == 0
    rows = json.loads((out / LEADERBOARD_JSON).read_text())["rows"]
    assert [(r["label"], r["rank"], r["value"]) for r in rows] == [("flash-lcm", 1, "inf"), ("undistilled", 2, 0.5)]
    assert (out / LEADERBOARD_PLOT).read_bytes() != b"an earlier leaderboard's plot"
    only_inf = write_run(tmp_path / "inf", [scored("flash-lcm", 4, 0.1, float("inf"))])
    assert invoke("leaderboard", only_inf, "--outdir", out).exit_code == 0
    assert not (out / LEADERBOARD_PLOT).exists()  # nothing finite to plot: the earlier plot does not stay
    assert LEADERBOARD_PLOT not in (out / LEADERBOARD_MD).read_text()
