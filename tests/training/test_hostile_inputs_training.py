"""Hostile and damaged inputs to training: each ends in one line or a counted skip, and nothing finished is lost.

Bad metadata.jsonl lines and caption files, decompression bombs, torn checkpoints, an --overwrite run that never
reaches its first step, a second run in the same folder, CPU out of memory, LoRA files that are cut short or hold
NaN; plus fuzzing of every reader these go through.
"""

import hashlib
import json
import math
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from harness_plugins.distill import DistillTrainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.models import loading as models
from harness.models import lora_io
from harness.records.rundir import LOCK_FILE, REPLACED_FOLDER, FolderLock
from harness.training import checkpoints
from harness.training.checkpoints import CheckpointError, TrainingState
from harness.training.data import Examples, ImageCaptionDataset, find_examples
from tests.conftest import invoke
from tests.training.test_train_data import write_shapes

FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--checkpointing_steps", "2")
BENCH_FAST = ("--model", "embedded", "--steps", "2", "--warmup", "0", "--repeats", "1", "--quiet")
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PILLOW_LIMIT = 89478485  # Pillow's default MAX_IMAGE_PIXELS, which harness must leave as it is
CAPTION_FIELDS = "text, caption, captions, prompt, sentence, description, title"
CHECKPOINT_FIX = "pass a checkpoint-N folder written by harness train, or --resume_from_checkpoint latest."


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too) with a hash of each file's bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*"))}


def _train(shapes: Path, output: Path, run_name: str, *extra):
    return invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", output, "--run_name", run_name,
                  *FAST, *extra)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _claimed_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _announced_header(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _cut(path: Path, size: int = 20) -> str:
    """Cut a safetensors file short; the problem harness names for it."""
    announced = _announced_header(path)
    path.write_bytes(path.read_bytes()[:size])
    return (f"{path.name} is not a safetensors file or is cut short ({size} bytes, a header of {announced} bytes "
            "announced)")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes, embedded_model):
    """A finished 4-step run: lora/checkpoint-2, lora/checkpoint-4, lora/final, config.json, train_log.jsonl."""
    output = tmp_path_factory.mktemp("trained")
    result = _train(shapes, output, "run", "--max_steps", "4")
    assert result.exit_code == 0, result.output
    return output / "run"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the finished run to damage, replace or resume."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


# ----- 1. metadata.jsonl lines and caption files -----

@pytest.mark.parametrize("line, problem", [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"file_name": "000.png", "text": ', "not JSON"),
    (b'["000.png", "a red circle"]', "not a JSON object"),
    (b'{"text": "a red circle"}', "no 'file_name' field"),
    (b'{"file_name": 7, "text": "a red circle"}', "'file_name' is not a string"),
    (b'{"file_name": "/etc/hostname", "text": "a"}',
     "'file_name' '/etc/hostname' lies outside the data folder (an absolute path or '..')"),
    (b'{"file_name": "../data/000.png", "text": "a"}',
     "'file_name' '../data/000.png' lies outside the data folder (an absolute path or '..')"),
    (b'{"file_name": "gone.png", "text": "a"}', "'file_name' 'gone.png' is not a file in the data folder"),
    (b'{"file_name": "000.png", "text": {"en": "a"}}', "'text' is not a string"),
    (b'{"file_name": "000.png"}', f"no caption field ({CAPTION_FIELDS})"),
])
def test_a_bad_metadata_line_is_skipped_and_named(tmp_path, line, problem):
    folder = write_shapes(tmp_path / "data", count=2, layout="metadata")
    with open(folder / "metadata.jsonl", "ab") as handle:
        handle.write(line + b"\n")
    examples = find_examples(None, str(folder))
    assert len(examples) == 2
    assert examples.skipped == [
        f"1 unusable line(s) of metadata.jsonl, e.g. line 3 of {folder / 'metadata.jsonl'}: {problem}"]


def test_a_metadata_file_without_a_usable_line_is_one_line(tmp_path):
    folder = write_shapes(tmp_path / "data", count=2, layout="metadata")
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": \n\xff\n')
    result = invoke("train", "--plugin", "distill", "--data_dir", folder, "--output_dir", tmp_path / "out", *FAST)
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: --data_dir '{folder}' holds no usable image with a caption (2 unusable line(s) of metadata.jsonl, "
        f"e.g. line 1 of {folder / 'metadata.jsonl'}: not JSON); expected images/*.png + captions/*.txt, *.png "
        "beside *.txt, or images with a metadata.jsonl."]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_caption_file_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    folder = write_shapes(tmp_path / "data", count=3)
    (folder / "001.txt").write_bytes(b"a red \xff circle")
    examples = find_examples(None, str(folder))
    assert len(examples) == 2 and "\ufffd" not in "".join(examples.captions)
    assert examples.skipped == [f"1 caption file(s) that are not UTF-8 text, e.g. '{folder / '001.txt'}'"]


# ----- 2. decompression bombs and huge images -----

@pytest.mark.parametrize("side", [20000, 10000], ids=["over-2x-the-limit", "between-1x-and-2x"])
def test_an_image_claiming_a_giant_size_is_skipped_as_unreadable(tmp_path, side):
    folder = write_shapes(tmp_path / "data", count=2)
    (folder / "001.png").write_bytes(_claimed_png(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning must not escape either
        examples = find_examples(None, str(folder))
    assert len(examples) == 1
    assert examples.skipped == [
        f"1 unreadable image(s) larger than Pillow's limit of {PILLOW_LIMIT} pixels (a guard against decompression "
        f"bombs), e.g. '{folder / '001.png'}'"]
    assert Image.MAX_IMAGE_PIXELS == PILLOW_LIMIT


def test_a_bomb_found_only_when_a_batch_reads_it_is_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_claimed_png(20000, 20000))
    dataset = ImageCaptionDataset(Examples("dataset 'hostile'", ["a"], lambda index: Image.open(bomb)), 64)
    with pytest.raises(HarnessError) as caught:
        dataset[0]
    assert str(caught.value) == (
        "cannot read image 0 of dataset 'hostile': DecompressionBombError: Image size (400000000 pixels) exceeds "
        f"limit of {2 * PILLOW_LIMIT} pixels, could be decompression bomb DOS attack; remove or replace the file.")


@pytest.mark.slow
def test_training_skips_and_counts_bad_lines_and_bombs_and_goes_on(tmp_path, embedded_model):
    folder = write_shapes(tmp_path / "data", count=4, layout="metadata")
    (folder / "big.png").write_bytes(_claimed_png(20000, 20000))
    with open(folder / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "big.png", "text": "a huge square"}\n{"file_name": "../x.png", "text": "a"}\n')
    result = invoke("train", "--plugin", "distill", "--data_dir", folder, "--output_dir", tmp_path / "out",
                    "--max_steps", "1", *FAST)
    assert result.exit_code == 0, result.output
    assert (f"skipped 1 unusable line(s) of metadata.jsonl, e.g. line 6 of {folder / 'metadata.jsonl'}: 'file_name' "
            "'../x.png' lies outside the data folder (an absolute path or '..')") in result.output.splitlines()
    assert (f"skipped 1 unreadable image(s) larger than Pillow's limit of {PILLOW_LIMIT} pixels (a guard against "
            f"decompression bombs), e.g. '{folder / 'big.png'}'") in result.output.splitlines()
    assert json.loads((tmp_path / "out" / "lora_student" / "config.json").read_text())["resolved"]["examples"] == 4


# ----- 3. checkpoints: torn or damaged state, latest falls back, a named one is one line -----

def _synthetic_checkpoint(folder: Path) -> Path:
    """A checkpoint as the trainer writes one, from a tiny model: what load_resumable must accept."""
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    (parameter ** 2).sum().backward()
    optimizer.step()
    schedule = get_scheduler("constant", optimizer)
    optimizer_tensors, optimizer_info = checkpoints.flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_info = checkpoints.rng_to_state(0, checkpoints.capture_rng(torch.Generator().manual_seed(1)))
    state = TrainingState(
        {"param.w": parameter.detach(), **{f"optimizer.{k}": v for k, v in optimizer_tensors.items()},
         **{f"rng.{k}": v for k, v in rng_tensors.items()}},
        {"step": 4, "samples_seen": 16, "seconds": 1.5, "seed": 3, "world_size": 1, "trainer": "distill",
         "optimizer": optimizer_info, "lr_scheduler": schedule.state_dict(), "grad_scaler": None,
         "rng": {"0": rng_info}, checkpoints.WEIGHTS_FILES: [lora_io.DIFFUSERS_LORA_FILE]})
    folder.mkdir(parents=True)
    save_file({"unet.a.lora_A.weight": torch.ones(2, 3)}, folder / lora_io.DIFFUSERS_LORA_FILE)
    state.save(folder)
    return folder


def _edit_info(folder: Path, edit) -> None:
    info = json.loads((folder / checkpoints.STATE_INFO).read_text())
    edit(info)
    (folder / checkpoints.STATE_INFO).write_text(json.dumps(info))


def _damage(folder: Path, how: str) -> str:
    """Damage a checkpoint folder; the problem harness names for it."""
    tensors, info, lora = (folder / name for name in (checkpoints.STATE_TENSORS, checkpoints.STATE_INFO,
                                                       lora_io.DIFFUSERS_LORA_FILE))
    if how == "no-state-tensors":
        tensors.unlink()
        return "no training_state.safetensors"
    if how == "torn-state-tensors":
        return _cut(tensors)
    if how == "info-cut-short":
        info.write_text(info.read_text()[:40])
        return "training_state.json is not JSON (cut short, or not written by harness)"
    if how == "info-not-utf8":
        info.write_bytes(b"\xff\xfe{}")
        return "training_state.json is not UTF-8 text"
    if how == "info-not-an-object":
        info.write_text("[4]")
        return "training_state.json is not a JSON object"
    if how == "step-a-string":
        _edit_info(folder, lambda state: state.update(step="4"))
        return "training_state.json: 'step' is not a whole number >= 0"
    if how == "no-seed":
        _edit_info(folder, lambda state: state.pop("seed"))
        return "training_state.json has no 'seed'"
    if how == "world-size-zero":
        _edit_info(folder, lambda state: state.update(world_size=0))
        return "training_state.json: 'world_size' is not a whole number >= 1"
    if how == "rng-wrong":
        _edit_info(folder, lambda state: state.update(rng={"0": {"cuda_devices": "none"}}))
        return "training_state.json: 'rng' is not an object of random states by process"
    if how == "optimizer-wrong":
        _edit_info(folder, lambda state: state.update(optimizer={"param_groups": "adamw"}))
        return "training_state.json: 'optimizer' is not an object of param_groups and scalars"
    if how == "no-generator-state":
        save_file({k: v for k, v in load_file(tensors).items() if k != "rng.0.generator"}, tensors)
        return "training_state.safetensors has no random state 'rng.0.generator'"
    if how == "no-lora-weights":
        lora.unlink()
        return "its weights file 'pytorch_lora_weights.safetensors' is missing"
    assert how == "torn-lora-weights"
    return _cut(lora)


DAMAGES = ["no-state-tensors", "torn-state-tensors", "info-cut-short", "info-not-utf8", "info-not-an-object",
           "step-a-string", "no-seed", "world-size-zero", "rng-wrong", "optimizer-wrong", "no-generator-state",
           "no-lora-weights", "torn-lora-weights"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checkpoint_is_named_with_what_is_wrong(tmp_path, how):
    folder = _synthetic_checkpoint(tmp_path / "checkpoint-4")
    assert checkpoints.load_resumable(folder).info["step"] == 4
    problem = _damage(folder, how)
    with pytest.raises(CheckpointError) as caught:
        checkpoints.load_resumable(folder)
    assert caught.value.problem == problem
    assert str(caught.value) == f"'{folder}' is not a complete training checkpoint ({problem}); {CHECKPOINT_FIX}"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torn-state-tensors", "step-a-string", "no-lora-weights"])
def test_resume_latest_passes_over_a_damaged_checkpoint_to_the_previous_one(run, shapes, how):
    lora = run / "lora"
    problem = _damage(lora / "checkpoint-4", how)
    before = {name: _tree(lora / name) for name in ("checkpoint-2", "checkpoint-4")}
    with open(run / "train_log.jsonl", "ab") as log:
        log.write(b'{"step": 5, "lo')  # torn by the kill
    result = _train(shapes, run.parent, "run", "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"skipped damaged checkpoint '{lora / 'checkpoint-4'}': {problem}." in lines
    assert f"resuming from '{lora / 'checkpoint-2'}' at step 2." in lines
    assert {name: _tree(lora / name) for name in before} == before  # both left as they were
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_named_damaged_checkpoint_is_one_line_without_falling_back(run, shapes):
    checkpoint = run / "lora" / "checkpoint-4"
    problem = _damage(checkpoint, "info-cut-short")
    before = _tree(run)
    result = _train(shapes, run.parent, "run", "--max_steps", "6", "--resume_from_checkpoint", checkpoint)
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: '{checkpoint}' is not a complete training checkpoint ({problem}); {CHECKPOINT_FIX}"]
    assert "resuming from" not in result.output and "Traceback" not in result.output
    assert _tree(run) == before


def test_resume_latest_with_every_checkpoint_damaged_is_one_line(run, shapes):
    lora = run / "lora"
    newest = _damage(lora / "checkpoint-4", "no-lora-weights")
    oldest = _damage(lora / "checkpoint-2", "world-size-zero")
    before = _tree(run)
    result = _train(shapes, run.parent, "run", "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert f"skipped damaged checkpoint '{lora / 'checkpoint-4'}': {newest}." in lines
    assert f"skipped damaged checkpoint '{lora / 'checkpoint-2'}': {oldest}." in lines
    assert _errors(result.output) == [
        f"Error: every checkpoint in '{lora}' is damaged (the newest, '{lora / 'checkpoint-4'}': {newest}); pass "
        "--overwrite to start the run again, or another --run_name."]
    assert _tree(run) == before


# ----- 4. --overwrite: the earlier run is moved aside, deleted only once the new run is about to train -----

@pytest.mark.parametrize("failure", [HarnessError("the model is broken; pass another --model."), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_overwrite_that_fails_before_its_first_step_puts_the_earlier_run_back(run, shapes, monkeypatch, failure):
    before = _tree(run)
    seen = []

    def setup_failing(self):
        seen.append(sorted(path.name for path in (run / REPLACED_FOLDER).iterdir()))
        raise failure

    monkeypatch.setattr(DistillTrainer, "setup", setup_failing)
    result = _train(shapes, run.parent, "run", "--max_steps", "2", "--overwrite")
    assert seen == [["config.json", "lora", "train_log.jsonl"]]  # aside while the model loads, not deleted
    assert f"The earlier run in '{run}' was kept: the new run stopped before its first step." in result.output
    if isinstance(failure, KeyboardInterrupt):
        assert result.exit_code == 130
    else:
        assert result.exit_code == 2
        assert _errors(result.output) == ["Error: the model is broken; pass another --model."]
    assert _tree(run) == before  # byte for byte, no .replaced-run, no lock file


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_once_training_starts(run, shapes):
    result = _train(shapes, run.parent, "run", "--max_steps", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in run.iterdir()) == ["config.json", "lora", "train_log.jsonl"]
    assert sorted(path.name for path in (run / "lora").iterdir()) == ["checkpoint-2", "final"]
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2


def test_a_run_killed_during_overwrite_is_put_back_by_the_next_run(run, shapes):
    before = _tree(run)
    aside = run / REPLACED_FOLDER
    aside.mkdir()
    for name in ("config.json", "lora", "train_log.jsonl"):
        (run / name).rename(aside / name)
    (run / "config.json").write_text('{"half": ')  # what the killed run had started to write
    result = _train(shapes, run.parent, "run", "--max_steps", "2")
    assert f"Restored the earlier run in '{run}' that an interrupted --overwrite run had moved aside." in result.output
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: '{run / 'lora'}' already holds an earlier run; pass --resume_from_checkpoint latest to continue it, "
        "--overwrite to replace it, or another --run_name."]
    assert _tree(run) == before


# ----- 5. one run per folder -----

def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(run, shapes):
    before = _tree(run)
    with FolderLock(run, "--output_dir/--run_name"):
        holder = (run / LOCK_FILE).read_text().strip()
        result = _train(shapes, run.parent, "run", "--max_steps", "6", "--resume_from_checkpoint", "latest")
        assert result.exit_code == 2
        assert _errors(result.output) == [
            f"Error: '{run}' is in use by another harness run ({holder}); wait for it to end or pass another "
            "--output_dir/--run_name."]
    assert _tree(run) == before


# ----- 6. CPU out of memory -----

CPU_OOM = ("CPU out of memory at step {}: reduce --batch_size to 1 and raise --gradient_accumulation_steps to keep the "
           "effective batch, add --gradient_checkpointing, use a smaller --resolution, or close other applications. ")


def _loss_running_out_of_memory_at(step: int, error: BaseException):
    real_loss, calls = DistillTrainer.compute_loss, []

    def compute_loss(self, batch, generator):
        calls.append(1)
        if len(calls) == step:
            raise error
        return real_loss(self, batch, generator)

    return compute_loss


def test_cpu_out_of_memory_at_the_first_step_is_one_line(tmp_path, shapes, embedded_model, monkeypatch):
    monkeypatch.setattr(DistillTrainer, "compute_loss", _loss_running_out_of_memory_at(1, MemoryError()))
    result = _train(shapes, tmp_path, "run", "--max_steps", "2")
    assert result.exit_code == 2
    assert _errors(result.output) == ["Error: " + CPU_OOM.format(1) + "No checkpoint was written yet."]
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_cpu_out_of_memory_keeps_the_last_checkpoint_intact(tmp_path, shapes, embedded_model, monkeypatch):
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                         "tried to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(DistillTrainer, "compute_loss", _loss_running_out_of_memory_at(3, error))
    result = _train(shapes, tmp_path, "run", "--max_steps", "4")
    assert result.exit_code == 2
    checkpoint = tmp_path / "run" / "lora" / "checkpoint-2"
    assert _errors(result.output) == ["Error: " + CPU_OOM.format(3) + f"The last checkpoint, '{checkpoint}', is "
                                      "intact: continue with --resume_from_checkpoint latest."]
    assert checkpoints.load_resumable(checkpoint).info["step"] == 2


# ----- 7. LoRA files: a damaged header, NaN or inf values -----

def _broken_lora(folder: Path, value: float) -> tuple[Path, str, int]:
    """The embedded LoRA with ``value`` written into one tensor: (its file, that tensor's name, tensor count)."""
    from harness.models.embedded import embedded_lora

    source = embedded_lora() / lora_io.DIFFUSERS_LORA_FILE
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {key: tensor.clone() for key, tensor in load_file(source).items()}
    name = sorted(tensors)[1]
    tensors[name].view(-1)[0] = value
    folder.mkdir()
    path = folder / lora_io.DIFFUSERS_LORA_FILE
    save_file(tensors, path, metadata=metadata)
    return path, name, len(tensors)


def _broken_line(path: Path, name: str, count: int) -> str:
    return (f"--lora_path '{path}' holds NaN or inf values (in 1 of {count} tensors, e.g. '{name}'); it is broken: "
            "retrain it or pass another LoRA.")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_train_from_a_lora_holding_nan_or_inf_is_one_line(tmp_path, shapes, embedded_model, value):
    path, name, count = _broken_lora(tmp_path / "broken", value)
    result = _train(shapes, tmp_path / "out", "run", "--max_steps", "2", "--lora_path", path.parent)
    assert result.exit_code == 2
    assert _errors(result.output) == ["Error: " + _broken_line(path, name, count)]


@pytest.mark.parametrize("option, sampler", [("--lora_path", "local-student"), ("--lora_id", "flash-lcm")])
def test_bench_with_a_lora_holding_nan_is_one_line(tmp_path, embedded_model, option, sampler):
    path, name, count = _broken_lora(tmp_path / "broken", math.nan)
    result = invoke("bench", "--sampler", sampler, option, path.parent, "--outdir", tmp_path / "bench", *BENCH_FAST)
    assert result.exit_code == 1
    assert _errors(result.output) == [f"Error: {sampler}: " + _broken_line(path, name, count)]


def test_train_from_a_lora_cut_short_is_one_line(tmp_path, shapes, embedded_model):
    path, _, _ = _broken_lora(tmp_path / "torn", 0.0)
    problem = _cut(path)
    result = _train(shapes, tmp_path / "out", "run", "--max_steps", "2", "--lora_path", path.parent)
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: cannot load LoRA from '{path.parent}': {problem}. Check that it is a diffusers LoRA for this base "
        "model, saved in safetensors."]


# ----- fuzzing: whatever the bytes, a named skip or a HarnessError -----

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FILE_NAMES = st.sampled_from(["000.png", "001.png", "../000.png", "/000.png", "a\x00b", "", ".", "metadata.jsonl",
                              "sub/../000.png", "x" * 300]) | st.text(max_size=30) | JSON


@FUZZ
@given(st.binary(max_size=120)
       | st.builds(lambda name, caption: json.dumps({"file_name": name, "text": caption}).encode(), FILE_NAMES, JSON)
       | JSON.map(lambda value: json.dumps(value).encode()))
def test_fuzz_metadata_lines_end_in_a_named_skip(tmp_path, line):
    folder = tmp_path / "data"
    if not folder.exists():
        write_shapes(folder, count=2)
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "000.png", "text": "a red circle"}\n' + line + b"\n")
    examples = find_examples(None, str(folder))
    assert len(examples) >= 1
    assert all(" line(s) of metadata.jsonl, e.g. line " in entry or "image(s)" in entry for entry in examples.skipped)


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    return _synthetic_checkpoint(tmp_path_factory.mktemp("valid") / "checkpoint-4")


@FUZZ
@given(st.sampled_from([checkpoints.STATE_INFO, checkpoints.STATE_TENSORS, lora_io.DIFFUSERS_LORA_FILE]),
       st.one_of(st.binary(max_size=300).map(lambda data: ("replace", data)),
                 st.integers(min_value=0, max_value=4000).map(lambda size: ("cut", size)),
                 st.tuples(st.integers(min_value=0, max_value=4000), st.binary(min_size=1, max_size=8))
                 .map(lambda edit: ("overwrite", edit))),
       st.sampled_from([None, *checkpoints.RESUME_FIELDS]), JSON)
def test_fuzz_checkpoint_state_ends_in_a_checkpoint_error(valid_checkpoint, tmp_path, file, damage, field, value):
    folder = tmp_path / "fuzzed"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(valid_checkpoint, folder)
    if field is not None:
        _edit_info(folder, lambda state: state.update({field: value}))
    path, (kind, how) = folder / file, damage
    data = path.read_bytes()
    if kind == "replace":
        data = how
    elif kind == "cut":
        data = data[:how]
    else:
        offset, patch = how
        data = data[:offset] + patch + data[offset + len(patch):]
    path.write_bytes(data)
    try:
        state = checkpoints.load_resumable(folder)
    except CheckpointError as error:
        assert error.folder == folder and error.problem and "\n" not in str(error)
    else:
        assert isinstance(state.info["step"], int)


class _Pipe:
    """Stands in for a pipeline: the fuzzed file is checked before anything would load it."""

    unet = torch.nn.Linear(1, 1)  # no LoRA layer: what loads into it changes nothing, and is refused

    def load_lora_weights(self, *args, **kwargs) -> None:
        pass

    def fuse_lora(self) -> None:
        pass


@FUZZ
@given(st.one_of(
    st.binary(max_size=200).map(lambda data: ("bytes", data)),
    st.integers(min_value=0, max_value=400).map(lambda size: ("cut", size)),
    st.tuples(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=6)).map(lambda e: ("flip", e)),
    st.dictionaries(st.text(max_size=6), JSON, max_size=3).map(lambda header: ("header", header)),
    st.tuples(st.sampled_from(["F32", "F16", "I64", "Q9", 4]), st.lists(st.integers(-2, 2**40), max_size=3),
              st.lists(st.integers(-2, 2**40), max_size=3)).map(lambda entry: ("entry", entry)),
))
def test_fuzz_lora_headers_end_in_a_harness_error(tmp_path, damage):
    folder = tmp_path / "lora"
    folder.mkdir(exist_ok=True)
    path = folder / lora_io.DIFFUSERS_LORA_FILE
    save_file({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 2)}, path)
    kind, how = damage
    data = path.read_bytes()
    if kind == "bytes":
        data = how
    elif kind == "cut":
        data = data[:how]
    elif kind == "flip":
        offset, patch = how
        data = data[:offset] + patch + data[offset + len(patch):]
    else:
        if kind == "entry":
            dtype, shape, offsets = how
            how = {"unet.a.lora_A.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
        header = json.dumps(how).encode()
        data = len(header).to_bytes(8, "little") + header + data[8 + _announced_header(path):]
    path.write_bytes(data)
    source = models.resolve_lora(str(folder), None)
    assert source is not None
    try:
        models.load_lora(_Pipe(), source)
    except HarnessError as error:
        assert "\n" not in str(error)
        assert str(error).startswith((f"cannot load LoRA from '{folder}': ", f"--lora_path '{path}' holds NaN",
                                      f"LoRA from '{folder}' changes nothing in this model: "))
