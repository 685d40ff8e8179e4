"""Readers cap what a records file can ask for: grids of a bounded number of tiles and pixels, images too large
to read refused by their header, a bounded number of images per report and of bytes per self-contained page.

A records file of a few hundred kilobytes could otherwise name a hundred thousand images (or one image many
times) and make `harness report` build a grid of gigabytes.
"""

import pytest
from PIL import Image

from harness.records.store import append_record
from harness.reporting import grids, html, report
from tests.conftest import invoke, make_record


def _image(path, size=(64, 64), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Warning:")]


def test_a_record_naming_a_hundred_thousand_images_gets_a_grid_of_the_first_256(tmp_path):
    _image(tmp_path / "image_s4_i0.png")
    names = ["image_s4_i0.png"] * 100_000  # one small file, named over and over: a 2 MB records line
    append_record(tmp_path / "records.jsonl", make_record(steps=4, images=names, grid="grid_s4.png"))
    result = invoke("report", tmp_path)
    assert result.exit_code == 0, result.output
    assert _warnings(result.output) == [
        "Warning: the grids of flash-lcm (4 steps): its grid shows the first 256 of the 100000 images it names (the "
        "limit of what a record may make harness report read)."]
    with Image.open(tmp_path / "grid_s4.png") as grid:
        tiles = 16  # 256 tiles: 16 x 16 of 128 pixels (the smallest tile), 4 pixels apart
        assert grid.size == (tiles * 128 + (tiles - 1) * grids.GAP,) * 2


def test_a_grid_stays_within_its_pixel_budget_whatever_the_image_size(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "MAX_GRID_PIXELS", 10 * 256 * 256)
    _image(tmp_path / "big.png", (256, 256))
    append_record(tmp_path / "records.jsonl", make_record(steps=4, images=["big.png"] * 40, grid="grid.png"))
    report.rebuild(tmp_path)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] * grid.size[1] <= 10 * 256 * 256 * 1.2  # ten tiles and their gaps


def test_an_image_too_large_to_read_is_refused_by_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(grids, "MAX_SOURCE_PIXELS", 100 * 100)
    _image(tmp_path / "huge.png", (200, 200))
    append_record(tmp_path / "records.jsonl", make_record(steps=4, images=["huge.png"], grid="grid.png"))
    opened = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: opened.append(self) or real_load(self))
    warnings = []
    report.rebuild(tmp_path, on_warning=warnings.append)
    assert warnings == ["cannot rebuild the grids of flash-lcm (4 steps): image 'huge.png' is 200x200 pixels, more "
                        "than the 10000 a grid reads; the grid files already there are kept."]
    assert not (tmp_path / "grid.png").exists()


def test_comparisons_and_their_columns_are_capped(tmp_path):
    _image(tmp_path / "b.png", colour=(0, 0, 200))
    _image(tmp_path / "f.png")
    baseline = make_record("vanilla-sd", 30, 1.0, baseline=True, guidance_scale=7.5, images=["b.png"] * 100,
                           grid="grid_b.png")
    comparisons = [("vanilla-sd", 30, f"compare_{index}.png") for index in range(40)]
    few = make_record(steps=4, images=["f.png"] * 100, grid="grid_f.png", comparisons=comparisons)
    for record in (baseline, few):
        append_record(tmp_path / "records.jsonl", record)
    warnings = []
    report.rebuild(tmp_path, on_warning=warnings.append)
    assert len(list(tmp_path.glob("compare_*.png"))) == grids.MAX_COMPARISONS
    assert any("only the first 16 of its 40 comparison grids are made" in warning for warning in warnings)
    with Image.open(tmp_path / "compare_0.png") as grid:
        assert grid.size[0] == grids.MAX_COMPARISON_COLUMNS * 128 + (grids.MAX_COMPARISON_COLUMNS - 1) * grids.GAP


def test_a_report_reads_a_bounded_number_of_images_in_all(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_REPORT_IMAGES", 10)
    _image(tmp_path / "i.png")
    for steps in range(1, 6):
        append_record(tmp_path / "records.jsonl", make_record(steps=steps, images=["i.png"] * 6,
                                                              grid=f"grid_s{steps}.png"))
    warnings = []
    report.rebuild(tmp_path, on_warning=warnings.append)
    assert sorted(path.name for path in tmp_path.glob("grid_*.png")) == ["grid_s1.png", "grid_s2.png"]
    assert warnings[-1] == ("not rebuilding the grids of flash-lcm (5 steps): this report has read 12 images, its "
                            "limit (10); the grid files already there are kept.")
    assert (tmp_path / "summary.md").is_file()


def test_grids_of_an_ordinary_run_are_unchanged_by_the_limits(tmp_path):
    """The tiles are scaled as they are read; the grid is the same image the whole-image path drew."""
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]):
        _image(tmp_path / f"image_s4_i{index}.png", (48, 32), colour)
    names = [f"image_s4_i{index}.png" for index in range(5)]
    record = make_record(steps=4, images=names, grid="grid.png")
    grids.write_grids(tmp_path, record, [])
    with Image.open(tmp_path / "grid.png") as written:
        expected = grids.image_grid([Image.open(tmp_path / name) for name in names])
        assert written.tobytes() == expected.tobytes()


def test_a_self_contained_page_embeds_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(html, "MAX_EMBEDDED_BYTES", 3000)
    _image(tmp_path / "a" / "image_s4_i0.png")
    size = (tmp_path / "a" / "image_s4_i0.png").stat().st_size
    records = [make_record(steps=steps, grid="a/image_s4_i0.png", images=["a/image_s4_i0.png"])
               for steps in range(1, 30)]
    for record in records:
        append_record(tmp_path / "records.jsonl", record)
    source = html.ImageSource(tmp_path, embed=True)
    figures = [source.figure(record.measured.grid, "x") for record in records]
    assert source.embedded <= 3000 and source.embedded >= size
    assert sum("data:image/png;base64" in figure for figure in figures) == 3000 // size
    assert len(source.warnings) == 1 and "is not embedded: the page holds" in source.warnings[0]


@pytest.mark.parametrize("grid", ["gone/grid_s4.png", "deeper/gone/grid.png"])
def test_a_missing_grid_folder_is_named_by_its_real_name_in_report(tmp_path, grid):
    _image(tmp_path / "image_s4_i0.png")
    append_record(tmp_path / "records.jsonl", make_record(steps=4, images=["image_s4_i0.png"], grid=grid))
    result = invoke("report", tmp_path)
    assert result.exit_code == 0
    folder = grid.rsplit("/", 1)[0]
    assert _warnings(result.output) == [
        f"Warning: cannot rebuild the grids of flash-lcm (4 steps): cannot write grid '{grid}': its folder "
        f"'{folder}' does not exist; the grid files already there are kept."]
    assert ".grid" not in result.output
