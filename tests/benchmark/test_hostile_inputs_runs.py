"""Hostile runs of ``harness bench``: numeric faults, stale launcher variables, interrupts at any moment,
requests too large for the machine, broken prompt files and devices that do not exist.

Each test is one category of issue 14 (the benchmark side): harness answers with one line (``Error: ...`` or
a handled case), the exit code the README documents, no traceback, and nothing finished is lost.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.benchmark import distributed, measure, resources, timing
from harness.benchmark.prompts import read_prompt_file
from harness.cli import main as launcher
from harness.errors import HarnessError
from harness.reporting import report
from tests.conftest import invoke, record_json

FAST = ("--model", "embedded", "--warmup", "0", "--repeats", "1", "--quiet", "--seed", "0")


def harness_process(*args: object, **env: str) -> subprocess.Popen:
    """``python -m harness ARGS`` in its own process, as a user starts it, with one thread per process."""
    clean = {key: value for key, value in os.environ.items() if key not in distributed.LAUNCH_VARIABLES}
    return subprocess.Popen([sys.executable, "-m", "harness", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean, "OMP_NUM_THREADS": "1", **env})


def no_model_loads(monkeypatch) -> None:
    """Make any model load fail the test: the arguments must be refused before it."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("harness.models.loading.load_pipeline", refuse)


# ----- 1. numeric faults: NaN or inf in the UNet's outputs or the images -----

NAN_SAMPLERS = '''
import harness
from harness.benchmark.sampler import DiffusersSampler


class NanSampler(DiffusersSampler):
    """The embedded model, with a UNet that writes NaN into its output for some images of the batch."""

    name = "nan-all"
    description = "every image NaN"
    blank = slice(None)

    def prepare(self, pipe):
        forward, blank = pipe.unet.forward, self.blank

        def poisoned(*args, **kwargs):
            output = forward(*args, **kwargs)
            (output[0] if isinstance(output, tuple) else output.sample)[blank] = float("nan")
            return output

        pipe.unet.forward = poisoned


class FirstImageNanSampler(NanSampler):
    name = "nan-first"
    description = "the first image of each call NaN"
    blank = slice(0, 1)


@harness.hookimpl
def register_samplers(register):
    register(NanSampler)
    register(FirstImageNanSampler)
'''

NAN_FIX = ("(the instrumented call); with float16 or bfloat16 try --dtype float32 (half precision overflows in some "
           "UNets and VAEs), otherwise check the model's and the LoRA's weights for NaN.")


@pytest.mark.slow
# diffusers casts the NaN images to uint8 on the way to PIL, which numpy warns about: the point of this test.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_nan_images_mark_the_measurement_and_all_blank_images_fail_it(tmp_path, embedded_model):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "nan_samplers.py").write_text(NAN_SAMPLERS)
    outdir = tmp_path / "run"
    result = invoke("--plugin-dir", plugins, "bench", "--sampler", "nan-first", "nan-all", "flash-lcm", "--steps", "2",
                    "--num_images", "2", "--outdir", outdir, *FAST)

    assert result.exit_code == 1, result.output
    partly, blank, fine = record_json(outdir)
    calls = partly["stages"]["unet_calls"]
    assert partly["status"] == "ok"
    assert (partly["stages"]["nonfinite_unet_calls"], partly["stages"]["nonfinite_images"]) == (calls, 1)
    warning = f"the UNet gave NaN or inf values in {calls} of {calls} calls and 1 of 2 decoded images are NaN or inf "
    assert partly["warnings"] == [warning + NAN_FIX]
    assert f"Warning: {warning}{NAN_FIX}" in result.output
    error = f"the UNet gave NaN or inf values in {calls} of {calls} calls and every decoded image is NaN or inf "
    assert blank["status"] == "failed" and blank["error"] == error + NAN_FIX
    assert f"Error: nan-all (2 steps): {error}{NAN_FIX}" in result.output.splitlines()
    # The other measurements are kept whole, and the summary marks the one with blank images.
    assert fine["status"] == "ok" and fine["warnings"] == [] and fine["stages"]["nonfinite_images"] == 0
    for record in (partly, fine):
        assert all((outdir / name).is_file() for name in record["images"])
    # The failed measurement's pictures were written as they were made; its failure takes them away again.
    assert not list((outdir / "nan-all").glob("image_*.png"))
    summary = (outdir / "summary.md").read_text()
    assert "| nan-first (NaN) |" in summary and "| flash-lcm  " in summary
    assert report.NONFINITE_NOTE in summary
    assert "Traceback" not in result.output


def test_the_profile_counts_nan_per_unet_call_and_per_image_however_the_decoder_splits_them():
    nan = float("nan")
    text_encoder, denoiser, decoder = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()
    good, bad = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), nan)

    def call(decoded):
        def pipeline_call():
            text_encoder(torch.zeros(1, 4))
            for latent in (torch.zeros(2, 4), torch.tensor([[0.0] * 4, [nan] * 4]), torch.zeros(2, 4)):
                denoiser(latent)
            for output in decoded:
                decoder(output)
        return pipeline_call

    components = {"text_encoder": text_encoder, "denoiser": denoiser, "decoder": decoder}
    cpu = torch.device("cpu")
    # The whole batch at once; one image at a time (--vae-slicing); the batch tile by tile (--vae-tiling);
    # each image tile by tile (both): image 1 is the NaN one in every layout.
    for decoded in ([torch.cat([good, bad])], [good, bad], [torch.cat([good, bad])] * 4, [good] * 4 + [bad] * 4):
        stages = timing.profile(call(decoded), components, cpu, images=2)
        assert (stages.unet_calls, stages.nonfinite_unet_calls, stages.nonfinite_images) == (3, 1, 1)
    stages = timing.profile(call([torch.cat([good, good])]), components, cpu, images=2)
    assert (stages.nonfinite_unet_calls, stages.nonfinite_images) == (1, 0)
    assert measure.nonfinite_problem(stages, 2) == "the UNet gave NaN or inf values in 1 of 3 calls " + NAN_FIX


# ----- 2. launchers: stale or partial WORLD_SIZE / RANK / MASTER_* variables -----

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank, meeting_point", [("0", False), ("0", True), ("1", True)])
def test_stale_launcher_variables_fail_fast_with_one_line(tmp_path, embedded_model, rank, meeting_point):
    env = {"WORLD_SIZE": "2", "RANK": rank}
    if meeting_point:  # everything a launcher sets, but no other process ever comes
        port = _free_port()
        env.update(LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **{distributed.RENDEZVOUS_TIMEOUT_ENV: "2"})
    outdir = tmp_path / "run"
    started = time.monotonic()
    process = harness_process("bench", "--steps", "1", "--outdir", outdir, *FAST, **env)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 2, stderr
    assert time.monotonic() - started < 60
    [line] = stderr.strip().splitlines()  # nothing else: no traceback, no C++ log of the timeout
    if not meeting_point:
        assert line == ("Error: WORLD_SIZE=2 RANK=0 make this one of 2 processes, but LOCAL_RANK, MASTER_ADDR, "
                        "MASTER_PORT are not set; if these are left over from another job, unset WORLD_SIZE RANK "
                        "LOCAL_RANK MASTER_ADDR MASTER_PORT to run one process; otherwise start every process with "
                        "torchrun or accelerate launch, which set all five.")
    else:
        # Rank 0 waits for the others to join its meeting point; another rank cannot reach it.
        if rank == "0":
            reason = r"DistStoreError: Timed out after \d+ seconds waiting for clients\. 1/2 clients joined"
        else:
            reason = (r"DistNetworkError: The client socket has timed out after 2000ms while trying to connect to "
                      rf"\(127\.0\.0\.1, {port}\)")
        expected = (rf"Error: {'rank 1: ' if rank == '1' else ''}WORLD_SIZE=2: the other processes did not come to "
                    rf"MASTER_ADDR=127\.0\.0\.1 MASTER_PORT={port} within 2 s \(HARNESS_RENDEZVOUS_TIMEOUT\): "
                    rf"{reason}; " + re.escape(distributed.LAUNCH_FIX))
        assert re.fullmatch(expected, line), line
    assert not outdir.exists()  # refused before the run folder was made


@pytest.mark.parametrize("variables, message", [
    ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port number (1 to 65535); "),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 does not fit RANK=1 (a process's rank on its machine is between 0 and its "
                          "rank); "),
])
def test_launcher_variables_are_checked_before_any_process_waits(monkeypatch, variables, message):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500", **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HarnessError) as refused:
        distributed.world_from_env()
    assert refused.value.message == message + distributed.LAUNCH_FIX


def test_the_rendezvous_timeout_is_a_number_of_seconds(monkeypatch):
    monkeypatch.setenv(distributed.RENDEZVOUS_TIMEOUT_ENV, "0")
    with pytest.raises(HarnessError) as refused:
        distributed.rendezvous_timeout()
    assert refused.value.message == "HARNESS_RENDEZVOUS_TIMEOUT='0' is not a positive number of seconds; e.g. 60."
    monkeypatch.delenv(distributed.RENDEZVOUS_TIMEOUT_ENV)
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.rendezvous_timeout().total_seconds() == 60
    assert distributed.timeout().total_seconds() == 1800  # the collectives' own, long wait


# ----- 3. Ctrl-C or SIGTERM at any moment, imports included -----

@pytest.mark.slow
@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.3), (signal.SIGINT, 0.6), (signal.SIGINT, 1.0),
                                        (signal.SIGTERM, 0.5)])
def test_a_signal_while_harness_imports_ends_it_with_130_and_one_line(sig, delay):
    process = harness_process("plugins")
    time.sleep(delay)
    assert process.poll() is None, "harness plugins ended before the signal"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "interrupted"


STUCK_SAMPLER = '''
from datetime import timedelta
from pathlib import Path

import torch.distributed

import harness
from harness.benchmark.sampler import Sampler, SamplerInfo


class StuckSampler(Sampler):
    """Generating waits inside native code (as for another process) that a signal does not end."""

    name = "stuck"
    description = "never returns from its first call"

    def load(self):
        pass

    def describe(self):
        return SamplerInfo(model="none", scheduler="none")

    def generate(self, request):
        store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=300))
        Path(__file__).with_name("waiting").touch()
        store.wait(["a key nobody sets"])


@harness.hookimpl
def register_samplers(register):
    register(StuckSampler)
'''


@pytest.mark.slow
def test_an_interrupt_inside_a_native_call_ends_the_run_within_seconds_keeping_what_finished(tmp_path, embedded_model):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "stuck_sampler.py").write_text(STUCK_SAMPLER)
    outdir = tmp_path / "run"
    process = harness_process("--plugin-dir", plugins, "bench", "--sampler", "flash-lcm", "stuck", "--steps", "1",
                              "--outdir", outdir, *FAST)
    deadline = time.monotonic() + 180
    while not (plugins / "waiting").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the stuck sampler never started"
        time.sleep(0.1)
    time.sleep(0.5)  # inside store.wait by now
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert time.monotonic() - sent < launcher.STUCK_AFTER_S + 10
    assert stderr.splitlines()[-1] == launcher.STUCK_MESSAGE and "Traceback" not in stderr
    [record] = record_json(outdir)  # the finished measurement, whole
    assert (record["sampler"], record["status"]) == ("flash-lcm", "ok")
    assert all((outdir / name).is_file() for name in record["images"])
    assert invoke("report", outdir).exit_code == 0 and (outdir / "summary.md").is_file()


# ----- 4. resources: a call that cannot fit is refused before anything loads -----

@pytest.mark.parametrize("args, available_gib, message", [
    (("--height", "4096", "--width", "4096"), 1.0,
     "--height 4096 --width 4096 with 1 image per call needs about 20.9 GiB for one call on cpu, but 1.0 GiB are "
     "available; use a smaller size, --vae-tiling, or another device."),
    (("--height", "1024", "--width", "1024", "--num_images", "4", "--vae-tiling"), 0.5,
     "--height 1024 --width 1024 with 4 images per call needs about 2.3 GiB for one call on cpu, but 0.5 GiB are "
     "available; use a smaller size, --batch 1, or another device."),
])
def test_a_call_too_large_for_the_memory_left_is_refused_with_the_estimate(tmp_path, embedded_model, monkeypatch,
                                                                            args, available_gib, message):
    no_model_loads(monkeypatch)
    monkeypatch.setattr(resources, "available_memory", lambda device: int(available_gib * 2**30))
    result = invoke("bench", "--steps", "1", "--outdir", tmp_path / "run", *args, *FAST)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="reads the machine's free memory from /proc")
def test_a_call_no_machine_can_hold_is_refused_on_this_one(tmp_path, embedded_model, monkeypatch):
    no_model_loads(monkeypatch)
    result = invoke("bench", "--height", "65536", "--width", "65536", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 2
    assert re.fullmatch(r"Error: --height 65536 --width 65536 with 1 image per call needs about 5312\.1 GiB for one "
                        r"call on cpu, but \d+\.\d GiB are available; use a smaller size, --vae-tiling, or another "
                        r"device\.", result.output.strip().splitlines()[-1])


def test_the_estimate_covers_the_embedded_model_and_knows_what_helps():
    from harness.models import loading as models
    from harness.models.speed import SpeedOptions

    unet, vae, parameters = resources.model_architecture(models.resolve_model("embedded"))
    assert resources.native_size(unet, vae) == (64, 64)

    def estimate(size, images=1, guided=False, **speed):
        return resources.estimate_call_memory(unet, vae, size, size, images, guided, torch.float32,
                                              SpeedOptions(**speed), parameters)

    # Above the peak RSS of one call measured on a CPU (MiB over the loaded pipeline): 26 at 64 px, 126 at 256,
    # 345 at 512, 524 for 2 guided images at 512.
    assert estimate(64).total > 26 * 2**20 and estimate(512).total > 345 * 2**20
    assert estimate(512, 2, guided=True).total > 524 * 2**20
    assert estimate(4096, vae_tiling=True).decoder < estimate(4096).decoder / 100
    assert estimate(512, 2, vae_slicing=True).decoder == estimate(512).decoder
    # Matmul + softmax attention holds the VAE's 16384 x 16384 scores twice (measured: 2150 MiB in all).
    assert estimate(512, attention="math").decoder == estimate(512).decoder + 2 * 16384**2 * 4


def test_a_hub_model_in_the_local_cache_is_estimated_from_its_cached_configs(tmp_path, embedded_model, monkeypatch):
    import huggingface_hub.constants

    from harness.models import loading as models

    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "abc"
    for part in ("unet", "vae"):
        (snapshot / part).mkdir(parents=True)
        (snapshot / part / "config.json").write_bytes((embedded_model / part / "config.json").read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = resources.model_architecture(models.resolve_model("someone/tiny-sd"))
    assert cached == (*resources.model_architecture(models.resolve_model("embedded"))[:2], 0)  # no weights cached
    assert resources.model_architecture(models.resolve_model("someone/not-downloaded")) is None


# ----- 5. prompt files -----

JSONL_FIX = ("; write every line of a JSONL prompt file as {\"prompt\": \"...\"} (a line is never skipped: the "
             "prompts after it would draw other seeds).")


@pytest.mark.parametrize("name, content, problem", [
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": 5}\n', "line 2 of {path}: 'prompt' is a number, not text"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": null}\n', "line 2 of {path}: 'prompt' is null, not text"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": ["a", "dog"]}\n', "line 2 of {path}: 'prompt' is a list, not text"),
    ("p.txt", b'{"prompt": "a cat"}\n\n["a dog"]\n', "line 3 of {path}: a list, not an object"),
    ("p.txt", b'{"prompt": "a cat"}\n\r\n{"text": "a dog"}\r\n', "line 3 of {path}: no 'prompt' field"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": "  "}\n', "line 2 of {path}: 'prompt' is empty"),
    ("p.jsonl", b"a cat\n", "line 1 of {path}: not JSON"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a dog"\n', "line 2 of {path}: not JSON"),
])
def test_a_bad_jsonl_line_is_named_and_stops_the_run(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke("bench", "--dry-run", "--prompts", path)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: " + problem.format(path=path) + JSONL_FIX]


@pytest.mark.parametrize("content, message", [
    (b"a cat\n\xff a dog\n", "prompt file '{path}' is not UTF-8 text (byte 0xff on line 2); save it as UTF-8."),
    (b"\xff\xfea\x00 \x00c\x00", "prompt file '{path}' is UTF-16 text; save it as UTF-8."),
    (b"a cat\na\x00 \x00d\x00o\x00g\x00", "prompt file '{path}' holds a NUL byte on line 2: it is binary or UTF-16, "
                                          "not UTF-8 text; save it as UTF-8."),
    (b"\n \n", "prompt file '{path}' holds no prompts; write one prompt per line."),
])
def test_a_prompt_file_that_is_not_utf8_text_is_one_line(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    result = invoke("bench", "--dry-run", "--prompts", path)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: " + message.format(path=path)]


def test_prompt_files_with_a_byte_order_mark_or_windows_lines_read_as_written(tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": " a cat "}\r\n\r\n{"prompt": "a dog", "id": 2}\r\n')
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"\xef\xbb\xbfa cat\r\n\r\na dog\r\n")
    assert read_prompt_file(jsonl) == read_prompt_file(text) == ["a cat", "a dog"]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=6)
LINES = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda text: text.encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.sampled_from(["prompt", "text"]), JSON_VALUES, max_size=2).map(lambda v: json.dumps(v).encode()),
    st.text(max_size=20).map(lambda prompt: json.dumps({"prompt": prompt}).encode()),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINES, max_size=6), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_no_prompt_file_makes_the_reader_raise_anything_but_a_named_harness_error(tmp_path_factory, lines, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"prompts{suffix}"
    path.write_bytes(b"\n".join(lines))
    try:
        prompts = read_prompt_file(path)
    except HarnessError as error:
        assert "\n" not in error.message and str(path) in error.message
        return
    assert prompts and all(isinstance(prompt, str) and prompt == prompt.strip() and prompt for prompt in prompts)


# ----- 6. devices are checked before anything loads -----

@pytest.mark.parametrize("device, gpus, message", [
    ("gpu", 0, "--device gpu is not a device a pipeline can run on; use cpu."),
    ("meta", 0, "--device meta is not a device a pipeline can run on; use cpu."),
    ("meta", 1, "--device meta is not a device a pipeline can run on; use one of: cpu, cuda, cuda:0."),
    ("cuda:7", 1, "--device cuda:7 is not a device a pipeline can run on (this machine has 1 GPU); use one of: cpu, "
                  "cuda, cuda:0."),
    ("xpu", 2, "--device xpu is not a device a pipeline can run on; use one of: cpu, cuda, cuda:0, cuda:1."),
])
def test_a_device_no_pipeline_can_run_on_is_refused_before_anything_loads(tmp_path, embedded_model, monkeypatch,
                                                                          device, gpus, message):
    no_model_loads(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = invoke("bench", "--device", device, "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert not (tmp_path / "run").exists()


def test_a_name_that_is_not_valid_text_is_printed_escaped_not_a_traceback(tmp_path):
    from tests.conftest import make_record

    run = tmp_path / "run"
    run.mkdir()
    # A lone surrogate, as JSON can carry it and as a folder name in another encoding reaches Python.
    line = json.dumps(make_record(sampler="x\ud800y", steps=2).to_json())
    (run / "records.jsonl").write_text(line + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "harness", "report", str(run)], capture_output=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"| x\\ud800y " in done.stdout and b"Traceback" not in done.stderr
