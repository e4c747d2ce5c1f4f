"""tinyinterp: a minimal, hookable JAX transformer with interpretability built in.

    import tinyinterp
    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64,
                                       n_ctx=64, attn_only=True)
    model = tinyinterp.HookedTransformer.from_config(cfg, seed=0)
    logits, cache = model.run_with_cache(tokens)

Everything is imported on first use (``tinyinterp.HookedTransformer``, ``tinyinterp.circuits``, ...),
so ``import tinyinterp.kernels.attention`` needs neither JAX nor the rest of the package, and
``import tinyinterp`` changes nothing in the process (see ``tinyinterp.memory.tune_malloc`` for the
one setting the command line and the benchmarks make explicitly).
"""

import importlib

_SUBMODULES = ("attribution", "cache", "checkpoint", "circuits", "cli", "config", "detectors", "fast",
               "fourier", "graphs", "hooks", "interop", "kernels", "memory", "model", "params",
               "plotting", "reproduce", "sae", "superposition", "tasks", "testing", "train",
               "transcoders",
               "generate", "patching", "processing", "steering")
# name -> module it lives in, imported on first access
_LAZY = {
    "ActivationCache": "cache", "TransformerConfig": "config", "HookedTransformer": "model",
    "lm_cross_entropy_loss": "model", "get_act_name": "hooks", "hook_names": "hooks",
    "flatten_params": "params", "init_params": "params", "unflatten_params": "params",
    "TrainConfig": "train", "get_task": "tasks", "FactoredMatrix": "circuits",
    "load_model": "checkpoint", "save_model": "checkpoint",
}

__all__ = [*_LAZY, *_SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"tinyinterp.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"tinyinterp.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tinyinterp' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
