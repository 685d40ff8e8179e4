"""The package as users install it: every module and model file in the sdist and the wheel, and a clear
line when an installation lacks the embedded model's weights."""

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.models import embedded

from .conftest import invoke

REPO = Path(__file__).resolve().parents[1]


def _tracked(*folders: str) -> set[str]:
    """Files git tracks under the folders, as paths relative to the repository."""
    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to know which files the package must hold")
    listed = subprocess.run(["git", "ls-files", *folders], cwd=REPO, capture_output=True, text=True, check=True)
    return set(listed.stdout.split())


def _expected_members() -> set[str]:
    """What an installation needs: every module of harness (and of plugins/, as harness_plugins) and every
    file of the embedded model and the architecture configs."""
    members = {name for name in _tracked("harness") if name.endswith(".py") or name.startswith(
        ("harness/models/weights/", "harness/models/configs/")) or name == "harness/py.typed"}
    members |= {"harness_plugins/" + name.removeprefix("plugins/") for name in _tracked("plugins")
                if name.endswith(".py")}
    return members


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist and the wheel built from it, as `python -m build` makes them (without an isolated env)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy of the tracked files: nothing left over in the checkout can leak in.
    source = out / "source"
    for name in _tracked("."):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                   check=True, capture_output=True)
    (sdist,) = out.glob("fewstep_harness-*.tar.gz")
    (wheel,) = out.glob("fewstep_harness-*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_wheel_holds_every_module_and_model_file(built):
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_members() - names
    assert not missing, f"the wheel lacks {sorted(missing)[:5]}"
    assert "harness/training/trainer.py" in names  # the subpackage a hand-written list once left out
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "harness = harness.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_sdist_holds_every_module_and_model_file(built):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0] + "/"
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    expected = {name.replace("harness_plugins/", "plugins/", 1) for name in _expected_members()}
    missing = expected - names
    assert not missing, f"the sdist lacks {sorted(missing)[:5]}"


def _copy_model(tmp_path: Path) -> Path:
    copy = tmp_path / "tiny-sd"
    shutil.copytree(embedded.SHIPPED_MODEL, copy)
    return copy


@pytest.mark.parametrize("damage", ["deleted", "lfs-pointer"])
def test_an_installation_without_weights_names_the_missing_file(tmp_path, monkeypatch, damage):
    model = _copy_model(tmp_path)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:  # what a checkout without git-lfs holds
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    monkeypatch.setattr(embedded, "SHIPPED_MODEL", model)
    with pytest.raises(HarnessError, match=r"weights are missing \('.*unet/diffusion_pytorch_model.safetensors'\)"):
        embedded.embedded_model()


def test_bench_without_weights_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    model = _copy_model(tmp_path)
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(embedded, "SHIPPED_MODEL", model)
    outdir = tmp_path / "run"
    result = invoke("bench", "--model", "embedded", "--device", "cpu", "--steps", "2", "--outdir", outdir)
    assert result.exit_code == 2  # a problem the user can fix, as every HarnessError
    assert result.output.count("\n") == 1 and "Error: the embedded model's weights are missing" in result.output
    assert "vae/diffusion_pytorch_model.safetensors" in result.output and "Traceback" not in result.output
    assert not outdir.exists()
