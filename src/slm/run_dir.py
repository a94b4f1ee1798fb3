"""One training run per directory: what a run directory may hold, the lock a live run keeps in it, and the
metrics of a resumed run continued without the steps it replays."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slm.errors import SlmError
from slm.files import atomic_write_text
from slm.outputs import check_sources, describe, remove

LOCK = "run.lock"
# Everything `slm train` writes into --out; anything else there is not ours to replace.
RUN_ENTRIES = {"best", "last", "best.old", "last.old", "best.new", "last.new", "metrics.jsonl", "loss.png",
               "summary.json", LOCK}


class RunDirError(SlmError):
    """A run directory that is in use, or holds something a new run would destroy."""


# ---- the lock -------------------------------------------------------------------------------------------
def holder(fd: int) -> dict:
    """The record a lock file holds: pid, host and start of the process that took it ({} if none)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: ``run.lock`` holds the live process's pid and host, and an
    flock on it that the kernel drops when that process dies, however it dies. A lock file left by a dead
    process is taken over (with a note); one held by a live process refuses, naming it."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK
        self.fd: int | None = None
        self.took_over: dict = {}

    def acquire(self) -> None:
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self.locked(fd):
                record = holder(fd)
                os.close(fd)
                raise RunDirError(f"{self.path.parent} is in use by another `slm train`: process "
                                  f"{record.get('pid', '?')} on {record.get('host', '?')}, started "
                                  f"{record.get('started', '?')}; wait for it to end or stop it, then try again")
            if self.same_file(fd):  # not a file that the last holder unlinked as we opened it
                self.fd = fd
            else:
                os.close(fd)
        self.took_over = holder(self.fd)
        os.ftruncate(self.fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)

    def locked(self, fd: int) -> bool:
        """Take the flock; where the filesystem has none (some network mounts), trust a live pid on this host."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            record = holder(fd)
            return not (record.get("host") == socket.gethostname() and pid_alive(record.get("pid")))

    def same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


# ---- what a new run may start in ------------------------------------------------------------------------
def foreign_entries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name not in RUN_ENTRIES)


def check_new_run(run: Path, resume: bool, force: bool) -> None:
    """A new run needs an empty directory (or --force); --resume needs nothing more here."""
    if resume or not run.is_dir():
        return
    entries = sorted(p.name for p in run.iterdir() if p.name != LOCK)
    if not entries or force:
        return
    if foreign_entries(run):
        raise RunDirError(f"--out {run} holds {describe(run)}, not a training run; choose another --out, or add "
                          "--force to replace it")
    raise RunDirError(f"{run} already holds a run ({', '.join(entries)}); add --resume to continue it, --force to "
                      "start over (deleting it), or choose another --out")


def clear(run: Path) -> None:
    """Empty a run directory for --force, keeping the lock this process holds."""
    for entry in run.iterdir():
        if entry.name != LOCK:
            remove(entry)


def has_checkpoint(run: Path) -> bool:
    return any((run / name).is_dir() for name in ("last", "last.old", "best"))


@contextmanager
def run_directory(run: Path, sources: Iterable[str | Path], resume: bool, force: bool) -> Iterator[None]:
    """Hold ``run`` for one training process: check it, lock it, clear it for --force; when the run fails
    before it saved anything, remove the directory it made."""
    if run.exists() and not run.is_dir():
        raise RunDirError(f"--out {run} is a file; give a directory for the run")
    check_sources(run, sources)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(run, ignore_errors=True)
        raise
    try:
        if lock.took_over:
            print(f"note: took over {lock.path} from process {lock.took_over.get('pid', '?')} on "
                  f"{lock.took_over.get('host', '?')}, which ended without releasing it", file=sys.stderr)
        check_new_run(run, resume, force)
        if force and not resume:
            clear(run)
        yield
    except BaseException:
        lock.release()
        if created and not has_checkpoint(run):
            shutil.rmtree(run, ignore_errors=True)
        raise
    lock.release()


# ---- metrics of a resumed run ---------------------------------------------------------------------------
def kept_record(line: str, step: int) -> bool:
    """Whether a metrics line survives a resume from ``step``: records up to it, but not a leg that began
    there and was lost, nor a line cut short by a kill."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not isinstance(record, dict):
        return False
    return record.get("step", 0) < step or (record.get("step", 0) == step and record.get("kind") != "leg")


def trim_metrics(path: Path, step: int) -> int:
    """Drop the records after ``step`` (the step a resumed run continues from: what it will replay); returns
    how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if kept_record(line, step)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
