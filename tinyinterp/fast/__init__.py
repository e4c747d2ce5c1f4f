"""Everything Numba-aware on the JAX side: the plan of each block's attention sublayer
(``plan``), the code that runs it (``sublayer``), the attention functions with their Numba
kernels beside the jnp they replace (``attention``) and the XLA FFI binding (``ffi``).

``tinyinterp.model`` is the specification and calls ``attention_sublayer`` once per block.
"""

from tinyinterp.fast.attention import numba_unavailable_reason, resolve_backend
from tinyinterp.fast.plan import PLANS, Plan, disabled, plan_sublayer, sublayer_hook_names
from tinyinterp.fast.sublayer import attention_sublayer, with_reference_grad

__all__ = ["PLANS", "Plan", "attention_sublayer", "disabled", "numba_unavailable_reason",
           "plan_sublayer", "resolve_backend", "sublayer_hook_names", "with_reference_grad"]
