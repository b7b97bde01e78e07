"""One writer per output directory, and the output-path checks made before any work (docs/internals.md)."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from .errors import PrunequantError, RunError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".prunequant-lock"
WORK_SUFFIX = ".prunequant-work"


class OutputBusyError(RunError):
    """Another live process is writing the same output."""


def lock_path(out: str | Path) -> Path:
    return Path(str(out) + LOCK_SUFFIX)


def work_root(out: str | Path) -> Path:
    return Path(str(out) + WORK_SUFFIX)


def check_output_path(out: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that can never be written (a file, an existing dir without overwrite)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise PrunequantError(f"--out {out} is an existing file, not a directory (--overwrite replaces output "
                                  "directories only); remove it or choose another --out")
        if not overwrite:
            raise PrunequantError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise PrunequantError(f"{anc} is not a directory, so --out {out} cannot be created; choose another --out")


def _holder(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode("ascii", "replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


class _Lock:
    def __init__(self, out: Path):
        self.out, self.path, self.fd, self.depth = out, lock_path(out), None, 0

    def acquire(self) -> None:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PrunequantError(f"cannot create the directory of --out {self.out}: {e.strerror or e}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise PrunequantError(f"cannot write beside --out {self.out} ({self.path}: {e.strerror or e}); "
                                      "choose a writable location") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _holder(fd)
                os.close(fd)
                who = f"process {pid}" if pid else "another process"
                raise OutputBusyError(f"{self.out} is being written by {who} (lock {self.path}); wait for it to "
                                      "finish or choose another --out") from None
            try:  # the last holder may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _holder(fd)
            if stale and stale != os.getpid():
                log.warning("taking over the lock %s of process %s, which is no longer running", self.path, stale)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking, so nobody can lock a file that is about to vanish
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, _Lock] = {}  # this process's locks (a run's phases each take the lock of its output)


@contextlib.contextmanager
def output_lock(out: str | Path):
    """Hold the output's lock for the block; re-entrant within one process."""
    key = Path(os.path.abspath(out))
    lock = _HELD.get(key)
    if lock is None:
        lock = _Lock(Path(out))
        lock.acquire()
        _HELD[key] = lock
    lock.depth += 1
    try:
        yield lock
    finally:
        lock.depth -= 1
        if lock.depth == 0:
            _HELD.pop(key, None)
            lock.release()
