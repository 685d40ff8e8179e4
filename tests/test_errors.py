"""Bad input and failing plugins: one clear line each, the rest of the run goes on, nothing is lost."""


import pytest

from tests.conftest import invoke, record_json

FAST = ("--warmup", "0", "--repeats", "1", "--quiet")

FAILING_PLUGINS = '''
import torch
from PIL import Image

import harness
from harness.benchmark.sampler import Sampler, SamplerInfo


class Explodes(Sampler):
    name = "explodes"
    description = "raises while generating"

    def load(self):
        pass

    def describe(self):
        return SamplerInfo(model="none", scheduler="none")

    def generate(self, request):
        raise RuntimeError("boom at step 1\\nsecond line of a long traceback")


class OutOfMemory(Explodes):
    name = "oom"

    def generate(self, request):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class BrokenLoad(Explodes):
    name = "broken-load"

    def load(self):
        raise ValueError("weights missing")


@harness.hookimpl
def register_samplers(register):
    for cls in (Explodes, OutOfMemory, BrokenLoad):
        register(cls)
'''


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "failing.py").write_text(FAILING_PLUGINS)
    return folder


def test_failing_samplers_are_recorded_and_the_others_still_run(tmp_path, plugin_dir, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("--plugin-dir", plugin_dir, "bench", "--sampler", "explodes", "oom", "broken-load", "flash-lcm",
                    "--steps", "2", "--outdir", outdir, *FAST)
    assert result.exit_code == 1
    records = {r["sampler"]: r for r in record_json(outdir)}
    assert records["flash-lcm"]["status"] == "ok"
    assert records["explodes"] == {**records["explodes"], "status": "failed",
                                   "error": "RuntimeError: boom at step 1"}
    assert (
        records["oom"]["error"]
        == "CUDA out of memory: reduce --num_images (or --batch) to 1 and close other GPU applications."
    )
    assert records["broken-load"]["error"] == "ValueError: weights missing"
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: explodes (2 steps): RuntimeError: boom at step 1",
        "Error: oom (2 steps): CUDA out of memory: reduce --num_images (or --batch) to 1 and close other GPU "
        "applications.",
        "Error: broken-load: ValueError: weights missing",
    ]
    summary = (outdir / "summary.md").read_text()
    assert "failed: RuntimeError: boom at step 1" in summary and "| flash-lcm" in summary


def test_steps_beyond_the_scheduler_fail_that_measurement_only(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "51", "--outdir", outdir, *FAST)
    assert result.exit_code == 1
    ok, failed = record_json(outdir)
    assert ok["status"] == "ok" and failed["status"] == "failed"
    assert failed["error"].startswith("51 steps is more than LCMScheduler can run")
    assert failed["error"].endswith("pass fewer --steps.")

    result = invoke("bench", "--sampler", "vanilla-sd", "--baseline_steps", "1001", "--outdir", tmp_path / "b", *FAST)
    assert "1001 steps is more than DDIMScheduler can run (the model was trained on 1000 timesteps)" in result.output


def test_long_prompt_is_a_warning_not_an_error(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    prompt = " ".join(["a red circle"] * 30)
    result = invoke("bench", "--steps", "2", "--prompt", prompt, "--outdir", outdir, "--json", *FAST)
    assert result.exit_code == 0
    [record] = record_json(outdir)
    assert record["status"] == "ok"
    [warning] = record["warnings"]
    assert "92 tokens long; the text encoder reads the first 77" in warning


def test_prompt_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\x00a red circle")
    result = invoke("bench", "--dry-run", "--prompts", bad)
    assert result.exit_code == 2
    assert f"prompt file '{bad}' is UTF-16 text; save it as UTF-8." in result.output


def test_jsonl_prompt_file_without_prompt_field(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    result = invoke("bench", "--dry-run", "--prompts", bad)
    assert result.exit_code == 2
    assert f"line 2 of {bad}: no 'prompt' field; write every line of a JSONL prompt file as" in result.output


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_lora_file_is_one_line(tmp_path, embedded_model, damage):
    from harness.models.embedded import embedded_lora

    original = (embedded_lora() / "pytorch_lora_weights.safetensors").read_bytes()
    lora = tmp_path / "lora"
    lora.mkdir()
    data = original[: len(original) // 2] if damage == "truncated" else b"not a safetensors file at all"
    (lora / "pytorch_lora_weights.safetensors").write_bytes(data)
    result = invoke("bench", "--lora_path", lora, "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert f"cannot load LoRA from '{lora}'" in error and "saved in safetensors" in error


def test_lora_for_another_architecture_is_one_line(tmp_path, embedded_model):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "lora"
    lora.mkdir()
    # SD 1.5-shaped LoRA weights (320 channels) for a model whose first attention has 64.
    save_file(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        lora / "pytorch_lora_weights.safetensors",
    )
    result = invoke("bench", "--lora_path", lora, "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert f"cannot load LoRA from '{lora}'" in error and "for this base model" in error
    assert "Traceback" not in result.output



def test_a_lora_whose_shapes_do_not_fit_names_the_layer_in_one_line(tmp_path, embedded_model, capfd):
    from safetensors.torch import load_file, save_file

    from harness.models.embedded import embedded_lora

    weights = load_file(embedded_lora() / "pytorch_lora_weights.safetensors")
    name = sorted(weights)[0]
    rows, columns = weights[name].shape
    weights[name] = weights[name].new_zeros(rows + 1, columns)  # one rank too many in one layer
    lora = tmp_path / "lora"
    lora.mkdir()
    save_file(weights, lora / "pytorch_lora_weights.safetensors")
    result = invoke("bench", "--lora_path", lora, "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    # torch's message names the layer on its second line; the one line keeps it.
    assert f"cannot load LoRA from '{lora}'" in error
    assert f"size mismatch for {name.split('.', 1)[1].split('.lora')[0]}" in error
    assert f"torch.Size([{rows + 1}, {columns}]) from checkpoint" in error
    # diffusers' own log of the failure (torch's whole message) is not printed beside it.
    assert "unsuccessful" not in capfd.readouterr().err


def test_one_line_joins_a_heading_to_the_line_it_announces():
    from harness.errors import one_line

    heading = RuntimeError("Error(s) in loading state_dict for Net:\n\tsize mismatch for a: 2 vs 3.\n\tb\n\tc")
    assert one_line(heading) == ("RuntimeError: Error(s) in loading state_dict for Net: size mismatch for a: 2 vs 3. "
                                 "(and 2 more)")
    assert one_line(RuntimeError("heading:\n\tdetail")) == "RuntimeError: heading: detail"
    assert one_line(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert one_line(KeyError()) == "KeyError"

def test_disk_full_mid_run_stops_with_one_line_and_keeps_finished_records(tmp_path, monkeypatch, embedded_model):
    import errno

    from harness.records import files

    real_save = files.save_image_atomic
    saved = []

    def save_until_full(image, path):
        if len(saved) >= 1:  # the disk fills up during the second measurement
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real_save(image, path)

    monkeypatch.setattr(files, "save_image_atomic", save_until_full)
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "4", "8", "--outdir", outdir, *FAST)
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == (
        f"Error: cannot write results to '{outdir}': No space left on device; free some space or pass "
        f"--outdir on another disk. The 1 finished measurement(s) are in {outdir / 'records.jsonl'}."
    )
    [record] = record_json(outdir)
    assert record["steps"] == 2 and record["status"] == "ok"
    assert not [p for p in outdir.iterdir() if p.name.startswith(".")]


def test_a_machine_info_hook_that_fails_is_named_in_one_line_before_the_run_folder_exists(tmp_path, embedded_model):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tells.py").write_text("import harness\n\n@harness.hookimpl\ndef harness_machine_info(info):\n"
                                      "    info['rack'] = 'B7'\n")
    (plugins / "faulty.py").write_text("import harness\n\n@harness.hookimpl\ndef harness_machine_info(info):\n"
                                       "    raise RuntimeError('no sensor')\n")
    outdir = tmp_path / "run"
    result = invoke("--plugin-dir", plugins, "bench", "--steps", "2", "--outdir", outdir, *FAST)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: the plugin 'faulty' failed in harness_machine_info: RuntimeError: no sensor; fix or uninstall "
        "that plugin.")
    assert "Traceback" not in result.output and not outdir.exists()
    working = tmp_path / "working"  # a folder of its own: a process keeps the plugins of a folder it loaded
    working.mkdir()
    (plugins / "tells.py").rename(working / "tells.py")
    result = invoke("--plugin-dir", working, "bench", "--steps", "2", "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    assert record_json(outdir)[0]["environment"]["rack"] == "B7"


def test_a_crash_inside_a_command_is_an_internal_error_with_its_own_exit_code(tmp_path):
    """A bug (an exception harness did not expect) exits 3 with its traceback and one line saying it is a bug; a
    bad input stays 2 and a failed measurement 1, so a script can tell them apart."""
    import subprocess
    import sys

    from harness.errors import ExitCode

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "crashing.py").write_text(
        "import click\nimport harness\n\n\n@harness.hookimpl\ndef register_commands(cli):\n"
        "    @cli.command()\n    def crash():\n        {}['missing']\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "harness", "--plugin-dir", str(folder), "crash"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == ExitCode.INTERNAL_ERROR == 3
    assert "Traceback (most recent call last)" in run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == (
        "harness: internal error (a bug in harness or a plugin, not in your input): KeyError: 'missing'; please "
        "report it with the traceback above.")
    bad_input = subprocess.run([sys.executable, "-m", "harness", "bench", "--steps", "0"], capture_output=True,
                               text=True, timeout=120)
    assert bad_input.returncode == ExitCode.USAGE and "Traceback" not in bad_input.stderr
