"""The ranks of one job split over several processes (context parallelism): who this process is, how the
process group starts, and what the ranks must agree on.

Every rank runs the same job on the same inputs: the same seed, the same conditioning, the same sampler. The
transformer splits each call's sequence over the ranks (optim/parallel.py) and gathers it back, so every rank
holds the same latents after every step; rank 0 alone decodes and writes. Anything a rank decides from data
only it sees must be agreed on, or the ranks stop meeting in the same collective and hang: the step caches take
their decision's means over the ranks (`means_over_ranks`), a cancel is rank 0's (`SharedCancel`), a random
seed is rank 0's (`primary_int`), and a job whose inputs differ between ranks is refused (`check_same`).

Launchers (torchrun, `framepack generate --gpus N`, a Ray actor group) set the torchrun variables RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `start` reads them. Outside a launched job every helper
here is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from framepack_turbo.errors import FramePackError, InputError
from framepack_turbo.pipeline.events import CancelToken

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Set by `--gpus N` (launch.py): where this rank writes the traceback of an error it does not handle, instead of the
# terminal (the launcher reports the first failing rank in one line and names the file).
ERROR_FILE = "RANK_ERROR_FILE"
# How long a rank waits in a collective for the others: long enough for a slower rank's model load or rank 0's
# decode, short enough that a job whose rank died fails instead of hanging (torch's default is 30 min).
COLLECTIVE_TIMEOUT = timedelta(minutes=15)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """Rank 0: the one that decodes, writes and reports."""
        return self.rank == 0


def launched(environ: Mapping[str, str] | None = None) -> Ranks | None:
    """The ranks a launcher (torchrun, `--gpus`, a Ray group) gave this process, or None when none did."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    try:
        world, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise InputError(f"launcher variables: {exc}") from None
    return Ranks(rank, world, local)


def active() -> bool:
    """A process group of more than one rank is running in this process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def current() -> Ranks:
    if not active():
        return Ranks()
    rank = torch.distributed.get_rank()
    return Ranks(rank, torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def backend_for(device_type: str) -> str:
    """gloo on the CPU; on CUDA, NCCL for the tensors and gloo beside it for host values: diffusers exchanges
    uneven shard sizes as host integers through gloo when the group has it, instead of a device sync per call."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def start(device_type: str, degree: int, environ: Mapping[str, str] | None = None) -> Ranks:
    """Join the process group the launcher described (once per process) and pick this rank's GPU.

    Raises FramePackError when the launch does not match the settings: context parallelism over `degree`
    ranks needs exactly `degree` processes."""
    ranks = launched(environ)
    if ranks is None:
        raise FramePackError(
            f"PARALLEL_DEGREE={degree} needs {degree} processes: run `framepack generate --gpus {degree} ...`, "
            f"or start it with `torchrun --nproc-per-node {degree} -m framepack_turbo generate ...`"
        )
    if ranks.world != degree:
        raise InputError(
            f"launched as {ranks.world} processes but PARALLEL_DEGREE (--gpus) is {degree}: they must be equal"
        )
    if device_type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"rank {ranks.rank} wants GPU {ranks.local_rank}, but this machine has {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(ranks.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend_for(device_type), rank=ranks.rank, world_size=ranks.world, timeout=COLLECTIVE_TIMEOUT
        )
    environ = os.environ if environ is None else environ
    if environ.get(ERROR_FILE):  # after init_process_group: torch's own hook (which prints) is replaced, not chained
        errors_to_file(Path(environ[ERROR_FILE]))
    return ranks


def errors_to_file(path: Path) -> None:
    """An error this process does not handle goes, traceback and all, to `path` (appended), not to stderr.

    For the ranks `--gpus N` starts: when one rank dies, every other fails in its next collective with a gloo or
    NCCL traceback of its own; the launcher prints the first failure in one line and names the files."""

    def hook(kind, value, tb) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(kind, value, tb)))
        # What the process says while it ends goes there too: c10d's warnings about the collectives left in flight
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 2)
        os.close(fd)

    sys.excepthook = hook


def stop() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks (a new host tensor; `values` itself outside a launched job)."""
    if not active():
        return values
    total = values.detach().to("cpu", torch.float64).clone()
    torch.distributed.all_reduce(total)
    return total


def means_over_ranks(*tensors: torch.Tensor) -> list[float]:
    """The mean of each tensor over every rank's elements (shares may be uneven): one all-reduce of the sums
    and the counts. A step cache's decision is a ratio of such means over the whole sequence; every rank gets
    the same numbers and so decides the same."""
    local = [float(t.sum()) for t in tensors] + [float(t.numel()) for t in tensors]
    total = sum_over_ranks(torch.tensor(local, dtype=torch.float64)).tolist()
    return [sum_ / count for sum_, count in zip(total[: len(tensors)], total[len(tensors) :])]


def primary_int(value: int) -> int:
    """Rank 0's `value` on every rank (a seed drawn at random must be one seed, not one per rank)."""
    if not active():
        return value
    holder = torch.tensor([value], dtype=torch.int64)
    torch.distributed.broadcast(holder, src=0)
    return int(holder.item())


def check_same(what: str, values: torch.Tensor) -> None:
    """Refuse a job whose inputs differ between ranks (every rank raises the same error, none hangs)."""
    if not active():
        return
    local = values.detach().to("cpu", torch.float64).flatten()
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    differ = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differ:
        raise InputError(
            f"the ranks were given different {what} (rank {differ[0]} differs from rank 0): every rank must get "
            "the same inputs, settings and seed"
        )


class SharedCancel(CancelToken):
    """Rank 0's cancel on every rank: each read is a broadcast of rank 0's token, so all ranks stop after the
    same step. Every rank must read it at the same points (the generator reads it once per step)."""

    def __init__(self, token: CancelToken | None) -> None:
        super().__init__()
        self.token = token or CancelToken()

    def cancel(self) -> None:
        self.token.cancel()

    @property
    def cancelled(self) -> bool:
        flag = torch.tensor([1 if self.token.cancelled else 0], dtype=torch.int64)
        if active():
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def wait(self, timeout: float | None = None) -> bool:
        return self.token.wait(timeout)
