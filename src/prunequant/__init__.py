"""prunequant: joint pruning and quantization of causal LMs, measured with SrCr."""
__version__ = "0.1.0"

from .recipe import LayerPlan, PruneSpec, QuantSpec, Recipe  # noqa: E402


def __getattr__(name):  # keep `import prunequant` light: torch/transformers load on first use
    if name in ("compress", "evaluate", "save", "CompressionResult"):
        from . import api

        return getattr(api, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)


__all__ = ["compress", "evaluate", "save", "load_model", "Recipe", "PruneSpec", "QuantSpec", "LayerPlan"]
