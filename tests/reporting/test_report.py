"""Tables made from records: speedups, the ideal speedup from UNet counts, the noise warning."""

import pytest

from harness.reporting import report
from tests.conftest import make_record


def record(sampler, steps, median, stdev, evaluations, stages, baseline=False):
    return make_record(sampler, steps, median, stdev=stdev, evaluations=evaluations, stages=stages, baseline=baseline,
                       guidance_scale=7.5 if baseline else 0.0,
                       config={"model": "embedded", "prompts": ["p"], "num_images": 1, "seed": 1, "warmup": 0,
                               "repeats": 3})


BASELINE = record("vanilla-sd", 30, 1.0, 0.01, 60,
                  {"total_s": 1.0, "text_encode_s": 0.05, "denoise_s": 0.9, "decode_s": 0.05,
                   "per_step_s": [0.03] * 30}, baseline=True)
FAST = record("flash-lcm", 2, 0.1, 0.001, 2,
              {"total_s": 0.1, "text_encode_s": 0.02, "denoise_s": 0.03, "decode_s": 0.05,
               "per_step_s": [0.015, 0.015]})


def test_ideal_speedup_scales_only_the_denoising_time():
    # fixed 0.1 s + 0.9 s * 2/60 = 0.13 s -> 1.0 / 0.13
    assert report.ideal_speedup(FAST.measured, BASELINE.measured) == pytest.approx(1 / 0.13)


def test_table_shows_measured_and_ideal_speedup():
    table = report.summary_table([BASELINE, FAST])
    fast_row = next(line for line in table.splitlines() if line.startswith("| flash-lcm"))
    assert "10.00x" in fast_row and "7.69x" in fast_row
    assert "!" not in table


def test_noisy_measurements_are_flagged():
    noisy = record(
        "flash-lcm",
        4,
        0.2,
        0.02,
        4,
        {"total_s": 0.1, "text_encode_s": 0.02, "denoise_s": 0.03, "decode_s": 0.05, "per_step_s": [0.015, 0.015]},
    )  # stdev 10% of the median
    markdown = report.summary_markdown([BASELINE, noisy])
    assert "10.0% !" in markdown
    assert "too noisy to compare" in markdown
    assert "too noisy" not in report.summary_markdown([BASELINE, FAST])


def test_stage_table_accounts_for_the_whole_call():
    table = report.stage_table([BASELINE, FAST])
    fast_row = next(line for line in table.splitlines() if line.startswith("| flash-lcm"))
    cells = [cell.strip() for cell in fast_row.strip("|").split("|")]
    assert cells[:2] == ["flash-lcm", "2"]
    assert [float(cell) for cell in cells[2:]] == pytest.approx([20.0, 30.0, 15.0, 50.0, 0.0, 100.0])


def test_failed_record_is_a_row_with_its_error():
    failed = make_record("flash-lcm", 8, error="CUDA out of memory: reduce --num_images to 1")
    table = report.summary_table([BASELINE, failed])
    assert "failed: CUDA out of memory" in table
