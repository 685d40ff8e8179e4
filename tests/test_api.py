"""The public API: every name of harness.__all__ resolves, importing harness stays light, and the Python API
example of the docs runs as written (bench and train on the embedded model, records read back, a second run
into the same folder refused)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "api.md"


def test_every_public_name_resolves_and_nothing_else_is_public():
    for name in harness.__all__:
        assert getattr(harness, name) is not None, name
    assert harness.bench.__module__ == "harness.api" and callable(harness.train)
    with pytest.raises(AttributeError, match="no attribute 'runner'"):
        harness.runner  # noqa: B018 - the subpackages' modules are not public names


def test_importing_harness_loads_neither_torch_nor_diffusers():
    """The command line sets up its signal handling before anything heavy is imported: import harness must
    stay light, with every public name loaded on first use."""
    code = "import sys, harness; print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert loaded.strip() == "[]"


def test_api_keywords_are_checked_as_the_cli_checks_options(tmp_path):
    with pytest.raises(harness.HarnessError, match=r"^harness.bench\(\) has no option stepz=; did you mean steps\?"):
        harness.bench(stepz=[2])
    with pytest.raises(harness.HarnessError, match=r"^steps=\[0\]: 0 is not in the range 1<=x<=10000"):
        harness.bench(steps=[0])
    with pytest.raises(harness.HarnessError, match=r"json= option"):
        harness.bench(json=True)
    with pytest.raises(harness.HarnessError, match="sampler 'nope'"):
        harness.bench(sampler="nope", outdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any folder was made


def _documented_example() -> str:
    page = API_PAGE.read_text(encoding="utf-8")
    section = page.split("## Running from Python", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return code


@pytest.mark.slow
def test_the_documented_python_example_runs(tmp_path, embedded_model):
    run = subprocess.run([sys.executable, "-c", _documented_example()], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"flash-lcm 2 \d+\.\d{3} s/image", lines[0]) and lines[1].startswith("flash-lcm 4 ")
    assert lines[2].startswith(f"refused: '{Path('run')}' already holds a run (records.jsonl)")
    final, command = lines[3].split(" | ")
    assert Path(tmp_path, final).is_dir() and final.endswith("final") and command.startswith("harness bench")
    assert (tmp_path / "student-run" / "records.jsonl").is_file()
    assert run.stderr == ""  # quiet by default: no progress bars, no library notices


def test_a_summary_that_cannot_be_written_is_an_error_and_the_records_stay(tmp_path, monkeypatch, embedded_model):
    import errno
    import os

    from harness.reporting import report

    real = report.write_text_atomic

    def refuse_summary(path, text):
        if path.name == "summary.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(report, "write_text_atomic", refuse_summary)
    outdir = tmp_path / "run"
    with pytest.raises(harness.HarnessError, match=rf"^cannot write 'summary.md' in '{outdir}': No space left on "
                                                   r"device; .*The records are in .*records.jsonl\.$"):
        harness.bench(sampler="flash-lcm", steps=2, seed=1, warmup=0, repeats=1, outdir=outdir)
    assert [record.steps for record in harness.read_records(outdir)] == [2]
