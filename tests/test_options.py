"""Option parsing of `harness bench`: the seed's spellings, click's spellings, multi-value flags."""

import json

import pytest

from harness.cli.support import expand_multi_value
from tests.conftest import invoke


def plan(*args):
    result = invoke("bench", "--dry-run", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--steps", "2", "4", "8"], ["--steps", "2", "--steps", "4", "--steps", "8"]),
        (["--steps=2", "4"], ["--steps=2", "--steps", "4"]),
        (["--steps", "2", "--seed", "1"], ["--steps", "2", "--seed", "1"]),
        (["--steps", "-1"], ["--steps", "-1"]),
        (["--steps", "2", "--", "4"], ["--steps", "2", "--", "4"]),
        (["--seed", "2", "4"], ["--seed", "2", "4"]),
    ],
)
def test_expand_multi_value(args, expected):
    assert expand_multi_value(args, {"--steps"}) == expected


def test_steps_take_several_values_after_one_flag():
    tasks = plan("--steps", "2", "4", "8", "--seed", "42")["tasks"]
    assert [(t["sampler"], t["steps"]) for t in tasks] == [("flash-lcm", 2), ("flash-lcm", 4), ("flash-lcm", 8)]


def test_repeated_flags_and_several_samplers_give_the_same_plan():
    one_flag = plan("--sampler", "flash-lcm", "vanilla-sd", "--steps", "2", "4")
    repeated = plan("-s", "flash-lcm", "--sampler", "vanilla-sd", "--steps", "2", "--steps", "4")
    assert one_flag["tasks"] == repeated["tasks"]
    # Baselines run first at --baseline_steps with --baseline_guidance, into baseline/.
    assert one_flag["tasks"][0] == {"sampler": "vanilla-sd", "steps": 30, "guidance_scale": 7.5,
                                    "baseline": True, "folder": "baseline", "file_label": "vanilla-sd"}


@pytest.mark.parametrize("spelling", ["seed", "click"])
def test_seed_and_click_spellings_are_equivalent(spelling):
    names = {"num_images": "--num_images", "compare_baseline": "--compare_baseline",
             "baseline_steps": "--baseline_steps", "baseline_guidance": "--baseline_guidance",
             "baseline_outdir": "--baseline_outdir", "lora_path": "--lora_path", "lora_id": "--lora_id"}
    if spelling == "click":
        names = {key: flag.replace("_", "-") for key, flag in names.items()}
    result = plan(names["num_images"], "3", names["compare_baseline"], names["baseline_steps"], "20",
                  names["baseline_guidance"], "5", names["baseline_outdir"], "out/base",
                  names["lora_path"], "some/lora", names["lora_id"], "me/lora", "--outdir", "out")
    spec = result["spec"]
    assert spec["num_images"] == 3
    assert spec["baseline_steps"] == 20 and spec["baseline_guidance"] == 5.0
    assert spec["lora_path"] == "some/lora" and spec["lora_id"] == "me/lora"
    assert spec["samplers"] == ["flash-lcm", "vanilla-sd"]  # --compare_baseline adds the baseline
    assert result["tasks"][0]["folder"] == "base"  # --baseline_outdir, relative to --outdir


def test_seed_defaults():
    spec = plan()["spec"]
    assert spec["steps"] == [2, 4, 8]
    assert spec["num_images"] == 1
    assert spec["seed"] is None
    assert spec["baseline_steps"] == 30 and spec["baseline_guidance"] == 7.5
    assert spec["samplers"] == ["flash-lcm"]
    assert spec["model"] == "embedded"  # no CUDA on the test machines
    assert spec["outdir"].startswith("results/")


def test_prompt_file_lines_and_jsonl(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert plan("--prompts", lines)["spec"]["prompts"] == ["a red circle", "a blue square"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "id": 2}\n', encoding="utf-8")
    assert plan("--prompts", jsonl)["spec"]["prompts"] == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "'--steps': 0 is not in the range 1<=x<=10000"),
        (["--steps", "-2"], "'--steps': -2 is not in the range 1<=x<=10000"),
        (["--steps", "two"], "'two' is not a valid integer"),
        (["--num_images", "0"], "0 is not in the range x>=1"),
        (["--baseline_guidance", "-1"], "-1.0 is not in the range 0<=x<=100.0"),
        (["--height", "100"], "--height 100 is not a multiple of 8; pick e.g. 96."),
        (
            ["--sampler", "nope"],
            "unknown sampler 'nope'; known samplers: dpm-solver, flash-lcm, local-student, tcd, undistilled, "
            "vanilla-sd.",
        ),
        (["--prompt", "x", "--prompts", "p.txt"], "pass either --prompt or --prompts, not both."),
        (["--prompt", "   "], "--prompt is empty"),
    ],
)
def test_bad_options_give_one_clear_error(args, message):
    result = invoke("bench", "--dry-run", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_empty_prompt_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    result = invoke("bench", "--dry-run", "--prompts", empty)
    assert result.exit_code == 2
    assert f"prompt file '{empty}' holds no prompts" in result.output


def test_eval_is_bench_with_the_student_against_the_baseline():
    result = invoke("eval", "--dry-run", "--lora_path", "ckpt/lora/final", "--steps", "2", "4", "8", "--seed", "42")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    assert planned["spec"]["samplers"] == ["local-student", "vanilla-sd"]
    assert [(t["sampler"], t["steps"], t["guidance_scale"]) for t in planned["tasks"]] == [
        ("vanilla-sd", 30, 7.5),
        ("local-student", 2, 0.0),
        ("local-student", 4, 0.0),
        ("local-student", 8, 0.0),
    ]


def test_built_in_prompt_sets(tmp_path, monkeypatch):
    from harness.benchmark.prompts import SEED_PROMPTS
    from harness.lab import scenes, shapes

    held_out = plan("--prompts", "held-out")["spec"]["prompts"]
    assert held_out == scenes.held_out_prompts() and len(held_out) == 64
    assert all(scenes.parse(prompt).is_held_out() for prompt in held_out)
    closed = plan("--prompts", "held-out-closed")["spec"]["prompts"]
    assert closed == shapes.held_out_prompts() and len(closed) == 64
    assert all(shapes.is_held_out(shapes.parse_caption(prompt)) for prompt in closed)
    assert plan("--prompts", "seed")["spec"]["prompts"] == list(SEED_PROMPTS)
    # A user's file of the same name is never shadowed by a built-in set.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held-out").write_text("my own prompt\n", encoding="utf-8")
    assert plan("--prompts", "held-out")["spec"]["prompts"] == ["my own prompt"]


def test_unknown_prompt_set_names_the_sets():
    result = invoke("bench", "--dry-run", "--prompts", "no-such-set")
    assert result.exit_code == 2
    assert "--prompts 'no-such-set' is neither a file nor a built-in prompt set" in result.output
    assert "held-out, held-out-closed, seed" in result.output


@pytest.mark.parametrize("args, expected", [
    ([], (True, True)),
    (["--no-zero-terminal-snr"], (False, True)),
    (["--no_zero_terminal_snr", "--no_cache_latents"], (False, False)),
    (["--no-cache-latents", "--cache_latents"], (True, True)),  # the last one given wins, as in click
])
def test_a_switch_that_is_on_by_default_can_be_turned_off(args, expected):
    import click
    from click.testing import CliRunner
    from harness_plugins.pretrain.config import PretrainConfig

    from harness.options import click_options

    @click.command(params=click_options(PretrainConfig))
    def command(**values):
        click.echo(json.dumps([values["zero_terminal_snr"], values["cache_latents"]]))

    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    assert tuple(json.loads(result.output)) == expected
