"""Put trainable views (weights.py) in place of compressed linears' weights, and take them out again."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models import get_weight, set_weight
from ..solvers.base import LayerResult, StoredResult, quant_to
from .weights import make_view


class _AsWeight(nn.Module):
    """Parametrization: ignore the stored tensor, return the view's weight in the module's layout."""

    def __init__(self, view, transpose: bool, dtype: torch.dtype):
        super().__init__()
        self.view, self.transpose, self.dtype = view, transpose, dtype

    def forward(self, _stored):
        w = self.view.weight().to(self.dtype)
        return w.t() if self.transpose else w


def norm_params(root: nn.Module) -> list[nn.Parameter]:
    """The float32 weights and biases of the normalisation layers under ``root`` (bf16 ones would lose the steps)."""
    return [p for m in root.modules() if "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False) if p.dtype == torch.float32]


class Attached:
    """The views of a set of linears {name: module}, given their run states {name: LayerResult}, and optionally
    other full-precision parameters (``extra``: the norms) trained beside them."""

    def __init__(self, linears: dict[str, nn.Module], states: dict[str, LayerResult],
                 extra: list[nn.Parameter] | None = None):
        self.linears, self.states, self.views, self.extra = linears, states, {}, list(extra or [])
        for name, mod in linears.items():
            st = states.get(name)
            if st is None:
                continue
            w = get_weight(mod).detach()
            view = make_view(w.float(), st.mask_on(w.device), st.quant_on(w.device))
            if view is not None:
                self.views[name] = view.to(w.device)

    def __bool__(self) -> bool:
        return bool(self.views)

    def param_groups(self, spec) -> list[dict]:
        groups = [g for v in self.views.values() for g in v.param_groups(spec)]
        if self.extra and spec.lr_norm > 0:
            groups.append({"params": self.extra, "lr": spec.lr_norm})
        return groups

    def project_(self) -> None:
        for v in self.views.values():
            v.project_()

    @contextlib.contextmanager
    def active(self, root: nn.Module):
        """Views in place and every other parameter of ``root`` frozen, for the duration."""
        frozen = [(p, p.requires_grad) for p in root.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            for name, view in self.views.items():
                mod = self.linears[name]
                parametrize.register_parametrization(
                    mod, "weight", _AsWeight(view, type(mod).__name__ == "Conv1D", mod.weight.dtype), unsafe=True)
            for p in self.extra:
                p.requires_grad_(True)
            yield self
        finally:
            for name in self.views:
                mod = self.linears[name]
                if parametrize.is_parametrized(mod, "weight"):
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            for p, req in frozen:
                p.requires_grad_(req)

    @contextlib.contextmanager
    def weights_once(self):
        """Inside ``active``: every view's weight computed once per step (docs/internals.md)."""
        with parametrize.cached():
            for name in self.views:
                self.linears[name].weight  # noqa: B018 - fills the cache
            yield

    def state_dict_views(self) -> dict:
        out = {n: {k: t.detach().clone() for k, t in v.state_dict().items()} for n, v in self.views.items()}
        return {"views": out, "extra": [p.detach().clone() for p in self.extra]}

    @torch.no_grad()
    def load_state_dict_views(self, saved: dict) -> None:
        for n, v in self.views.items():
            v.load_state_dict(saved["views"][n])
        for p, t in zip(self.extra, saved["extra"]):
            p.copy_(t)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the exported weights into the linears and the stored pieces into the states."""
        for name, view in self.views.items():
            weight, q = view.export()
            set_weight(self.linears[name], weight)
            old = self.states[name]
            if q is not None:
                q = quant_to(q, "cpu")
            self.states[name] = StoredResult(weight=None, mask=old.mask, quant=q if q is not None else old.quant,
                                             info={**old.info, "refined": True})

