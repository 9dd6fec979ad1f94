"""`framepack generate --gpus N`: start the N ranks of one context-parallel job on this machine.

Each rank is this same command in a new process, with the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so a job started here and one started with
`torchrun --nproc-per-node N -m framepack_turbo generate ...` run the same code. The parent has already checked
every input (nothing loads in it); it waits for the ranks and exits with the first failure's code, reported in one
line (the rank, its exit, its error) with the ranks' tracebacks in a log folder, not on the terminal.

Why not torchrun's elastic agent (torch.distributed.run) in-process: it reports a rank's failure as a
ChildFailedError summary with tracebacks and its own log lines, where a user's bad input must stay one line
and exit 2; and one job needs no restarts, rendezvous or elastic membership. Multi-node jobs use torchrun.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from framepack_turbo.distributed import ERROR_FILE, LAUNCH_VARIABLES

GRACE_S = 30.0  # after one rank fails, how long the others get to notice and stop before they are killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int | None, base=None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in (*LAUNCH_VARIABLES, ERROR_FILE)}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if threads is not None and "OMP_NUM_THREADS" not in env:  # CPU ranks share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _option(argv: Sequence[str], *names: str) -> str | None:
    """The value of the last of `names` in a command line (`--out X` or `--out=X`), or None."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(log: Path) -> tuple[str, bool]:
    """The error a rank's log ends with: its last exception's line (and True: it was a traceback), else its last
    one-line `error:` (False), else ''."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "", False
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:  # the exception's line: the first after the frames (which are indented)
        exception = next((line for line in lines[starts[-1] + 1 :] if line and not line[0].isspace()), "")
        return exception.strip(), True
    said = [line for line in lines if line.startswith("error:")]
    return (said[-1][len("error:") :].strip(), False) if said else ("", False)


def _first_failure(ranks: Sequence[subprocess.Popen]) -> tuple[int, int] | None:
    """(rank, exit code) of the failure that came first among those seen at once: a rank killed by a signal
    before one that exited with an error (the others fail because it is gone), then the lowest rank."""
    failed = [(r, p.returncode) for r, p in enumerate(ranks) if p.poll() not in (None, 0)]
    return min(failed, key=lambda f: (f[1] >= 0, f[0])) if failed else None


def _report(rank: int, code: int, world: int, logs: Path, argv: Sequence[str]) -> bool:
    """One line for the first failing rank (its exit and its error), and how the job goes on; False when there
    was nothing to add (rank 0 said its own error in one line)."""
    detail, crashed = _last_error(logs / f"rank{rank}.log")
    if rank == 0 and code > 0 and not crashed:  # a refused input, an error rank 0 handled: already said
        return False
    where = f" (the ranks' logs: {logs})" if any(logs.iterdir()) else ""
    print(
        f"error: rank {rank} of {world} {_exit(code)}{': ' + detail if detail else ''}; the other ranks stopped"
        + where,
        file=sys.stderr,
    )
    clip = _option(argv, "--resume") or _option(argv, "--out")
    if clip is None:
        print("note: `framepack generate --resume CLIP.mp4` goes on from its last finished section", file=sys.stderr)
        return True
    from framepack_turbo.pipeline.resume import state_path

    if state_path(clip).exists():
        print(f"note: `framepack generate --resume {clip}` goes on from its last finished section", file=sys.stderr)
    return True


def run_ranks(argv: Sequence[str], world: int, cpu: bool) -> int:
    """Run `python -m framepack_turbo *argv` as `world` ranks; their exit code (the first failure's, else 0).

    Rank 0 keeps the terminal (its progress and messages). The others write theirs, and every rank the traceback
    of an error it does not handle, to a log folder; when a rank fails, one line names it, its exit and its
    error, and the folder is kept (removed after a job that succeeds). `--verbose` leaves everything on the
    terminal, as the ranks print it."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world) if cpu else None
    command = [sys.executable, "-m", "framepack_turbo", *argv]
    verbose = "--verbose" in argv or "-v" in argv
    logs = Path(tempfile.mkdtemp(prefix="framepack-ranks-"))
    ranks: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        for r in range(world):
            env = rank_environment(r, world, port, threads)
            out = None
            if not verbose:
                env[ERROR_FILE] = str(logs / f"rank{r}.log")
                if r:
                    out = files.enter_context((logs / f"rank{r}.log").open("ab"))
            ranks.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
        first: tuple[int, int] | None = None
        failed_at = 0.0
        try:
            while any(p.poll() is None for p in ranks):
                if first is None and (first := _first_failure(ranks)) is not None:
                    failed_at = time.monotonic()
                if first is not None and time.monotonic() - failed_at > GRACE_S:
                    for p in ranks:  # a rank blocked in a collective with the one that failed never returns
                        if p.poll() is None:
                            p.kill()
                time.sleep(0.05)
        except KeyboardInterrupt:  # the ranks got the same Ctrl-C: rank 0's cancel stops them all after the step
            for p in ranks:
                try:
                    p.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
            shutil.rmtree(logs, ignore_errors=True)
            return 130
    first = first or _first_failure(ranks)
    if first is None:
        shutil.rmtree(logs, ignore_errors=True)
        return 0
    rank, code = first
    if not _report(rank, code, world, logs, argv) or not any(logs.iterdir()):
        shutil.rmtree(logs, ignore_errors=True)  # kept only where the line names it
    return 128 - code if code < 0 else code
