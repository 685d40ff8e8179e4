"""A LoRA must change the model it is loaded into: one rule for bench, eval and train.

A file of zeros, of metadata only, of keys no loader reads, at scale 0, or whose up factors are all zero loads
without an error in diffusers and leaves every image pixel-identical to the base model's; harness counts the layers
a LoRA changes, records the count, and refuses a LoRA that changes none in one line.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.models import loading as models
from harness.models import lora_io
from tests.conftest import invoke, record_json
from tests.training.test_train_data import write_shapes

BENCH_FAST = ("--model", "embedded", "--steps", "2", "--warmup", "0", "--repeats", "1", "--quiet")
TRAIN_FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1",
              "--max_steps", "1")
SHIPPED_LAYERS = 80  # the embedded LoRA's layers: 160 tensors, a down and an up factor each


def _shipped() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from harness.models.embedded import embedded_lora

    source = embedded_lora() / lora_io.DIFFUSERS_LORA_FILE
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(source), metadata


def _scaled(metadata: dict[str, str], alpha: float) -> dict[str, str]:
    config = json.loads(metadata[lora_io.LORA_METADATA_KEY])
    config["unet.lora_alpha"] = alpha
    return {**metadata, lora_io.LORA_METADATA_KEY: json.dumps(config)}


def _inert(case: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, str]:
    """A LoRA that changes nothing: (its tensors, its metadata, the reason harness gives)."""
    tensors, metadata = _shipped()
    count = len(tensors)
    if case == "zeros":
        return ({key: torch.zeros_like(value) for key, value in tensors.items()}, metadata,
                f"every value of the {count} tensors of pytorch_lora_weights.safetensors is zero")
    if case == "metadata only":
        return {}, metadata, "pytorch_lora_weights.safetensors holds no tensors, only metadata"
    if case == "no known prefix":
        renamed = {key.replace("unet.", "model.diffusion_model.", 1): value for key, value in tensors.items()}
        return renamed, metadata, f"none of the {count} keys of pytorch_lora_weights.safetensors starts with a prefix"
    if case == "unknown prefix, no metadata":
        return ({"lora." + key: value for key, value in tensors.items()}, None,
                f"none of the {count} keys of pytorch_lora_weights.safetensors starts with a prefix")
    if case == "up factors zero":
        return ({key: torch.zeros_like(value) if ".lora.up." in key else value for key, value in tensors.items()},
                metadata, f"every one of its {count // 2} up factors (lora.up / lora_B) is zero")
    if case == "scale 0":
        return tensors, _scaled(metadata, 0), f"its scale is 0 (lora_alpha 0) in all {count // 2} of its layers"
    raise AssertionError(case)


CASES = ["zeros", "metadata only", "no known prefix", "unknown prefix, no metadata", "up factors zero", "scale 0"]


def _write(folder: Path, case: str) -> tuple[Path, str]:
    tensors, metadata, reason = _inert(case)
    folder.mkdir(parents=True)
    save_file(tensors, folder / lora_io.DIFFUSERS_LORA_FILE, metadata=metadata)
    return folder, reason


def _line(folder: Path, reason: str) -> str:
    return f"LoRA from '{folder}' changes nothing in this model: {reason}"


@pytest.fixture(scope="module")
def pipe(embedded_model):
    spec = models.resolve_model("embedded")
    return lambda: models.load_pipeline(spec, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_a_lora_that_changes_nothing_is_refused_in_one_line(tmp_path, pipe, case):
    folder, reason = _write(tmp_path / "lora", case)
    source = models.resolve_lora(str(folder), None)
    assert source is not None
    with pytest.raises(HarnessError) as raised:
        models.load_lora(pipe(), source)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(_line(folder, reason)), message
    assert message.endswith("Pass a diffusers LoRA trained for this base model (e.g. .../lora/final).")


def test_a_peft_adapter_folder_of_zeros_is_refused(tmp_path, pipe):
    tensors, _ = _shipped()
    folder = tmp_path / "adapter"
    folder.mkdir()
    peft = {lora_io.PEFT_KEY_PREFIX + key.removeprefix("unet.").replace(".lora.down.", ".lora_A.")
            .replace(".lora.up.", ".lora_B."): torch.zeros_like(value) for key, value in tensors.items()}
    save_file(peft, folder / lora_io.PEFT_WEIGHTS_FILE)
    (folder / lora_io.PEFT_CONFIG_FILE).write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}))
    source = models.resolve_lora(str(folder), None)
    assert source is not None
    with pytest.raises(HarnessError, match="changes nothing in this model: every value of the 160 tensors"):
        models.load_lora(pipe(), source)


def test_the_layers_a_lora_changes_are_counted(tmp_path, pipe):
    from harness.models.embedded import embedded_lora

    source = models.resolve_lora(str(embedded_lora()), None)
    assert source is not None
    assert models.load_lora(pipe(), source, fuse=False) == SHIPPED_LAYERS
    # Half the layers zeroed: loaded, and counted as the half that changes the model.
    tensors, metadata = _shipped()
    zeroed = sorted(key for key in tensors if ".lora.up." in key)[: SHIPPED_LAYERS // 2]
    folder = tmp_path / "half"
    folder.mkdir()
    save_file({key: torch.zeros_like(value) if key in zeroed else value for key, value in tensors.items()},
              folder / lora_io.DIFFUSERS_LORA_FILE, metadata=metadata)
    half = models.resolve_lora(str(folder), None)
    assert half is not None
    assert models.load_lora(pipe(), half) == SHIPPED_LAYERS // 2


def test_bench_records_the_layers_its_lora_changes(tmp_path, embedded_model):
    result = invoke("bench", "--sampler", "flash-lcm", "--outdir", tmp_path / "run", *BENCH_FAST)
    assert result.exit_code == 0, result.output
    (record,) = record_json(tmp_path / "run")
    assert record["sampler_info"]["details"]["lora_layers"] == SHIPPED_LAYERS


@pytest.mark.parametrize("command, sampler, case", [("bench", "flash-lcm", "zeros"),
                                                    ("bench", "local-student", "no known prefix"),
                                                    ("eval", None, "metadata only"),
                                                    ("eval", None, "scale 0")])
def test_bench_and_eval_refuse_a_lora_that_changes_nothing(tmp_path, embedded_model, command, sampler, case):
    folder, reason = _write(tmp_path / "lora", case)
    chosen = ("--sampler", sampler) if sampler else ()
    result = invoke(command, *chosen, "--lora_path", folder, "--outdir", tmp_path / "run", *BENCH_FAST)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and _line(folder, reason) in errors[0], result.output
    records = record_json(tmp_path / "run")  # eval measures the baseline too
    assert [record["sampler"] for record in records if record.get("error")] == [sampler or "local-student"]


@pytest.mark.parametrize("case", ["zeros", "up factors zero"])
def test_train_refuses_a_lora_that_changes_nothing(tmp_path, embedded_model, case):
    shapes = write_shapes(tmp_path / "data", count=2)
    folder, reason = _write(tmp_path / "lora", case)
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path / "out",
                    "--run_name", "run", "--lora_path", folder, *TRAIN_FAST)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: " + _line(folder, reason)), result.output
