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
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from harness.errors import HarnessError, one_line

T = TypeVar("T")

TIMEOUT_ENV = "HARNESS_DISTRIBUTED_TIMEOUT"
# Longer than any wait that is not a failure: ranks wait while the others download and load a model, and
# while rank 0 writes a measurement's images and scores its metrics.
DEFAULT_TIMEOUT_S = 1800.0


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
    return world


def timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise HarnessError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds; e.g. {DEFAULT_TIMEOUT_S:g}.")
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
    try:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout())
    except (RuntimeError, ValueError) as error:
        raise ProcessLost(f"cannot join the other processes ({one_line(error)}); start them with "
                          "torchrun or accelerate launch, which set MASTER_ADDR and MASTER_PORT.") from None
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
    return result
