"""More sampler families as built-in plugins: tcd, dpm-solver and the LoRA presets (--lora_preset)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.benchmark import lora_presets
from harness.errors import HarnessError
from harness.models import loading as models
from tests.conftest import invoke, record_json

FAST = ("--warmup", "0", "--repeats", "1", "--quiet")
# PSNR (dB) of dpm-solver against vanilla-sd at 30 steps on SHAPES_PROMPTS, seed 0, as (mean, median) floors.
# Measured (CPU, fp32): 20 steps 32.1 / 30.8, 25 steps 41.0 / 44.2. The mistakes they catch, at 20 steps:
# final_sigmas_type "sigma_min" 22.4 / 20.8, Karras sigmas 16.3 / 14.7, epsilon read as v 8.4 / 8.2.
# At 20 steps and guidance 7.5 DPM-Solver++(2M) oscillates on a few of this tiny model's prompts (DDIM at 20
# steps: 47.5 / 47.4), hence the lower floor there.
PSNR_FLOORS_DB = {20: (28.0, 27.0), 25: (36.0, 40.0)}
ROOT = Path(__file__).resolve().parents[2]

# Captions of the embedded model's shapes grammar, for the dpm-solver vs vanilla-sd comparison.
SHAPES_PROMPTS = (
    "a small red circle on the left on an orange background",
    "a large red circle on the left on a purple background",
    "a small orange square on the right on a yellow background",
    "a large orange square on the right on a white background",
    "a small blue triangle at the top on a white background",
    "a large green circle at the bottom on a blue background",
    "a small purple square in the middle on a yellow background",
    "a large yellow triangle on the left on a black background",
)


def fake_hub_cache(cache: Path, repo: str, filename: str) -> None:
    """Put ``filename`` of ``repo`` into a Hugging Face cache folder, laid out as huggingface_hub writes it."""
    revision = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).write_bytes(b"")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_new_samplers_are_listed_as_built_in_plugins():
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").output)}
    for name in ("tcd", "dpm-solver"):
        assert rows[name]["kind"] == "sampler" and rows[name]["source"] == "built-in"
        assert rows[name]["description"]


def test_plan_gives_each_family_its_guidance_and_grid_name():
    from harness.benchmark.plan import Task, comparison_name

    result = invoke("bench", "--dry-run", "--sampler", "tcd", "dpm-solver", "--steps", "2", "--tcd-gamma", "0.5",
                    "--compare_baseline", "--seed", "42")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    tasks = {task["sampler"]: task for task in planned["tasks"]}
    assert (tasks["tcd"]["guidance_scale"], tasks["dpm-solver"]["guidance_scale"]) == (0.0, 7.5)
    assert (tasks["tcd"]["baseline"], tasks["dpm-solver"]["baseline"]) == (False, False)
    assert (tasks["tcd"]["file_label"], tasks["dpm-solver"]["file_label"]) == ("tcd", "dpm-solver")
    assert planned["spec"]["sampler_options"] == {"tcd": {"lora_preset": None, "tcd_gamma": 0.5}}
    baseline = Task(**tasks["vanilla-sd"])
    assert comparison_name(Task(**tasks["dpm-solver"]), baseline, 1, 42) == \
        "dpm-solver/compare_baseline30_dpm-solver2_seed42.png"


def test_lora_preset_belongs_to_the_samplers_that_take_it():
    result = invoke("bench", "--dry-run", "--sampler", "vanilla-sd", "--lora_preset", "tcd")
    assert result.exit_code == 2
    assert "--lora-preset is an option of sampler 'flash-lcm', 'tcd'" in result.output


@pytest.fixture(scope="module")
def families_run(tmp_path_factory, embedded_model):
    outdir = tmp_path_factory.mktemp("families") / "run"
    result = invoke("bench", "--model", "embedded", "--sampler", "tcd", "dpm-solver", "--steps", "2", "--seed", "42",
                    "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    return {record["sampler"]: record for record in record_json(outdir)}


def test_tcd_and_dpm_solver_records(families_run, embedded_model):
    from harness.models.embedded import embedded_lora

    tcd, dpm = families_run["tcd"], families_run["dpm-solver"]
    assert tcd["status"] == dpm["status"] == "ok"
    assert tcd["sampler_info"]["scheduler"] == "TCDScheduler (trailing)"
    assert dpm["sampler_info"]["scheduler"] == "DPMSolverMultistepScheduler (trailing)"
    assert (tcd["guidance_scale"], dpm["guidance_scale"]) == (0, 7.5)
    # Each record carries its own sampler's options only.
    assert tcd["config"]["sampler_options"] == {"tcd": {"lora_preset": None, "tcd_gamma": 0.3}}
    assert "tcd" not in dpm["config"]["sampler_options"] and tcd["sampler_info"]["details"]["gamma"] == 0.3
    # TCD: one UNet call of batch 1 per step; DPM-Solver++ with guidance: batch 2.
    assert tcd["unet"]["evaluations_per_image"] == 2 and dpm["unet"]["evaluations_per_image"] == 4
    # tcd's own preset on the embedded model is the model's shipped LoRA, and the record says so.
    assert tcd["sampler_info"]["lora"] == str(embedded_lora())
    details = tcd["sampler_info"]["details"]
    assert details["lora_preset"] == "tcd" and details["lora_preset_repo"] == "h1t/TCD-SD15-LoRA"
    assert "stands in" in details["lora_preset_note"]
    # dpm-solver: the base model, DPM-Solver++(2M), the model's own prediction type and zero-SNR betas.
    assert dpm["sampler_info"]["lora"] is None
    assert {key: dpm["sampler_info"]["details"][key] for key in
            ("algorithm_type", "solver_order", "final_sigmas_type", "prediction_type", "rescale_betas_zero_snr")} == {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


def _sampler(cls, model, options=None):
    import torch

    from harness.benchmark.sampler import SamplerConfig

    sampler = cls(SamplerConfig(model, torch.device("cpu"), torch.float32), options)
    sampler.load()
    return sampler


def test_tcd_gamma_changes_the_images(embedded_model):
    import numpy as np
    from harness_plugins.tcd import TcdOptions, TcdSampler

    from harness.benchmark.sampler import GenerationRequest

    model = models.resolve_model("embedded")
    request = GenerationRequest(model.default_prompt, 4, 0.0, (0,))
    pixels = {}
    for gamma in (0.0, 0.3, 0.9):
        sampler = _sampler(TcdSampler, model, TcdOptions(tcd_gamma=gamma))
        assert sampler.call_arguments(request)["eta"] == gamma
        first, again = sampler.generate(request)[0], sampler.generate(request)[0]
        assert np.array_equal(np.asarray(first), np.asarray(again))  # seeded: reproducible at every gamma
        pixels[gamma] = np.asarray(first).astype(int)
    assert np.abs(pixels[0.0] - pixels[0.3]).max() > 0 and np.abs(pixels[0.3] - pixels[0.9]).max() > 0


@pytest.mark.parametrize("name", sorted(lora_presets.PRESETS))
def test_every_preset_on_the_embedded_model_is_its_shipped_lora(name, offline_cache, embedded_model):
    from harness.models.embedded import embedded_lora

    choice = lora_presets.choose(name, models.resolve_model("embedded"))
    source = choice.source(4)  # offline, empty cache: nothing is looked up
    assert source == models.LoraSource(str(embedded_lora()), None, "local")
    assert choice.label == str(embedded_lora())
    assert choice.details()["lora_preset"] == name
    assert f"stands in for preset '{name}'" in choice.details()["lora_preset_note"]


def test_a_preset_on_the_embedded_model_through_the_cli(tmp_path, embedded_model):
    from harness.models.embedded import embedded_lora

    result = invoke("bench", "--model", "embedded", "--sampler", "flash-lcm", "--lora_preset", "lcm-lora",
                    "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    (record,) = record_json(tmp_path / "run")
    assert record["sampler_info"]["lora"] == str(embedded_lora())
    assert record["sampler_info"]["details"]["lora_preset"] == "lcm-lora"
    assert "latent-consistency/lcm-lora-sdv1-5 is for SD 1.5" in record["sampler_info"]["details"]["lora_preset_note"]
    assert record["config"]["sampler_options"][record["sampler"]]["lora_preset"] == "lcm-lora"


def test_flash_lcm_without_a_preset_records_no_preset(tmp_path, embedded_model):
    result = invoke("bench", "--model", "embedded", "--sampler", "flash-lcm", "--steps", "2",
                    "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    (record,) = record_json(tmp_path / "run")
    assert "lora_preset" not in record["sampler_info"]["details"]


def test_sd15_presets_name_their_hub_files(offline_cache):
    sd15 = models.resolve_model("sd15")
    expected = {
        "lcm-lora": ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
        "tcd": ("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors"),
        "flash": ("jasperai/flash-sd", "pytorch_lora_weights.safetensors"),
    }
    for name, (repo, filename) in expected.items():
        fake_hub_cache(offline_cache, repo, filename)
        assert lora_presets.choose(name, sd15).source(4) == models.LoraSource(repo, None, "hub")


def test_hyper_sd_picks_the_file_of_each_step_count(offline_cache):
    hyper = lora_presets.PRESETS["hyper-sd"]
    assert {steps: hyper.file_for(steps) for steps in (1, 2, 4, 8)} == {
        1: "Hyper-SD15-1step-lora.safetensors", 2: "Hyper-SD15-2steps-lora.safetensors",
        4: "Hyper-SD15-4steps-lora.safetensors", 8: "Hyper-SD15-8steps-lora.safetensors"}
    for steps in (3, 6, 30):
        with pytest.raises(HarnessError, match=f"has a file for 1, 2, 4 and 8 steps only .*, not {steps}; "
                                               "pass --steps 1 2 4 8 or another --lora_preset"):
            hyper.file_for(steps)

    choice = lora_presets.choose("hyper-sd", models.resolve_model("sd15"))
    assert choice.per_step and choice.source(None) is None  # known only once a step count is asked for
    fake_hub_cache(offline_cache, "ByteDance/Hyper-SD", "Hyper-SD15-4steps-lora.safetensors")
    assert choice.source(4) == models.LoraSource("ByteDance/Hyper-SD", "Hyper-SD15-4steps-lora.safetensors", "hub")
    with pytest.raises(HarnessError, match="needs ByteDance/Hyper-SD \\(Hyper-SD15-2steps-lora.safetensors\\)"):
        choice.source(2)  # offline and not cached
    with pytest.raises(HarnessError, match="not 3"):
        choice.source(3)
    # The embedded model's stand-in refuses the same step counts, so a dry run on it catches them.
    with pytest.raises(HarnessError, match="not 3"):
        lora_presets.choose("hyper-sd", models.resolve_model("embedded")).source(3)


def test_online_a_preset_is_left_to_the_download(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    choice = lora_presets.choose("hyper-sd", models.resolve_model("sd15"))
    assert choice.source(8) == models.LoraSource("ByteDance/Hyper-SD", "Hyper-SD15-8steps-lora.safetensors", "hub")


def test_preflight_refuses_what_cannot_run(offline_cache):
    import torch
    from harness_plugins.flash_lcm import FlashLcmSampler
    from harness_plugins.tcd import TcdOptions, TcdSampler

    from harness.benchmark.sampler import SamplerConfig

    config = SamplerConfig(models.resolve_model("sd15"), torch.device("cpu"), torch.float32)
    with pytest.raises(HarnessError, match="LoRA preset 'tcd' needs h1t/TCD-SD15-LoRA"):
        TcdSampler(config).preflight([4])
    fake_hub_cache(offline_cache, "h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors")
    TcdSampler(config).preflight([4])
    with pytest.raises(HarnessError, match="not 3"):
        TcdSampler(config, TcdOptions(lora_preset="hyper-sd")).preflight([2, 3])
    FlashLcmSampler(config).preflight([2, 3])  # no preset: the model's own LoRA, loaded as before
    with pytest.raises(HarnessError, match="pass either --lora_id or --lora_preset to tcd, not both"):
        TcdSampler(SamplerConfig(config.model, config.device, config.dtype, lora_id="someone/lora"),
                   TcdOptions(lora_preset="tcd")).preflight([4])


def test_lora_named_by_path_or_id_wins_over_the_default_preset(embedded_model, tmp_path):
    import torch
    from harness_plugins.tcd import TcdOptions, TcdSampler

    from harness.benchmark.sampler import SamplerConfig
    from harness.models.embedded import embedded_lora

    sd15 = models.resolve_model("sd15")
    other = tmp_path / "other"
    shutil.copytree(embedded_lora(), other)

    def config(**kwargs):
        return SamplerConfig(sd15, torch.device("cpu"), torch.float32, **kwargs)

    assert TcdSampler(config(lora_path=str(other))).preset_choice() is None
    assert TcdSampler(config(lora_path=str(other))).lora_source() == models.LoraSource(str(other), None, "local")
    both = TcdSampler(config(lora_path=str(other), lora_id="someone/lora"))
    assert both.preset_choice() is None and both.lora_source() == models.LoraSource("someone/lora", None, "hub")
    # An explicit preset wins over --lora_path, which is then local-student's.
    chosen = TcdSampler(config(lora_path=str(other)), TcdOptions(lora_preset="flash")).preset_choice()
    assert chosen is not None and chosen.preset.repo == "jasperai/flash-sd"


def _scaled_lora(source: Path, target: Path, factor: float) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as weights:
        metadata = weights.metadata()
        state = {key: weights.get_tensor(key) * (factor if ".lora.up." in key else 1.0) for key in weights.keys()}
    save_file(state, str(target), metadata=metadata)


def test_a_per_step_preset_loads_the_file_of_each_step_count(embedded_model, tmp_path, monkeypatch):
    """hyper-sd's mechanism on local files: the LoRA for each step count, swapped in place when the count changes."""
    import numpy as np
    import torch
    from harness_plugins.flash_lcm import FlashLcmSampler
    from harness_plugins.tcd import TcdOptions, TcdSampler
    from huggingface_hub import constants

    from harness.benchmark.sampler import GenerationRequest, SamplerConfig
    from harness.models.embedded import embedded_lora

    files = tmp_path / "per-step"
    files.mkdir()
    shipped = embedded_lora() / "pytorch_lora_weights.safetensors"
    shutil.copy(shipped, files / "two.safetensors")
    _scaled_lora(shipped, files / "four.safetensors", 0.5)
    monkeypatch.setitem(lora_presets.PRESETS, "hyper-sd",
                        lora_presets.LoraPreset("hyper-sd", str(files), "test", {2: "two.safetensors",
                                                                                 4: "four.safetensors"}))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a folder, not a hub repository: nothing to check
    model = models.resolve_model(str(embedded_model))  # a plain folder: presets are not stood in for
    sampler = _sampler(TcdSampler, model, TcdOptions(lora_preset="hyper-sd"))
    assert sampler.loaded_lora is None  # no step count asked for yet
    assert sampler.describe().details["lora_preset_files"] == {"2": "two.safetensors", "4": "four.safetensors"}

    def image(sampler, steps):
        request = GenerationRequest(model.default_prompt, steps, 0.0, (1,))
        sampler.check(request)
        return np.asarray(sampler.generate(request)[0]).astype(int)

    def fresh(file, steps):
        """A new sampler given the file directly, as --lora_path."""
        config = SamplerConfig(model, torch.device("cpu"), torch.float32, lora_path=str(files / file))
        reference = TcdSampler(config, TcdOptions())
        reference.load()
        return image(reference, steps)

    two, four, two_again = image(sampler, 2), image(sampler, 4), image(sampler, 2)
    assert sampler.loaded_lora == models.LoraSource(str(files), "two.safetensors", "hub")
    assert np.array_equal(two, fresh("two.safetensors", 2))
    # Each swap unfuses (subtracts the LoRA from the fused weights) and fuses the next: float rounding at most.
    assert np.abs(four - fresh("four.safetensors", 4)).max() <= 1
    assert np.abs(two_again - two).max() <= 1
    with pytest.raises(HarnessError, match="not 3"):
        sampler.check(GenerationRequest(model.default_prompt, 3, 0.0, (1,)))
    assert FlashLcmSampler.Options is lora_presets.PresetOptions


def test_dry_run_refuses_nothing_it_cannot_know(tmp_path):
    """--dry-run plans without loading or looking anything up, presets included."""
    result = invoke("bench", "--dry-run", "--model", "sd15", "--sampler", "tcd", "--lora_preset", "hyper-sd",
                    "--steps", "4")
    assert result.exit_code == 0, result.output


def _offline_bench(tmp_path, *args):
    home = tmp_path / "hf-home"
    home.mkdir()
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HARNESS_HOME": str(tmp_path / "harness-home")}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "harness", "bench", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_preset_offline_without_cache_is_one_line(tmp_path):
    outdir = tmp_path / "run"
    result = _offline_bench(tmp_path, "--model", "sd15", "--device", "cpu", "--sampler", "tcd", "--steps", "4",
                            "--outdir", outdir, *FAST)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "LoRA preset 'tcd' needs h1t/TCD-SD15-LoRA" in errors[0]
    assert "not in the local Hugging Face cache" in errors[0]
    assert "hf download h1t/TCD-SD15-LoRA" in errors[0] and "--lora_path" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(outdir.rglob("*.png"))  # the base model never loaded: no image


def test_preset_offline_without_cache_writes_nothing(tmp_path):
    outdir = tmp_path / "run"
    result = _offline_bench(tmp_path, "--model", "sd15", "--device", "cpu", "--sampler", "flash-lcm",
                            "--lora_preset", "hyper-sd", "--steps", "2", "4", "--outdir", outdir, *FAST)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "LoRA preset 'hyper-sd' needs ByteDance/Hyper-SD" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not outdir.exists() or not any(outdir.iterdir())


@pytest.mark.slow
def test_dpm_solver_at_20_steps_is_close_to_vanilla_sd_at_30(tmp_path, embedded_model):
    import statistics

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SHAPES_PROMPTS) + "\n", encoding="utf-8")
    result = invoke("bench", "--model", "embedded", "--sampler", "dpm-solver", "--steps", "20", "25",
                    "--compare_baseline", "--metric", "psnr", "--prompts", prompts, "--seed", "0",
                    "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 0, result.output
    records = {(record["sampler"], record["steps"]): record for record in record_json(tmp_path / "run")}
    assert set(records) == {("vanilla-sd", 30), ("dpm-solver", 20), ("dpm-solver", 25)}
    for steps, (mean_floor, median_floor) in PSNR_FLOORS_DB.items():
        psnr = records[("dpm-solver", steps)]["metrics"]["psnr"]
        assert psnr["reference"] == "vanilla-sd 30 steps"
        assert psnr["value"] >= mean_floor and statistics.median(psnr["per_image"]) >= median_floor, (steps, psnr)
    comparison = records[("dpm-solver", 20)]["comparisons"][0]["path"]
    assert comparison == "compare_baseline30_dpm-solver20_seed0.png" and (tmp_path / "run" / comparison).is_file()
