"""Jobs on disk: one SQLite file, so a restarted server keeps its queue and its finished videos.

A job is a request (prompt, options, settings) plus a state: queued -> running -> done | failed |
cancelled; a queued job can also be cancelled directly. Every state change is one conditional UPDATE,
so two threads (the worker finishing a job, a user cancelling it) cannot both win. Connections are
opened per call: the queue's worker thread and the web server's threads share nothing but the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framepack_turbo.errors import InputError

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    request TEXT NOT NULL,
    image TEXT NOT NULL,
    video TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    sections_done INTEGER NOT NULL DEFAULT 0,
    sections INTEGER NOT NULL DEFAULT 0,
    frames INTEGER NOT NULL DEFAULT 0
)
"""
# Added after the first release: a store made before them gains them on open (ALTER TABLE keeps its rows).
_ADDED_COLUMNS = {
    "worker": "TEXT NOT NULL DEFAULT ''",  # the worker running (or that last ran) the job
    "attempts": "INTEGER NOT NULL DEFAULT 0",  # how many times a worker took it
    "retries": "TEXT NOT NULL DEFAULT '[]'",  # [{worker, reason, at, sections_done}] per lost worker
}


@dataclass(frozen=True)
class Job:
    id: int
    state: str
    created: float
    request: dict[str, Any]
    image: str  # the server's own copy of the start image
    video: str  # where the mp4 goes (named by the server, never by the client)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    sections_done: int = 0
    sections: int = 0
    frames: int = 0
    worker: str = ""
    attempts: int = 0
    retries: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> str:
        return self.request.get("prompt", "")


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers (the page) never wait on the worker's writes
            db.execute(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def add(self, request: dict[str, Any], image: str, video_dir: str | Path) -> Job:
        """Queue a job; its video path is made from its id."""
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO jobs (state, created, request, image, video) VALUES ('queued', ?, ?, ?, '')",
                (time.time(), json.dumps(request), image),
            )
            job_id = cur.lastrowid
            video = str(Path(video_dir) / f"job-{job_id:05d}.mp4")
            db.execute("UPDATE jobs SET video = ? WHERE id = ?", (video, job_id))
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, limit: int = 200) -> list[Job]:
        """Newest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def claim_next(self, worker: str = "") -> Job | None:
        """The oldest queued job, now running; None when nothing waits."""
        queued = self.queued(limit=1)
        return self.claim(queued[0].id, worker) if queued else None

    def queued(self, limit: int = 1000) -> list[Job]:
        """The jobs waiting, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def claim(self, job_id: int, worker: str = "") -> Job | None:
        """queued -> running on `worker`; None when another worker (or a cancel) took it first."""
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', started = ?, worker = ?, attempts = attempts + 1, error = '' "
                "WHERE id = ? AND state = 'queued'",
                (time.time(), worker, job_id),
            )
        return self.get(job_id) if cur.rowcount == 1 else None

    def retry(self, job_id: int, reason: str, resume: bool) -> bool:
        """running -> queued again after its worker was lost, the loss recorded in `retries`; `resume`: go on
        from its last finished section (its resume state is on this disk)."""
        job = self.get(job_id)
        if job is None or job.state != "running":
            return False
        lost = {"worker": job.worker, "reason": reason, "at": time.time(), "sections_done": job.sections_done}
        request = {**job.request, "resume": True} if resume else job.request
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', request = ?, retries = ? WHERE id = ? AND state = 'running'",
                (json.dumps(request), json.dumps([*job.retries, lost]), job_id),
            )
        return cur.rowcount == 1

    def progress(self, job_id: int, sections_done: int, sections: int, frames: int) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET sections_done = ?, sections = ?, frames = ? WHERE id = ?",
                (sections_done, sections, frames, job_id),
            )

    def finish(self, job_id: int, state: str, error: str = "") -> bool:
        """running -> done/failed/cancelled; False when the job was not running."""
        assert state in FINAL
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ? WHERE id = ? AND state = 'running'",
                (state, time.time(), error, job_id),
            )
        return cur.rowcount == 1

    def requeue_to_resume(self, job_id: int) -> bool:
        """failed/cancelled -> queued, to go on from its last finished section (the runner resumes it)."""
        job = self.get(job_id)
        if job is None or job.state not in ("failed", "cancelled"):
            return False
        request = {**job.request, "resume": True}
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', finished = NULL, error = '', request = ? "
                "WHERE id = ? AND state IN ('failed', 'cancelled')",
                (json.dumps(request), job_id),
            )
        return cur.rowcount == 1

    def note_queued(self, note: str) -> None:
        """Why the queued jobs wait (no worker can run them now), in their `error` until one claims them; ""
        clears it."""
        with self._db() as db:
            db.execute("UPDATE jobs SET error = ? WHERE state = 'queued'", (note,))

    def fail_queued(self, reason: str) -> list[int]:
        """Every queued job -> failed with `reason` (no worker will ever run them)."""
        with self._db() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'queued'").fetchall()]
            db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE state = 'queued'",
                (time.time(), reason),
            )
        return ids

    def cancel_queued(self, job_id: int) -> bool:
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                (time.time(), job_id),
            )
        return cur.rowcount == 1

    def recover(self) -> list[int]:
        """After a restart: jobs that were running when the server stopped are failed, with what is kept."""
        with self._db() as db:
            rows = db.execute("SELECT id, sections_done FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                kept = (
                    f"; the {row['sections_done']} finished section(s) are in its video" if row["sections_done"] else ""
                )
                db.execute(
                    "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                    (time.time(), "the server stopped while this job ran" + kept, row["id"]),
                )
        return [r["id"] for r in rows]


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        state=row["state"],
        created=row["created"],
        request=json.loads(row["request"]),
        image=row["image"],
        video=row["video"],
        started=row["started"],
        finished=row["finished"],
        error=row["error"],
        sections_done=row["sections_done"],
        sections=row["sections"],
        frames=row["frames"],
        worker=row["worker"],
        attempts=row["attempts"],
        retries=json.loads(row["retries"]),
    )


class DataDirInUse(InputError):
    """Another server holds the data dir."""


class DataDirLock:
    """One server per data dir: an exclusive lock on DATA_DIR/server.lock for as long as the server runs.

    Two servers on one folder would each take the other's running job for one a crash left behind
    (restart recovery marks it failed while it still runs). The lock is the kernel's (`flock`), so it
    goes with its process however that ends: a dead server never blocks the next. The file names the
    holder's pid for the refusal message.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "server.lock"
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"--data-dir {self.path.parent}: another framepack server (pid {holder}) is using it; stop that "
                "one, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
