"""Several processes, one benchmark: the ranks that ``torchrun`` or ``accelerate launch`` start.

Launchers describe the job in RANK, WORLD_SIZE and LOCAL_RANK (plus MASTER_ADDR and MASTER_PORT for the
meeting point). A plain ``harness bench`` has none of them and is world size 1, where every function here
does nothing or hands its argument back: one process and many take the same code path.

The process group only ever carries small Python objects and finished images, never model tensors, so it
always uses gloo: it runs on CPUs and across machines, and it leaves GPU memory (and so the peak-memory
figures) alone. Every wait on the others goes through gloo's monitored barrier, which names a rank that
died or hangs instead of waiting for it forever.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch

from harness.errors import HarnessError, one_line

T = TypeVar("T")

TIMEOUT_ENV = "HARNESS_DISTRIBUTED_TIMEOUT"
# Longer than any wait that is not a failure: ranks wait while the others download and load a model, and
# while rank 0 writes a measurement's images and scores its metrics.
DEFAULT_TIMEOUT_S = 1800.0
RENDEZVOUS_TIMEOUT_ENV = "HARNESS_RENDEZVOUS_TIMEOUT"
# Launchers start every process within seconds, before any model loads: a process still alone after a minute
# was started by variables left in the shell, or beside a job that never came.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 60.0
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_FIX = (f"if these are left over from another job, unset {' '.join(LAUNCH_VARIABLES)} to run one process; "
              "otherwise start every process with torchrun or accelerate launch, which set all five.")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among the processes on this machine: which GPU it takes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self, rank: int) -> str:
        """``"rank N: "`` in front of a message about rank N; nothing when there is only one process."""
        return "" if self.size == 1 else f"rank {rank}: "


SINGLE_PROCESS = World()


def world_from_env() -> World:
    values = {}
    for field_name, variable in (("rank", "RANK"), ("size", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK")):
        text = os.environ.get(variable)
        if text is None:
            continue
        try:
            values[field_name] = int(text)
        except ValueError:
            raise HarnessError(f"{variable}={text!r} is not a whole number; start several processes with torchrun "
                               "or accelerate launch, which set it.") from None
    world = World(**values)
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise HarnessError(f"RANK={world.rank} does not fit WORLD_SIZE={world.size}; start several processes with "
                           "torchrun or accelerate launch, which set both.")
    if world.size > 1:
        _check_launch_variables(world)
    return world


def _check_launch_variables(world: World) -> None:
    """Refuse at once a job the launch variables cannot describe, instead of waiting for processes that never come.

    torchrun and accelerate launch set all five; a few of them alone are left over in a shell or a job script.
    """
    missing = [variable for variable in LAUNCH_VARIABLES if variable not in os.environ]
    if missing:
        parsed = {"WORLD_SIZE": world.size, "RANK": world.rank, "LOCAL_RANK": world.local_rank}
        given = " ".join(f"{variable}={value}" for variable, value in parsed.items() if variable in os.environ)
        raise HarnessError(f"{given} make this one of {world.size} processes, but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; {LAUNCH_FIX}")
    port = os.environ["MASTER_PORT"]
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536:
        raise HarnessError(f"MASTER_PORT={port!r} is not a port number (1 to 65535); {LAUNCH_FIX}")
    if not 0 <= world.local_rank <= world.rank:
        raise HarnessError(f"LOCAL_RANK={world.local_rank} does not fit RANK={world.rank} (a process's rank on its "
                           f"machine is between 0 and its rank); {LAUNCH_FIX}")


def timeout() -> timedelta:
    """How long a collective waits for the other processes (``HARNESS_DISTRIBUTED_TIMEOUT``)."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def rendezvous_timeout() -> timedelta:
    """How long joining the other processes waits for them (``HARNESS_RENDEZVOUS_TIMEOUT``)."""
    return _seconds(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)


def _seconds(variable: str, default: float) -> timedelta:
    text = os.environ.get(variable, str(default))
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise HarnessError(f"{variable}={text!r} is not a positive number of seconds; e.g. {default:g}.")
    return timedelta(seconds=seconds)


class ProcessLost(HarnessError):
    """This process lost the others: one died, hangs or cannot be reached."""


@contextmanager
def process_group(world: World) -> Iterator[None]:
    """Join the other processes for the block (nothing to join with one process)."""
    import torch.distributed as dist

    if world.size == 1 or dist.is_initialized():
        yield
        return
    from torch.distributed.rendezvous import rendezvous

    meeting = rendezvous_timeout()
    try:
        # The meeting gets its own short timeout; once every process is there, waits are the collectives' (long).
        store, _, _ = next(rendezvous("env://", rank=world.rank, world_size=world.size, timeout=meeting))
        dist.init_process_group("gloo", store=store, rank=world.rank, world_size=world.size, timeout=timeout())
        store.set_timeout(timeout())
    except (RuntimeError, ValueError) as error:
        place = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
        raise ProcessLost(f"WORLD_SIZE={world.size}: the other processes did not come to {place} within "
                          f"{meeting.total_seconds():g} s ({RENDEZVOUS_TIMEOUT_ENV}): {one_line(error).rstrip('.')}; "
                          f"{LAUNCH_FIX}") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device, world: World) -> torch.device:
    """Each process on a machine takes its own GPU: ``cuda`` means ``cuda:LOCAL_RANK`` with several processes.

    An explicit ``cuda:N`` is kept: the user chose it.
    """
    if world.size == 1 or device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise HarnessError(f"local rank {world.local_rank} has no GPU of its own (this machine has {count}); launch "
                           f"at most {count} process(es) per machine.")
    return torch.device("cuda", world.local_rank)


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's share: items rank, rank + size, rank + 2 * size, ... (round-robin, so shares differ by
    at most one item and every item belongs to exactly one rank)."""
    return list(items[world.rank::world.size])


@contextmanager
def _collective() -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # gloo's errors, DistBackendError among them
        # The monitored barrier knows who is missing: "[Rank 0]: Ranks 1, 2 failed to pass monitoredBarrier ..."
        missing = re.search(r"Ranks? ([\d, ]*\d) failed to pass monitoredBarrier", str(error))
        if missing is None:
            raise ProcessLost(f"lost the other processes: {one_line(error)}") from None
        ranks = missing.group(1)
        raise ProcessLost(f"{'ranks' if ',' in ranks else 'rank'} {ranks} stopped answering: failed (see its own "
                          f"error) or hung for more than {timeout().total_seconds():g} s ({TIMEOUT_ENV})") from None


def barrier(world: World) -> None:
    """Wait until every rank is here; a rank that died or does not come within the timeout is named."""
    if world.size == 1:
        return
    import torch.distributed as dist

    with _collective():
        dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True)


def gather(obj: Any, world: World) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    barrier(world)  # so a missing rank is named here instead of stalling the gather
    gathered = [None] * world.size if world.is_main else None
    with _collective():
        dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    barrier(world)
    gathered = [None] * world.size
    with _collective():
        dist.all_gather_object(gathered, obj)
    return gathered


def together(step: Callable[[], T], world: World) -> T:
    """Run ``step`` on every rank; when it fails on any rank, fail on all of them, naming the first failed rank.

    For steps that may fail on some ranks only (a rank without a GPU, the output folder that rank 0
    prepares): the others would otherwise wait for a rank that has already given up.
    """
    if world.size == 1:
        return step()
    try:
        result, error = step(), None
    except Exception as failure:  # noqa: BLE001 - reported on every rank below
        result, error = None, one_line(failure)
    for rank, message in enumerate(all_gather(error, world)):
        if message is not None:
            raise HarnessError(world.label(rank) + message)
    return cast(T, result)  # step() returned it: had it raised on this rank, the loop above would have too
