"""One write at a time on a worker thread, so that disk writes overlap the next block's compression."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


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


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def host_copies(tensors: dict[str, torch.Tensor], clone: bool = True) -> tuple[dict, torch.cuda.Event | None]:
    """Host copies of ``tensors`` (host ones cloned if ``clone``). CUDA ones are copied into pinned memory on a
    side stream, so the GPU goes on computing: read them through ``arrived``."""
    out, stream = {}, None
    for k, t in tensors.items():
        t = t.detach()
        if not t.is_cuda:
            out[k] = t.contiguous().clone() if clone else t.contiguous()
            continue
        if stream is None:
            stream = _COPY_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
            stream.wait_stream(torch.cuda.current_stream(t.device))  # the values as computed so far
        with torch.cuda.stream(stream):
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
        t.record_stream(stream)  # its memory is not reused before the copy ends
        out[k] = h
    event = None
    if stream is not None:
        event = torch.cuda.Event()
        event.record(stream)
    return out, event


def arrived(copies: tuple[dict, torch.cuda.Event | None] | None) -> dict | None:
    """The tensors of ``host_copies`` once their copies have ended."""
    if copies is None:
        return None
    tensors, event = copies
    if event is not None:
        event.synchronize()
    return tensors
