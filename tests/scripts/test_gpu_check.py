"""scripts/gpu_check.sh: refuses a machine without CUDA in one line; its report catches what a GPU run can
get wrong (missing CUDA memory figures, wrong UNet counts, an out-of-memory request that crashed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script, make_record

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_report():
    return load_script("gpu_check_report")


def _record(sampler: str, steps: int, baseline: bool, evaluations: int, seconds: float) -> dict:
    """A record as a CUDA fp16 run writes it."""
    record = make_record(sampler, steps, seconds, baseline=baseline, guidance_scale=7.5 if baseline else 0.0,
                         evaluations=evaluations).to_json()
    record["environment"].update(device="cuda:0", dtype="float16")
    record["memory"] = {"cuda_max_allocated_mb": 2600.0, "cuda_max_reserved_mb": 3100.0}
    return record


def _write_run(work: Path, name: str, records: list, code: int, log: str = "") -> None:
    (work / name).mkdir(parents=True)
    (work / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / f"{name}.exit").write_text(f"{code}\n")
    (work / f"{name}.log").write_text(log)


def _good_work(work: Path) -> None:
    for name in ("plain", "channels-last", "compile", "compile-channels-last"):
        records = [_record("vanilla-sd", 30, True, 62, 1.2)]
        records += [_record("flash-lcm", steps, False, steps, 0.01 * steps + 0.02) for steps in (2, 4, 8)]
        _write_run(work, name, records, 0)
    failed = make_record("flash-lcm", 2, error="CUDA out of memory: reduce --num_images (or --batch) to 1 and close "
                                               "other GPU applications.").to_json()
    _write_run(work, "out-of-memory", [failed], 1, "Error: flash-lcm (2 steps): CUDA out of memory: ...\n")


def test_a_complete_gpu_run_passes_and_prints_one_table(tmp_path, gpu_report, capsys):
    _good_work(tmp_path)
    assert gpu_report.main(tmp_path) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert out.count("| flash-lcm ") == 12 and out.count("| vanilla-sd ") == 4
    assert "flash-lcm 4 steps, 512x512 fp16, --compile: 60.0 ms/image, missed (<= 40 ms)" in out


@pytest.mark.parametrize("fault, message", [
    (lambda r: r["memory"].clear(), "no CUDA memory figures"),
    (lambda r: r["unet"].update(evaluations_per_image=8), "8 UNet evaluations per image, expected 4"),
    (lambda r: r.update(deterministic=False), "did not give identical pixels"),
    (lambda r: r["environment"].update(device="cpu"), "ran on cpu in float16, not cuda float16"),
])
def test_each_fault_of_a_record_is_one_failure_line(tmp_path, gpu_report, capsys, fault, message):
    _good_work(tmp_path)
    path = tmp_path / "compile" / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    fault(records[2])  # flash-lcm at 4 steps
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gpu_report.main(tmp_path) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 1 and failures[0].startswith("FAILED compile: flash-lcm 4 steps: ")
    assert message in failures[0]


def test_an_out_of_memory_crash_fails_the_check(tmp_path, gpu_report, capsys):
    _good_work(tmp_path)
    (tmp_path / "out-of-memory.exit").write_text("1\n")
    (tmp_path / "out-of-memory.log").write_text("Traceback (most recent call last):\n torch.OutOfMemoryError\n")
    (tmp_path / "out-of-memory" / "records.jsonl").write_text("")
    assert gpu_report.main(tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAILED out-of-memory: a traceback in" in out
    assert "FAILED out-of-memory: no failed record saying 'CUDA out of memory'" in out


def test_an_up_front_memory_refusal_passes_the_check(tmp_path, gpu_report, capsys):
    # What an H200 did with 16 images of 4096x4096: harness's estimate refused the request before any call.
    _good_work(tmp_path)
    (tmp_path / "out-of-memory.exit").write_text("2\n")
    (tmp_path / "out-of-memory.log").write_text(
        "Error: --height 4096 --width 4096 with 16 images per call needs about 652.1 GiB for one call on cuda, but "
        "139.3 GiB are available; use a smaller size, --batch 1, --vae-tiling, or another device.\n")
    (tmp_path / "out-of-memory" / "records.jsonl").unlink()
    assert gpu_report.main(tmp_path) == 0
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("code, log, message", [
    (2, "Error: no such sampler\n", "exit 2 without the one-line memory refusal"),
    (2, "Traceback (most recent call last):\n torch.OutOfMemoryError\n", "a traceback in"),
    (0, "", "harness exited with 0, expected 2 (refused up front) or 1 (a failed record)"),
])
def test_an_out_of_memory_run_that_did_not_end_cleanly_fails(tmp_path, gpu_report, capsys, code, log, message):
    _good_work(tmp_path)
    (tmp_path / "out-of-memory.exit").write_text(f"{code}\n")
    (tmp_path / "out-of-memory.log").write_text(log)
    (tmp_path / "out-of-memory" / "records.jsonl").unlink()
    assert gpu_report.main(tmp_path) == 1
    assert message in capsys.readouterr().out


def test_without_cuda_the_check_is_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: no CUDA device visible to PyTorch; run this on a GPU machine with a CUDA build of torch "
        "(see docs/guides/gpu.md)."
    ]
    assert not (tmp_path / "work").exists()


def test_an_up_front_refusal_that_still_wrote_records_fails(tmp_path, gpu_report, capsys):
    _good_work(tmp_path)  # leaves the failed record of the other path in place
    (tmp_path / "out-of-memory.exit").write_text("2\n")
    (tmp_path / "out-of-memory.log").write_text("Error: ... needs about 652.1 GiB for one call on cuda, but 139.3 GiB "
                                                "are available; use a smaller size.\n")
    assert gpu_report.main(tmp_path) == 1
    assert "FAILED out-of-memory: refused up front, yet records were written" in capsys.readouterr().out
