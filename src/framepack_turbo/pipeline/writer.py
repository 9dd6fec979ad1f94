"""The video as it becomes final: each frame encoded once, beside the sampler, the file playable throughout.

A frame is final once no later section can blend into it (F1: all but the overlap at the end; inverted:
all but the overlap at the front). The generator hands each section's final frames to a `ClipWriter`,
which on its own thread encodes them as one segment in the parts folder beside the video
(`clip.parts/seg-0007.mp4`), then joins the segments into the playable `clip.mp4` by copying packets
(video.join: no re-encoding), then runs the section's `then` (the resume state, the sidecar). Every file
is replaced atomically, so a process killed at any moment leaves the last good `clip.mp4`.

Why a thread: PyAV and x264 do their work outside the GIL, so on a GPU machine the encoder runs on the
host's cores while the transformer runs on the device. The queue holds at most `depth` sections: a writer
slower than the sampler makes the sampler wait (counted as `write_wait`) instead of holding the clip in
memory. The finished clip is joined once more with its index at the front, and the parts are removed.

One job writes a clip at a time: `ClipLock` holds `clip.parts/.lock` (the kernel's lock, so it goes with its
process however that ends) for as long as a job writes the clip, a new one or a resume; a second job on the
same file is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framepack_turbo.errors import FramePackError, InputError
from framepack_turbo.pipeline import video

log = logging.getLogger(__name__)

HEAD = "head.mp4"  # a video extension's copied input, first in time
STOP = "stop.mp4"  # the overlap frames at a stop (cancel, failure): final for this run, not for a resume
LOCK = ".lock"  # held by the job writing the clip (a dot file: the Ray workers' file sync leaves it out)
_HOLDER_AT = 16  # the holder's name is written past the first bytes (the byte range Windows locks)


def parts_dir(video_path: str | Path) -> Path:
    """The folder beside the video that holds its segments and resume state while the job runs."""
    path = Path(video_path)
    return path.with_name(path.stem + ".parts")


def segment_name(index: int) -> str:
    return f"seg-{index:04d}.mp4"


def segment_frames(path: str | Path) -> int:
    """The frames of a segment, counted by its packets (each x264 packet here is one frame): no decoding."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def clear_parts(parts: Path) -> None:
    """Everything in the parts folder but the lock of the job holding it, and the folder too when that leaves
    it empty (no job holds it)."""
    if not parts.is_dir():
        return
    for entry in parts.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts.rmdir()


class ClipInUse(InputError):
    """Another job is writing this clip (its lock is held)."""


class ClipLock:
    """One job per clip: an exclusive lock on `clip.parts/.lock` for as long as a job writes the clip.

    Two jobs on one file (two `--resume` of a stopped clip, or two jobs with the same `--out`) would each
    append their sections to the other's: a clip of twice the frames, marked complete. The lock is the
    kernel's (`flock`; a locked byte on Windows), so it goes with its process however that ends: a killed
    job never blocks the next, and a stale lock file means nothing. The holder's pid and host are written in
    the file for the refusal. Released, the file is removed while still locked, so a job that opened it
    just before finds, once it has the lock, that the file it holds is no longer the one on disk, and takes
    the new one: the lock is never held twice."""

    def __init__(self, video_path: str | Path) -> None:
        self.video = Path(video_path)
        self.path = parts_dir(self.video) / LOCK
        self._fd: int | None = None

    def acquire(self, resume: bool = False) -> ClipLock:
        for _ in range(20):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the holder removed the folder as it finished: try again
                continue
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise ClipInUse(_in_use(self.video, holder, resume))
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.lseek(fd, _HOLDER_AT, os.SEEK_SET)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)  # the job that held it removed it as it ended: lock the file there now
        raise ClipInUse(_in_use(self.video, "", resume))

    def release(self) -> None:
        """Drop the lock: its file removed first (while held), then the parts folder if nothing else is in it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # empty: the clip finished (or the job wrote nothing)
        finally:
            os.close(fd)  # closing the last descriptor drops the lock

    def __enter__(self) -> ClipLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    """True: this descriptor holds the lock now; False: another holds it. A filesystem without locks
    (some network and FUSE mounts) is not a reason to refuse every job: it goes on unlocked, with a warning."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        log.warning("cannot lock the clip (%s): going on without the lock that keeps a second job off it", exc)
        return True


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, _HOLDER_AT, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""


def _in_use(video_path: Path, holder: str, resume: bool) -> str:
    who = f"another job ({holder})" if holder else "another job"
    if resume:
        return (
            f"--resume {video_path}: {who} is writing this clip now; wait for it to finish (or stop it, then "
            "resume again)"
        )
    return f"--out {video_path}: {who} is writing this clip now; give this job another --out, or wait for that one"


class WriterError(FramePackError):
    """The video writer failed; what it wrote before stays playable."""

    exit_code = 1


@dataclass(frozen=True)
class Written:
    """A section on disk: its frames are in the playable file (the generator turns it into SectionDone)."""

    section: int  # 0-based generation order
    frames: int  # frames in the playable file now
    encode_s: float
    join_s: float
    payload: Any = None


class ClipWriter:
    """Segments in time order: `backward` (the inverted variant) adds each new section before the ones
    written, F1 after them. `sections` segments exist already when a job resumes."""

    def __init__(
        self, path: str | Path, crf: int, backward: bool, sections: int = 0, depth: int = 2, fps: int = video.FPS
    ) -> None:
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.crf, self.backward, self.fps = crf, backward, fps
        self.sections = sections  # segments in the parts folder, by generation index
        self.written: queue.Queue[Written] = queue.Queue()
        self.seconds: list[dict[str, float]] = []  # per section: encode and join time
        self.waited = 0.0  # seconds the sampler spent waiting for a full queue
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._frames = 0  # in the playable file after the last join
        self._clean = False  # the file is exactly the head and the sections so far (no stop overlap)
        self._pending: Path | None = None  # the last section's segment, joined by `finish`
        if sections == 0:  # a new job: nothing of an earlier one under this name counts (the job's lock stays)
            clear_parts(self.parts)
        self.parts.mkdir(parents=True, exist_ok=True)
        (self.parts / STOP).unlink(missing_ok=True)  # a resume continues past the overlap it stopped on
        for stale in self.parts.glob("seg-*.mp4"):  # written after the state a resume starts from
            if int(stale.stem.removeprefix("seg-")) >= sections:
                stale.unlink()
        self._thread = threading.Thread(target=self._work, name="framepack-writer", daemon=True)
        self._thread.start()

    # ---- the generator's side ---------------------------------------------------------------

    def head(self, frames: Iterable[np.ndarray], height: int, width: int, metadata: dict) -> None:
        """A video extension's copied input, first in time (kept from the first run when resuming), joined
        at once: the file shows it while the first section samples, and counts it from the start."""
        empty = np.empty((0, height, width, 3), np.uint8)

        def task() -> None:
            if not (self.parts / HEAD).exists():
                video.write_mp4(empty, self.parts / HEAD, self.crf, fps=self.fps, before=frames)
            self._join(metadata)

        self._put(task)

    def add(self, frames: np.ndarray, metadata: dict, then: Callable[[], Any] | None = None, join: bool = True) -> None:
        """Section `self.sections`'s final frames (possibly none): encode, join (not for the last section:
        `finish` joins), then `then()`."""
        index = self.sections
        self.sections += 1

        def task() -> None:
            t0 = time.perf_counter()
            if len(frames):
                video.write_mp4(frames, self.parts / segment_name(index), crf=self.crf, fps=self.fps)
            t1 = time.perf_counter()
            added = self.parts / segment_name(index) if len(frames) else None
            if join:
                count = self._join(metadata, added)
            else:  # the last section: `finish` joins it, with the index at the front
                self._pending, count = added, self._frames + len(frames)
            t2 = time.perf_counter()
            payload = then() if then is not None else None
            self.seconds.append({"section": index + 1, "frames": len(frames), "encode_s": t1 - t0, "join_s": t2 - t1})
            self.written.put(Written(index, count, t1 - t0, t2 - t1, payload))

        self._put(task)

    def stop(self, frames: np.ndarray | None, metadata: dict) -> None:
        """A stop: the overlap frames become the clip's edge for this run (the next run, a resume, drops them)."""

        def task() -> None:
            if frames is not None and len(frames):
                video.write_mp4(frames, self.parts / STOP, crf=self.crf, fps=self.fps)
            self._clean = False  # a join of every segment, the overlap included: the file ends on it now
            if self._segments():
                self._join(metadata)
            self._clean = False  # and the next join starts from the segments again

        self._put(task)

    def finish(self, metadata: dict) -> int:
        """The finished clip: joined with its index at the front; the parts folder removed. Returns frames."""
        done: list[int] = []
        self._put(lambda: done.append(self._join(metadata, self._pending, index_first=True)))
        self.wait()
        clear_parts(self.parts)  # the job's lock goes with its release
        return done[0]

    def wait(self) -> None:
        """Until every queued section is on disk; raises the writer's error if it failed."""
        t0 = time.perf_counter()
        self._tasks.join()
        self.waited += time.perf_counter() - t0
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise WriterError(
                f"writing {self.path} failed: {type(self._error).__name__}: {self._error}"
            ) from self._error

    def done(self) -> list[Written]:
        """The sections written since the last call, in order."""
        out = []
        while True:
            try:
                out.append(self.written.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop the thread after what is queued (a job's end, whatever its status)."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()

    # ---- the writer's side ------------------------------------------------------------------------

    def _put(self, task: Callable[[], None]) -> None:
        self.check()
        t0 = time.perf_counter()
        self._tasks.put(task)  # blocks while `depth` sections wait: the sampler waits, memory stays bounded
        self.waited += time.perf_counter() - t0

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                if self._error is None:  # after a failure the rest is dropped: the file keeps what was joined
                    task()
            except BaseException as exc:  # noqa: BLE001 - handed to the generator's thread by check()
                log.error("video writer: %s: %s", type(exc).__name__, exc)
                self._error = exc
            finally:
                self._tasks.task_done()

    def _segments(self) -> list[Path]:
        """The segments that exist, in time order: the input's head, then the generated clip (with the stop
        overlap at its open edge: the front for inverted, the end for F1)."""
        generated = [self.parts / segment_name(i) for i in range(self.sections)]
        if self.backward:
            generated.reverse()
        stop = [self.parts / STOP]
        ordered = [self.parts / HEAD] + (stop + generated if self.backward else generated + stop)
        return [p for p in ordered if p.exists()]

    def _join(self, metadata: dict, added: Path | None = None, index_first: bool = False) -> int:
        """The playable file from the segments. After a section, the file so far and the new segment are
        enough (two files to open, not one per section: opening costs ~1.7 ms here, more than copying a
        section's packets); after a stop, at a resume, or where the new segment goes between the input's
        head and the rest (an inverted extension), every segment again."""
        if self._clean and self.path.exists() and not (self.backward and (self.parts / HEAD).exists()):
            if added is None and not index_first:  # no final frames (inverted's first): the file stays
                return self._frames
            segments = [self.path] if added is None else [added, self.path] if self.backward else [self.path, added]
        else:
            segments = self._segments()
        self._frames = video.join(segments, self.path, metadata, index_first, self.fps) if segments else 0
        self._clean = bool(segments)
        return self._frames
