"""One write at a time on a worker thread, so that disk writes overlap the next block's compression."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class OneBehind:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._job: Future | None = None

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        self.wait()
        self._job = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def drain(self) -> None:
        """Wait for the job in flight and drop its error (the caller is already failing)."""
        try:
            self.wait()
        except BaseException:  # noqa: BLE001 - the first error is the one reported
            pass

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
