"""A stopped `harness bench` keeps every finished measurement, whole."""

import json
import signal
import subprocess
import sys
import time

import pytest

# Real training, several processes or a real model per test: not part of the fast subset.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGTERM, 130), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_signal_mid_run_keeps_finished_records(tmp_path, embedded_model, sig, exit_code):
    outdir = tmp_path / "run"
    # Many measurements of a fast sampler: the signal lands while later ones are still running.
    command = [sys.executable, "-m", "harness", "bench", "--steps", *map(str, range(1, 40)), "--seed", "1",
               "--outdir", str(outdir), "--warmup", "0", "--repeats", "3", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records_file = outdir / "records.jsonl"
    deadline = time.monotonic() + 120
    while not (records_file.exists() and records_file.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no record was written in time"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == exit_code, stderr
    lines = records_file.read_text().splitlines()
    assert 2 <= len(lines) < 39
    records = [json.loads(line) for line in lines]  # only whole lines, even after SIGKILL
    assert all(r["status"] == "ok" for r in records)
    for record in records:
        assert all((outdir / name).is_file() for name in record["images"] + [record["grid"]])
    if sig != signal.SIGKILL:
        assert f"interrupted: {len(records)} finished measurement(s) kept" in stderr
        summary = (outdir / "summary.md").read_text()
        assert summary.count("| flash-lcm") == 2 * len(records)  # timing and stage tables
        assert not [p for p in outdir.iterdir() if p.name.startswith(".")]  # temporary files cleaned up
