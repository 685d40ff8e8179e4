"""Several processes: torchrun and accelerate launch split a run's pipeline calls over two CPU ranks, and rank 0
writes one run folder holding exactly what a one-process run writes."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.benchmark import distributed
from harness.errors import HarnessError
from tests.conftest import record_json

# Several processes per test: not part of the fast subset.
pytestmark = pytest.mark.slow

FAST = ("--model", "embedded", "--warmup", "0", "--repeats", "1", "--quiet")
PROMPTS = [
    "a small red circle at the top on a blue background",
    "a large green square at the bottom on a white background",
    "a small yellow triangle on the left on a black background",
]
# Files that show timings (plots, the labelled comparison grids) differ between any two runs.
TIMED_FILES = re.compile(r"(latency|quality)\.png|.*compare_.*\.png")

RANK_FAILURES = '''
import os
import time

from PIL import Image

import harness
from harness.benchmark.sampler import Sampler, SamplerInfo


class RankOneExplodes(Sampler):
    name = "rank-one-explodes"
    description = "raises while generating on rank 1"

    def load(self):
        pass

    def describe(self):
        return SamplerInfo(model="none", scheduler="none")

    def generate(self, request):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("boom on rank 1")
        return [Image.new("RGB", (8, 8)) for _ in request.seeds]


class RankOneDies(RankOneExplodes):
    name = "rank-one-dies"

    def load(self):
        if os.environ.get("RANK") == "1":
            os._exit(3)  # as the kernel's out-of-memory killer would end it: no exception, no goodbye


class RankOneHangs(RankOneExplodes):
    name = "rank-one-hangs"

    def load(self):
        if os.environ.get("RANK") == "1":
            time.sleep(600)


@harness.hookimpl
def register_samplers(register):
    for cls in (RankOneExplodes, RankOneDies, RankOneHangs):
        register(cls)
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_process(*args):
    return [sys.executable, "-m", "harness", *args]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "harness", *args]


def accelerate_launch(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "harness", *args]


def _run(command, expect=0, **env):
    # One thread per process in every run, the one-process reference included: CPU kernels split over another
    # number of threads may round a pixel differently. The timeout is the test that nothing hangs.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=env, timeout=600)
    if expect is not None:
        assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, embedded_model):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _images(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.png") if not TIMED_FILES.fullmatch(p.name))


def assert_same_run(one: Path, two: Path, calls: int) -> None:
    """Two ranks wrote the one-process run's files, pixel for pixel, each image once, with world size 2."""
    assert _images(two) == _images(one)
    for name in _images(one):
        with Image.open(one / name) as a, Image.open(two / name) as b:
            assert a.size == b.size and a.tobytes() == b.tobytes(), name
    one_records, two_records = record_json(one), record_json(two)
    assert [(r["sampler"], r["steps"], r["images"]) for r in two_records] == \
           [(r["sampler"], r["steps"], r["images"]) for r in one_records]
    for single, record in zip(one_records, two_records):
        assert single["world_size"] == 1 and [rank["rank"] for rank in single["ranks"]] == [0]
        assert record["status"] == "ok" and record["world_size"] == 2
        assert len(set(record["images"])) == len(record["images"])
        assert [rank["rank"] for rank in record["ranks"]] == [0, 1]
        assert [rank["calls"] for rank in record["ranks"]] == [(calls + 1) // 2, calls // 2]  # round-robin
        assert record["timing"]["aggregate_images_per_s"] > 0
        assert {name: result.get("value") for name, result in record["metrics"].items()} == \
               {name: result.get("value") for name, result in single["metrics"].items()}
    assert "aggregate images/s" in (two / "summary.md").read_text()
    assert "aggregate images/s" not in (one / "summary.md").read_text()


def test_torchrun_bench_writes_the_one_process_run(tmp_path, prompts):
    # Two images per prompt, one per call: a prompt's images come from different ranks.
    args = ("bench", "--prompts", prompts, "--num_images", "2", "--batch", "1", "--steps", "2", "4",
            "--compare_baseline", "--baseline_steps", "2", "--metric", "psnr", "--seed", "7", *FAST)
    _run(one_process(*args, "--outdir", tmp_path / "one"))
    result = _run(torchrun(*args, "--outdir", tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", calls=6)
    assert result.stdout.count("| flash-lcm") == 2  # only rank 0 prints the table
    psnr = [r["metrics"]["psnr"] for r in record_json(tmp_path / "two") if not r["baseline"]]
    assert all("value" in result for result in psnr)


def test_two_processes_merge_metric_states_into_the_one_process_values(tmp_path, prompts):
    # Each rank streams its images through the metrics; rank 0 merges the states (sums of features for fd-lab,
    # per-image values for psnr, fidelity and coverage). Only the grid's images travel, and --save_stats agrees.
    args = ("bench", "--prompts", prompts, "--num_images", "2", "--batch", "1", "--steps", "2",
            "--compare_baseline", "--baseline_steps", "2", "--metric", "fd-lab", "psnr", "fidelity", "coverage",
            "--save_images", "grids", "--seed", "7", *FAST)
    _run(one_process(*args, "--outdir", tmp_path / "one", "--save_stats", tmp_path / "stats_one"))
    _run(torchrun(*args, "--outdir", tmp_path / "two", "--save_stats", tmp_path / "stats_two"))
    one, two = record_json(tmp_path / "one"), record_json(tmp_path / "two")
    assert [r["world_size"] for r in two] == [2, 2] and [r["images_made"] for r in two] == [6, 6]
    for single, record in zip(one, two):
        assert set(record["metrics"]) == {"fd-lab", "psnr", "fidelity", "coverage"}
        for name, result in single["metrics"].items():
            if "value" in result:
                assert record["metrics"][name]["value"] == pytest.approx(result["value"], rel=1e-6), name
            else:
                assert record["metrics"][name] == result
    flash_one = next(r for r in one if not r["baseline"])["metrics"]
    assert flash_one["fd-lab"]["value"] > 0 and flash_one["fd-lab"]["reference"] == "vanilla-sd 2 steps"
    for name in ("fd-lab_vanilla-sd_2steps.npz", "fd-lab_flash-lcm_2steps.npz"):
        with np.load(tmp_path / "stats_one" / name) as a, np.load(tmp_path / "stats_two" / name) as b:
            assert np.allclose(a["mu"], b["mu"], rtol=1e-9) and np.allclose(a["sigma"], b["sigma"], rtol=1e-9)
    assert _images(tmp_path / "two") == _images(tmp_path / "one")


def test_accelerate_launch_eval_with_metrics(tmp_path, prompts):
    from harness.models.loading import resolve_model

    # Three calls over two ranks: rank 0 makes images 0 and 2, rank 1 image 1.
    args = ("eval", "--lora_path", resolve_model("embedded").default_lora, "--prompts", prompts, "--steps", "2",
            "--baseline_steps", "2", "--metric", "psnr", "ssim", "--seed", "3", *FAST)
    _run(one_process(*args, "--outdir", tmp_path / "one"))
    _run(accelerate_launch(*args, "--outdir", tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", calls=3)


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "rank_failures.py").write_text(RANK_FAILURES)
    return folder


def test_a_sampler_failing_on_one_rank_fails_its_measurement_naming_the_rank(tmp_path, prompts, plugin_dir):
    outdir = tmp_path / "run"
    result = _run(torchrun("--plugin-dir", plugin_dir, "bench", "--sampler", "rank-one-explodes", "flash-lcm",
                           "--steps", "2", "--prompts", prompts, "--outdir", outdir, *FAST), expect=1)
    assert "Error: rank-one-explodes (2 steps): rank 1: RuntimeError: boom on rank 1" in result.stderr
    failed, ok = record_json(outdir)
    assert (failed["status"], failed["world_size"]) == ("failed", 2)
    assert failed["error"] == "rank 1: RuntimeError: boom on rank 1"
    assert (ok["sampler"], ok["status"], ok["world_size"]) == ("flash-lcm", "ok", 2)


@pytest.mark.parametrize("sampler", ["rank-one-dies", "rank-one-hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_run_and_keeps_what_finished(tmp_path, prompts, plugin_dir, sampler):
    outdir = tmp_path / "run"
    result = _run(
        torchrun(
            "--plugin-dir",
            plugin_dir,
            "bench",
            "--sampler",
            "flash-lcm",
            sampler,
            "--steps",
            "2",
            "--prompts",
            prompts,
            "--outdir",
            outdir,
            *FAST,
        ),
        expect=None,
        HARNESS_DISTRIBUTED_TIMEOUT="20",
    )
    assert result.returncode != 0
    # Rank 0 names it ("rank 1 stopped answering"), or torchrun does when it stopped rank 0 first ("rank : 1").
    assert re.search(r"rank\s+(:\s+)?1\b", result.stderr), result.stderr[-3000:]
    if sampler == "rank-one-hangs":
        assert "Error: rank 1 stopped answering: failed (see its own error) or hung for more than 20 s" in result.stderr
    [record] = record_json(outdir)
    assert (record["sampler"], record["status"], record["world_size"]) == ("flash-lcm", "ok", 2)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_hold_every_item_exactly_once(size):
    for count in range(12):
        shares = [distributed.shard(range(count), distributed.World(rank, size)) for rank in range(size)]
        assert sorted(item for share in shares for item in share) == list(range(count))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_world_comes_from_the_launchers_variables(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert distributed.world_from_env() == distributed.World(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.world_from_env() == distributed.World(3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(HarnessError, match=r"^RANK=3 does not fit WORLD_SIZE=3; start several processes"):
        distributed.world_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(HarnessError, match=r"^WORLD_SIZE='two' is not a whole number"):
        distributed.world_from_env()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(HarnessError, match="HARNESS_DISTRIBUTED_TIMEOUT='soon' is not a positive number of seconds"):
        distributed.timeout()


def test_more_processes_than_calls_is_refused(tmp_path, embedded_model):
    from harness.benchmark.runner import BenchRun
    from harness.benchmark.spec import BenchSpec
    from harness.hooks.registry import get_registry

    spec = BenchSpec(samplers=["flash-lcm"], steps=[2], prompts=PROMPTS, model="embedded", outdir=tmp_path)
    with pytest.raises(HarnessError) as failure:
        BenchRun(spec, get_registry(()), world=distributed.World(0, 4))
    assert failure.value.message == (
        "4 processes share 3 pipeline call(s) per measurement (3 prompt(s) x 1 call(s) "
        "each); launch at most that many processes, or give more prompts with --prompts."
    )


def test_one_process_records_carry_world_size_one(tmp_path, embedded_model):
    from tests.conftest import invoke

    result = invoke("bench", "--steps", "2", "--outdir", tmp_path, "--json", *FAST)
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.output)
    assert record["world_size"] == 1 and record["ranks"][0]["calls"] == 1
    assert record["timing"]["aggregate_images_per_s"] > 0
