"""The latency plot: what it draws from the records, and the PNG it writes."""

import pytest
from PIL import Image

from harness.reporting.plots import LATENCY_PLOT, latency_series, needs_log_scale, write_latency_plot
from tests.reporting.test_compare import make_record, run_records

RUN = [*run_records(), make_record("flash-lcm", 8, 0.4), make_record("flash-lcm", 1, error="out of memory")]


def test_one_series_per_sampler_sorted_by_steps_without_failures():
    shuffled = [RUN[3], RUN[1], RUN[0], RUN[2], RUN[4]]
    assert latency_series(shuffled) == [
        ("flash-lcm", False, [(2, 0.1), (4, 0.2), (8, 0.4)]),
        ("vanilla-sd", True, [(30, 2.0)]),
    ]


def test_log_scale_only_for_a_wide_range():
    assert needs_log_scale([0.1, 0.2, 2.0])  # the baseline is 20x the fastest
    assert not needs_log_scale([0.1, 0.2, 0.4])


def test_writes_a_png_into_the_run_folder(tmp_path):
    path = write_latency_plot(tmp_path, RUN)
    assert path == tmp_path / LATENCY_PLOT
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 400 <= width <= 2000 and 300 <= height <= 1500
        assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 10  # lines and text, not a blank page
    assert [p.name for p in tmp_path.iterdir()] == [LATENCY_PLOT]  # no temporary file left behind


def test_nothing_to_plot_when_every_measurement_failed(tmp_path):
    failed = [make_record("flash-lcm", steps, error="out of memory") for steps in (2, 4)]
    assert write_latency_plot(tmp_path, failed) is None
    assert not (tmp_path / LATENCY_PLOT).exists()


def test_same_records_give_the_same_bytes(tmp_path):
    first = write_latency_plot(tmp_path, RUN).read_bytes()
    assert write_latency_plot(tmp_path, RUN).read_bytes() == first


def test_pareto_front_keeps_only_points_nothing_beats():
    from harness.reporting.plots import QualityPoint, pareto_front

    points = [QualityPoint("a", 1.0, 20.0), QualityPoint("b", 2.0, 25.0), QualityPoint("c", 3.0, 22.0),
              QualityPoint("d", 0.5, 10.0), QualityPoint("e", 4.0, 30.0)]
    assert [p.label for p in pareto_front(points)] == ["d", "a", "b", "e"]
    assert [p.label for p in pareto_front(points, higher_is_better=False)] == ["d"]


@pytest.mark.slow
def test_quality_plot_is_written_with_metric_values_and_linked(tmp_path, embedded_model):
    from tests.conftest import invoke

    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "4", "--compare_baseline", "--metric", "psnr", "--outdir", outdir,
                    "--warmup", "0", "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    image = Image.open(outdir / "quality.png")
    assert image.size[0] >= 400
    assert "](quality.png)" in (outdir / "summary.md").read_text()
