"""The experiment trackers of ``harness train --report_to``: which are installed, and config.json in a form
each of them takes. The trainer starts, feeds and finishes them through accelerate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import HarnessError, one_line

if TYPE_CHECKING:
    from PIL import Image

#: What installs each tracker of --report_to, for the error that says it is missing.
TRACKER_INSTALL = {
    "tensorboard": 'pip install "fewstep-harness[train]" (or pip install tensorboard)',
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
}
#: What to do when an installed tracker cannot start, besides training without it.
TRACKER_FIX = {
    "tensorboard": "check that the run folder can be written",
    "wandb": "log in with wandb login, or set WANDB_MODE=offline to keep the run in RUN/trackers/wandb",
    "mlflow": "check MLFLOW_TRACKING_URI, or unset it to keep the run in RUN/trackers/mlflow.db",
}


def tracker_available(name: str) -> bool:
    """Whether tracker ``name``'s package is installed, as accelerate checks it: an installed distribution, not
    just a folder of that name (wandb leaves ./wandb). Its own function, so tests can pretend it is missing."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]()


def resolve_report_to(report_to: str) -> list[str]:
    """The trackers ``--report_to`` asks for: ``all`` is each one installed; a named one that is not installed
    is refused here, before any model loads or any file is written."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKER_INSTALL if tracker_available(name)]
    if report_to not in TRACKER_INSTALL:
        raise HarnessError(f"--report_to {report_to} is not a tracker harness knows; pass one of "
                           f"{', '.join(TRACKER_INSTALL)}, all or none.")
    if not tracker_available(report_to):
        raise HarnessError(f"--report_to {report_to} needs the {report_to} package; install it with "
                           f"{TRACKER_INSTALL[report_to]}.")
    return [report_to]


def flat_config(document: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """config.json as one level of dotted keys: tensorboard's hparams take only bool, int, float and str, and
    mlflow's params only flat names, so lists and None become JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def build(names: tuple[str, ...] | list[str], folder: Path, run_name: str, project: str) -> list[Any]:
    """accelerate's trackers for --report_to, built here so every local file lands in RUN/trackers: accelerate
    would name tensorboard's folder after the project, and wandb and mlflow default to the working folder."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    artifacts = None if _mlflow_server() else str(folder.resolve() / "mlartifacts")
    makers = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", folder),
        "wandb": lambda: WandBTracker(project, name=run_name, dir=str(folder)),
        "mlflow": lambda: MLflowTracker(project, logging_dir=artifacts, run_name=run_name),
    }
    return [makers[name]() for name in names]


def start(accelerator: Any, names: tuple[str, ...] | list[str], folder: Path, project: str,
          document: dict[str, Any], step: int, report_to: str) -> str | None:
    """Start the trackers with the config; the line that ends the run when one cannot start (None when all did).

    A tracker that fails takes back every file the trackers' start wrote, so the run folder stays as it was.
    """
    created = next((path for path in (*reversed(folder.parents), folder) if not path.exists()), None)
    existing = set(folder.rglob("*"))
    folder.mkdir(parents=True, exist_ok=True)  # wandb writes to a temporary folder when its dir is missing
    try:
        if "mlflow" in names and not _mlflow_server():
            import mlflow

            # mlflow's default store is in the working folder, and its file store refuses to start.
            mlflow.set_tracking_uri(f"sqlite:///{folder.resolve() / 'mlflow.db'}")
        # The trackers were built with their folders and names; init_trackers starts them.
        accelerator.init_trackers(project, config=flat_config(document))
    except Exception as error:  # noqa: BLE001 - a tracker's own failure: no login, no network, a bad URI, ...
        # The first tracker that did not start failed; with none listed yet, mlflow's set-up did.
        started = accelerator.trackers
        failed = next((t.name for t in started if not _started(t)), report_to if started else "mlflow")
        finish(accelerator)
        _remove_new_files(folder, existing, created)
        reason, fix = one_line(error).rstrip("."), TRACKER_FIX.get(failed, "fix what it reports")
        return f"--report_to {failed} could not start: {reason}; {fix}, or train without it (--report_to none)."
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            # Its hparams land in a sub-run of their own, so the whole config also sits beside the curves,
            # indented four spaces: a code block in tensorboard's markdown.
            lines = json.dumps(document, indent=2, default=str).splitlines()
            tracker.log({"config": "\n".join("    " + line for line in lines)}, step=step)
    return None


def finish(accelerator: Any) -> None:
    """Flush and close the trackers that started. Not accelerator.end_training(): it also destroys the
    process group, which pretrain's next stage still uses."""
    for tracker in accelerator.trackers:
        if _started(tracker):
            tracker.finish()
    accelerator.trackers.clear()


def log_grid(accelerator: Any, grid: Image.Image, path: Path, step: int, name: str) -> None:
    """A validation grid to every tracker, each in the form it takes: tensorboard an array, wandb an image,
    mlflow the written file."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [grid]}, step=step)
        elif tracker.name == "mlflow":
            tracker.log_artifact(str(path), artifact_path=name)


def _mlflow_server() -> bool:
    """Whether the user points mlflow at a store of their own; else harness keeps its runs in RUN/trackers."""
    return "MLFLOW_TRACKING_URI" in os.environ


def _started(tracker) -> bool:
    """Whether a tracker's start() ran: accelerate's trackers make their run object (``.tracker``) there."""
    try:
        return tracker.tracker is not None
    except AttributeError:
        return False


def _remove_new_files(folder: Path, existing: set[Path], created: Path | None) -> None:
    """Delete what appeared in ``folder`` since ``existing`` was listed, or the outermost folder ``created``
    for it, so a tracker that failed to start leaves the run folder byte for byte as it was."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for path in sorted(set(folder.rglob("*")) - existing, key=lambda path: len(path.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
