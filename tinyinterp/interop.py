"""TransformerLens interop: state dicts as {TL parameter key: numpy array}.

The keys and shapes are exactly those of ``HookedTransformer.named_parameters()`` in
TransformerLens for the same config, so weights move both ways::

    sd = to_transformer_lens_state_dict(model)              # here -> TL
    tl_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    model = from_transformer_lens_state_dict(cfg, {k: v.numpy() for k, v in tl_sd.items()})
"""

from __future__ import annotations

import re

import numpy as np

from tinyinterp.config import TransformerConfig
from tinyinterp.model import HookedTransformer
from tinyinterp.params import check_params, flatten_params, unflatten_params

# Buffers TL keeps in its state dict (not parameters): ignored on import.
_TL_BUFFERS = re.compile(r"^blocks\.\d+\.attn\.(mask|IGNORE)$|\.rotary_(sin|cos)$")


def to_transformer_lens_state_dict(model: HookedTransformer) -> dict[str, np.ndarray]:
    """{TL parameter key: float32 numpy array} for every parameter of ``model``."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in flatten_params(model.params).items()}


def from_transformer_lens_state_dict(cfg: TransformerConfig, state_dict: dict) -> HookedTransformer:
    """A model from a TL-style state dict (numpy arrays, or anything ``np.asarray`` accepts, e.g.
    CPU torch tensors). Floating-point weights (float16/bfloat16/float64) are converted to float32;
    TL's attention buffers (``attn.mask``, ``attn.IGNORE``) are skipped; any other missing,
    unexpected or misshapen key, or a non-float weight (int, bool: not weights), is a clear
    ValueError naming the key (``tinyinterp.params.check_params``)."""
    flat = {}
    for k, v in state_dict.items():
        if _TL_BUFFERS.search(k):
            continue
        a = np.asarray(v)
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            raise ValueError(f"state_dict[{k!r}] has dtype {a.dtype}; model weights must be "
                             "floating point (is this the right state dict?)")
        flat[k] = a.astype(np.float32)
    params = unflatten_params(flat, cfg)
    check_params(params, cfg)
    return HookedTransformer(cfg, params)
