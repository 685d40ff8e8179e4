"""Model and LoRA resolution, and the one-line errors when they are not there."""

import pytest

from harness.errors import HarnessError
from harness.models import loading as models
from tests.conftest import invoke

FAST = ("--warmup", "0", "--repeats", "1", "--quiet")


def test_offline_hub_model_is_one_clear_line(tmp_path):
    outdir = tmp_path / "run"
    result = invoke("bench", "--model", "nobody/not-a-model", "--steps", "2", "4", "--outdir", outdir, *FAST)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "cannot load model 'nobody/not-a-model'" in errors[0]
    assert "huggingface-cli login" in errors[0] and "--model embedded" in errors[0]
    assert "Traceback" not in result.output
    # Each planned measurement is recorded as failed, so the run folder says what happened.
    records = (outdir / "records.jsonl").read_text().splitlines()
    assert len(records) == 2 and all('"status": "failed"' in line for line in records)


def test_seed_model_id_maps_to_the_mirror_with_a_notice():
    spec = models.resolve_model("runwayml/stable-diffusion-v1-5")
    assert spec.location == models.SD15_MIRROR
    assert "removed from the hub" in spec.notice and models.SD15_MIRROR in spec.notice
    sd15 = models.resolve_model("sd15")
    assert (sd15.location, sd15.default_lora) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "jasperai/flash-sd")


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(HarnessError, match="has no model_index.json; pass a diffusers pipeline folder"):
        models.resolve_model(str(tmp_path))


def test_nonsense_model_name_is_rejected():
    with pytest.raises(HarnessError, match="is not a preset, an existing folder or a hub id"):
        models.resolve_model("not a model")


def test_folder_with_a_missing_component_names_the_problem(tmp_path, embedded_model):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(embedded_model, broken)
    shutil.rmtree(broken / "unet")
    result = invoke("bench", "--model", broken, "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    assert f"cannot load model '{broken}'" in result.output
    assert "Check that the folder is complete" in result.output


@pytest.mark.parametrize("case", ["missing", "empty-dir", "pickle-file", "pickle-dir", "not-safetensors"])
def test_bad_lora_paths(tmp_path, case):
    target = tmp_path / "lora"
    expected = {
        "missing": "does not exist",
        "empty-dir": "holds no .safetensors LoRA weights",
        "pickle-file": "refusing to load",
        "pickle-dir": "refusing to load",
        "not-safetensors": "is not a .safetensors file",
    }[case]
    if case == "empty-dir":
        target.mkdir()
    elif case == "pickle-file":
        target = tmp_path / "lora.bin"
        target.write_bytes(b"\x80\x04")
    elif case == "pickle-dir":
        target.mkdir()
        (target / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04")
    elif case == "not-safetensors":
        target = tmp_path / "lora.txt"
        target.write_text("x")
    with pytest.raises(HarnessError, match=expected):
        models.resolve_lora(str(target), "jasperai/flash-sd")


def test_lora_path_wins_over_lora_id(embedded_model):
    from harness.models.embedded import embedded_lora

    lora_dir = embedded_lora()
    source = models.resolve_lora(str(lora_dir), "jasperai/flash-sd")
    assert (source.location, source.kind) == (str(lora_dir), "local")
    assert models.resolve_lora(None, "jasperai/flash-sd").kind == "hub"


def test_local_student_needs_a_lora_path(tmp_path, embedded_model):
    result = invoke("bench", "--sampler", "local-student", "--steps", "2", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 1
    assert "local-student needs --lora_path" in result.output


def test_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("bench", "--dry-run", "--device", "cuda")
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output


def test_unwritable_outdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("bench", "--outdir", blocker / "run", "--steps", "2", *FAST)
    assert result.exit_code == 2
    assert "cannot write to output folder" in result.output


def test_a_bad_model_name_leaves_no_output_folder(tmp_path):
    outdir = tmp_path / "run"
    result = invoke("bench", "--model", "not a model", "--outdir", outdir, *FAST)
    assert result.exit_code == 2
    assert not outdir.exists()
