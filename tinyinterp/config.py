"""TransformerConfig: the one frozen, validated description of a model.

Field names follow TransformerLens' ``HookedTransformerConfig`` wherever TL has the concept, so a TL
user can read and write them without a dictionary.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ACT_FNS = ("relu", "gelu", "gelu_new", "gelu_fast", "silu")
NORMALIZATION_TYPES = ("LN", "LNPre", "RMS", "RMSPre", None)
ATTENTION_BACKENDS = ("auto", "numba", "xla")
POSITIONAL_EMBEDDING_TYPES = ("standard",)
_INT_FIELDS = ("n_layers", "d_model", "n_ctx", "d_head", "d_vocab", "n_heads", "d_mlp", "d_vocab_out")
_FLOAT_FIELDS = ("eps", "initializer_range")
_STR_FIELDS = ("act_fn", "normalization_type", "positional_embedding_type", "attention_backend",
               "model_name")


def _suggest(value: object, allowed) -> str:
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"allowed: {', '.join(repr(a) for a in allowed)}.{hint}"


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and behaviour of a decoder-only transformer (TransformerLens names).

    Leave ``n_heads`` at -1 to derive it as ``d_model // d_head`` and ``d_mlp`` at -1 for
    ``4 * d_model`` (TL's defaults); ``d_vocab_out`` -1 means ``d_vocab``. ``n_heads * d_head``
    is usually ``d_model`` but need not be (TransformerLens allows it, and tracr's compiled models
    need it): W_Q/W_K/W_V map d_model to each head's d_head, W_O maps them back.
    """

    n_layers: int = 2
    d_model: int = 64
    n_ctx: int = 64
    d_head: int = 16
    d_vocab: int = 64
    n_heads: int = -1
    d_mlp: int = -1  # -1: 4 * d_model (unused when attn_only)
    d_vocab_out: int = -1  # -1: same as d_vocab
    act_fn: str = "gelu"  # TL: "gelu" is the exact erf GELU, "gelu_new" the tanh approximation
    normalization_type: str | None = "LN"  # "LN" | "LNPre" | "RMS" | "RMSPre" | None
    attn_only: bool = False
    eps: float = 1e-5  # TL's LayerNorm epsilon
    positional_embedding_type: str = "standard"
    # TL's gpt2 init: normal(0, initializer_range), with initializer_range = 0.8 / sqrt(d_model)
    # when left at -1.0. Biases start at zero, norm weights at one.
    initializer_range: float = -1.0
    # "auto" picks the Numba kernels on CPU when the XLA FFI binding works, else plain XLA.
    attention_backend: str = "auto"
    model_name: str = "custom"

    def __post_init__(self) -> None:
        self._check_types()
        # Derived defaults (object.__setattr__ because the dataclass is frozen).
        if self.n_heads == -1 and self.d_head > 0 and self.d_model % self.d_head == 0:
            object.__setattr__(self, "n_heads", self.d_model // self.d_head)
        if self.d_mlp == -1:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        if self.d_vocab_out == -1:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.initializer_range == -1.0 and self.d_model > 0:
            object.__setattr__(self, "initializer_range", 0.8 / math.sqrt(self.d_model))
        self._validate()

    def _check_types(self) -> None:
        """Every field has its declared type (numpy scalars are accepted and stored as Python
        ones, so ``to_dict`` stays JSON-safe); a string where a number belongs (e.g.
        ``initializer_range="0.1"`` from a hand-edited JSON) is a TypeError naming the field."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"TransformerConfig.{name} must be an int, got {value!r} "
                                f"({type(value).__name__})")
            object.__setattr__(self, name, int(value))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                 np.floating)):
                raise TypeError(f"TransformerConfig.{name} must be a number (float), got "
                                f"{value!r} ({type(value).__name__})")
            object.__setattr__(self, name, float(value))
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "normalization_type" and value is None):
                allowed = "a str or None" if name == "normalization_type" else "a str"
                raise TypeError(f"TransformerConfig.{name} must be {allowed}, got {value!r} "
                                f"({type(value).__name__})")
        if not isinstance(self.attn_only, (bool, np.bool_)):
            raise TypeError(f"TransformerConfig.attn_only must be a bool, got {self.attn_only!r}")
        object.__setattr__(self, "attn_only", bool(self.attn_only))

    def _validate(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value <= 0:
                if name == "n_heads":
                    raise ValueError(
                        f"TransformerConfig: cannot derive n_heads: d_model={self.d_model} is not a "
                        f"positive multiple of d_head={self.d_head}; set n_heads explicitly "
                        "(n_heads * d_head is usually d_model)")
                raise ValueError(f"TransformerConfig.{name} must be positive, got {value}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"TransformerConfig.act_fn={self.act_fn!r} is not supported; "
                             + _suggest(self.act_fn, ACT_FNS))
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ValueError(
                f"TransformerConfig.normalization_type={self.normalization_type!r} is not supported;"
                " " + _suggest(self.normalization_type, NORMALIZATION_TYPES))
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"TransformerConfig.attention_backend={self.attention_backend!r} is not supported; "
                + _suggest(self.attention_backend, ATTENTION_BACKENDS))
        if self.positional_embedding_type not in POSITIONAL_EMBEDDING_TYPES:
            raise ValueError(
                "TransformerConfig.positional_embedding_type="
                f"{self.positional_embedding_type!r} is not supported; "
                + _suggest(self.positional_embedding_type, POSITIONAL_EMBEDDING_TYPES))
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"TransformerConfig.eps must be a positive finite float, got {self.eps}")
        if not (self.initializer_range > 0 and math.isfinite(self.initializer_range)):
            raise ValueError("TransformerConfig.initializer_range must be positive and finite (or "
                             f"-1.0 for 0.8 / sqrt(d_model)), got {self.initializer_range}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; ``TransformerConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """The inverse of ``to_dict``; unknown fields and wrong types are clear errors."""
        if not isinstance(d, dict):
            raise TypeError(f"TransformerConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown fields {unknown}; "
                             f"known fields are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (re-validated). Derived fields are re-derived only if
        passed as -1."""
        return dataclasses.replace(self, **changes)
