"""Replacing a folder is atomic against kill -9 at any point, and the next write settles what a killed one left.

write_folder_atomic replaces a folder with two renames (the old version aside, the new one in). Each test here
kills a real process with SIGKILL at one point of that sequence, then checks that the folder holds one whole
version (the old one, or the new one once it was whole), that no hidden folder is left, and that it was said.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.records import files

KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from harness.records import files

    target, point = Path(sys.argv[1]), sys.argv[2]
    real_rename, real_rmtree, renames = Path.rename, shutil.rmtree, []

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def rename(self, to):
        renames.append(self)
        if point == f"before rename {len(renames)}":
            kill()
        return real_rename(self, to)

    def rmtree(path, *args, **kwargs):
        if point == "while removing the old version" and ".old-" in Path(path).name:
            os.remove(next(Path(path).iterdir()))
            kill()
        return real_rmtree(path, *args, **kwargs)

    def write(folder):
        (folder / "a.txt").write_text("new")
        if point == "while writing":
            kill()
        (folder / "b.txt").write_text("new")

    Path.rename, shutil.rmtree = rename, rmtree
    files.write_folder_atomic(target, write)
""")

# Where the kill lands, and which whole version the folder holds once the next run has settled it.
POINTS = {
    "while writing": "old",
    "before rename 1": "old",  # filled, not yet marked whole
    "before rename 2": "new",  # whole, the old version still in place
    "before rename 3": "new",  # the old version aside, the new one not yet in: the case of issue 28
    "while removing the old version": "new",
    "never": "new",
}


def _version(folder: Path) -> str | None:
    if not folder.exists():
        return None
    texts = {path.name: path.read_text() for path in folder.iterdir()}
    assert len(set(texts.values())) == 1 and set(texts) == {"a.txt", "b.txt"}, texts  # one whole version
    return next(iter(texts.values()))


def _killed_write(target: Path, point: str) -> None:
    result = subprocess.run([sys.executable, "-c", KILLER, str(target), point], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == (0 if point == "never" else -9), result.stderr


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def _old(target: Path) -> None:
    target.mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (target / name).write_text("old")


@pytest.mark.parametrize("point", POINTS)
def test_a_replacement_killed_at_any_point_is_settled_by_the_next_write(tmp_path, point):
    target = tmp_path / "lora" / "final"
    _old(target)
    _killed_write(target, point)
    told = []
    files.recover_folders(target.parent, told.append)
    assert _version(target) == POINTS[point]
    assert _hidden(target.parent) == []
    if point == "never":
        assert told == []
    else:
        assert told and all(f"'{target}'" in line for line in told)
        assert any(line.startswith(("Finished replacing", "Restored", "Removed")) for line in told)
    # The next replacement works as if nothing had happened.
    files.write_folder_atomic(target, lambda folder: [(folder / n).write_text("next") for n in ("a.txt", "b.txt")],
                              notify=told.append)
    assert _version(target) == "next" and _hidden(target.parent) == []


@pytest.mark.parametrize("point", ["while writing", "before rename 1", "before rename 2"])
def test_a_first_write_killed_leaves_no_folder_and_the_rerun_removes_its_staging(tmp_path, point):
    target = tmp_path / "data"
    _killed_write(target, point)
    told = []
    files.write_folder_atomic(target, lambda folder: [(folder / n).write_text("rerun") for n in ("a.txt", "b.txt")],
                              notify=told.append)
    assert _version(target) in ("rerun",)
    assert _hidden(tmp_path) == []
    assert told and told[-1].startswith(("Removed 1 hidden folder(s)", "Finished replacing"))


def test_the_folders_of_a_running_writer_are_left_alone(tmp_path):
    target = tmp_path / "final"
    _old(target)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            staging = tmp_path / f".final.tmp-{sleeper.pid}-0123abcd"
            staging.mkdir()
            told = []
            files.recover_folders(tmp_path, told.append)
            assert staging.is_dir() and told == []
        finally:
            sleeper.kill()
    sleeper.wait()
    files.recover_folders(tmp_path, told.append)
    assert not staging.exists() and len(told) == 1
    assert _version(target) == "old"


def test_names_that_only_look_like_leftovers_are_not_touched(tmp_path):
    for name in (".final.tmp-notapid-0123abcd", ".final.tmp-1-xyz", "final.tmp-99999999-0123abcd", ".final.bak"):
        (tmp_path / name).mkdir()
    files.recover_folders(tmp_path, lambda line: pytest.fail(line))
    assert len(list(tmp_path.iterdir())) == 4


def test_data_shapes_removes_and_names_the_staging_folder_of_a_killed_run(tmp_path):
    from tests.conftest import invoke

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / f".shapes.tmp-{dead.pid}-0123abcd"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "000000.png").write_bytes(b"x" * 2_000_000)
    result = invoke("data", "shapes", "--out", tmp_path / "shapes", "--n", "2")
    assert result.exit_code == 0, result.output
    assert (f"Removed 1 hidden folder(s) (2.0 MB) that an interrupted run left beside '{tmp_path / 'shapes'}', e.g. "
            f"'{staging.name}'.") in result.output
    assert _hidden(tmp_path) == [] and len(list((tmp_path / "shapes" / "images").iterdir())) == 2
