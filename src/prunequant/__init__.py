"""prunequant: joint pruning and quantization of causal LMs, measured with SrCr."""
from .recipe import LayerPlan, PruneSpec, QuantSpec, Recipe
from .version import __version__


def __getattr__(name):  # keep `import prunequant` light: torch/transformers load on first use
    if name in ("compress", "evaluate", "save", "CompressionResult"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)


__all__ = ["compress", "evaluate", "save", "load_model", "Recipe", "PruneSpec", "QuantSpec", "LayerPlan"]
