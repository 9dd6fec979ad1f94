"""`framepack generate --gpus N`: start the N ranks of one context-parallel job on this machine.

Each rank is this same command in a new process, with the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so a job started here and one started with
`torchrun --nproc-per-node N -m framepack_turbo generate ...` run the same code. The parent has already checked
every input (nothing loads in it); it waits for the ranks and exits with the first failure's code.

Why not torchrun's elastic agent (torch.distributed.run) in-process: it reports a rank's failure as a
ChildFailedError summary with tracebacks and its own log lines, where a user's bad input must stay one line
and exit 2; and one job needs no restarts, rendezvous or elastic membership. Multi-node jobs use torchrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from framepack_turbo.distributed import LAUNCH_VARIABLES

GRACE_S = 30.0  # after one rank fails, how long the others get to notice and stop before they are killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int | None, base=None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCH_VARIABLES}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if threads is not None and "OMP_NUM_THREADS" not in env:  # CPU ranks share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_ranks(argv: Sequence[str], world: int, cpu: bool) -> int:
    """Run `python -m framepack_turbo *argv` as `world` ranks; their exit code (the first failure's, else 0)."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world) if cpu else None
    command = [sys.executable, "-m", "framepack_turbo", *argv]
    ranks = [subprocess.Popen(command, env=rank_environment(r, world, port, threads)) for r in range(world)]
    failed_at: float | None = None
    code = 0
    try:
        while any(p.poll() is None for p in ranks):
            for p in ranks:
                if p.returncode not in (None, 0) and code == 0:
                    code, failed_at = p.returncode, time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for p in ranks:  # a rank blocked in a collective with the one that failed never returns
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:  # the ranks got the same Ctrl-C: rank 0's cancel stops them all after the step
        for p in ranks:
            try:
                p.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
        return 130
    return code or next((p.returncode for p in ranks if p.returncode), 0)
