"""The block engine over several GPUs (one process each; docs/architecture.md); one process: local no-ops."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import PrunequantError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """The running process group (or a single local process when there is none)."""
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def _live(self) -> bool:
        return self.world > 1 and tdist.is_available() and tdist.is_initialized()

    def shard(self, calib_ids: torch.Tensor) -> torch.Tensor:
        """This rank's calibration sequences (every world-th one, starting at its rank)."""
        if calib_ids.shape[0] < self.world:
            raise PrunequantError(f"{calib_ids.shape[0]} calibration sequences cannot be split over "
                                  f"{self.world} processes: use at least one sequence per process")
        return calib_ids[self.rank::self.world]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place."""
        if self._live:
            tdist.all_reduce(t)
        return t

    def all_reduce_int(self, n: int, device) -> int:
        if not self._live:
            return n
        t = torch.tensor([n], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return int(t.item())

    def assign(self, costs: list[float]) -> list[int]:
        """Owner rank of each job: largest first, each to the least-loaded rank (same answer on every rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += costs[j]
        return owner

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if self._live:
            tdist.broadcast(t, src)
        return t

    def broadcast_object(self, obj, src: int):
        if not self._live:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src)
        return box[0]
