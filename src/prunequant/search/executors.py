"""Where trials run: in this process, or on Ray actors; both expose ``submit`` and ``next_result``."""
from __future__ import annotations

import os
from collections import deque

from ..errors import PrunequantError

DIST_HINT = "pip install 'prunequant[dist]'"


class InlineExecutor:
    """Runs each call at submit time in this process (workers = 1)."""

    def __init__(self, runner):
        self.runner = runner
        self.size = 1
        self._done: deque = deque()

    def submit(self, token, method: str, *args) -> None:
        self._done.append(self.runner.call(token, method, *args))

    def next_result(self) -> dict:
        return self._done.popleft()

    def pending(self) -> int:
        return len(self._done)

    def call(self, method: str, *args):
        return _result_of(self.runner.call(None, method, *args))

    def shutdown(self) -> None:
        pass


def _result_of(out: dict):
    if not out["ok"]:
        raise PrunequantError(out["error"]) if out.get("user_error") else RuntimeError(out["error"])
    return out["result"]


def import_ray():
    try:
        import ray
    except ImportError:
        raise PrunequantError(f"--workers > 1 runs trials in parallel with Ray, which is not installed: {DIST_HINT} "
                              "(or use --workers 1)") from None
    return ray


class RayExecutor:
    """``workers`` TrialRunner actors, each loading the model itself; GPUs: ``num_gpus=1`` per actor."""

    def __init__(self, setup: dict, workers: int, address: str | None = None):
        ray = import_ray()
        from ray.util import ActorPool

        from .trial import TrialRunner

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False) if address else \
                ray.init(ignore_reinit_error=True, log_to_driver=False)
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = max(1, int(res.get("CPU", os.cpu_count() or 1)) // workers)
        if gpus and workers > gpus:
            raise PrunequantError(f"{workers} workers but the Ray cluster has {gpus} GPU(s): one trial per GPU, "
                                  f"so use --workers {gpus} or fewer")
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus}
        setup = {**setup, "threads": None if gpus else cpus}
        actor = ray.remote(**opts)(TrialRunner)
        self.actors = [actor.remote(setup) for _ in range(workers)]
        self.pool = ActorPool(self.actors)
        self.size = workers
        self._n = 0

    def submit(self, token, method: str, *args) -> None:
        self.pool.submit(lambda a, v: a.call.remote(*v), (token, method, *args))
        self._n += 1

    def next_result(self) -> dict:
        self._n -= 1
        return self.pool.get_next_unordered()

    def pending(self) -> int:
        return self._n

    def call(self, method: str, *args):
        return _result_of(self.ray.get(self.actors[0].call.remote(None, method, *args)))

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
