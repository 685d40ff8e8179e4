"""The experiment trackers of ``harness train --report_to``: which are installed, and config.json in a form
each of them takes. The trainer starts, feeds and finishes them through accelerate."""

from __future__ import annotations

import json
from typing import Any

from harness.errors import HarnessError

#: What installs each tracker of --report_to, for the error that says it is missing.
TRACKER_INSTALL = {
    "tensorboard": 'pip install "harness[train]" (or pip install tensorboard)',
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
