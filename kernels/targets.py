"""The XLA FFI targets of the Numba kernels: the one table of their names (no Numba, no JAX).

``kernels/ffi.py`` compiles one kernel entry per target and ``tinyinterp/fast/ffi.py`` registers
each name with XLA and calls it; both take the names from here.
"""

from __future__ import annotations

ATTENTION_FWD = "tinyinterp_attention_fwd"
ATTENTION_BWD = "tinyinterp_attention_bwd"
ATTENTION_FWD_PACKED = "tinyinterp_attention_fwd_qkv"
ATTENTION_BWD_PACKED = "tinyinterp_attention_bwd_qkv"
SCORES_FWD = "tinyinterp_scores_fwd"
SCORES_BWD = "tinyinterp_scores_bwd"
APPLY_FWD = "tinyinterp_apply_fwd"
APPLY_BWD = "tinyinterp_apply_bwd"
SUBLAYER_FWD = "tinyinterp_attention_block_fwd"
ATTENTION_OUT_FWD = "tinyinterp_attention_out_fwd"
QKV_FWD = "tinyinterp_qkv_fwd"

# target -> (kernel module, the name of its FfiKernel description there): what each computes.
KERNELS: dict[str, tuple[str, str]] = {
    ATTENTION_FWD: ("attention", "ATTENTION_FWD"),  # z, lse, and scores / pattern if not empty
    ATTENTION_BWD: ("attention", "ATTENTION_BWD"),  # dq, dk, dv
    ATTENTION_FWD_PACKED: ("attention", "ATTENTION_FWD_PACKED"),  # the forward on packed qkv
    ATTENTION_BWD_PACKED: ("attention", "ATTENTION_BWD_PACKED"),  # one packed dqkv
    SCORES_FWD: ("attention", "SCORES_FWD"),  # masked, scaled scores (a hook edits them)
    SCORES_BWD: ("attention", "SCORES_BWD"),
    APPLY_FWD: ("attention", "APPLY_FWD"),  # z from an (edited) pattern
    APPLY_BWD: ("attention", "APPLY_BWD"),
    SUBLAYER_FWD: ("block", "SUBLAYER_FWD"),  # the whole attention sublayer, fused
    ATTENTION_OUT_FWD: ("block", "ATTENTION_OUT_FWD"),  # hook_result and the summed output
    QKV_FWD: ("block", "QKV_FWD"),  # q, k, v from the normalized residual
}
TARGETS = tuple(KERNELS)
