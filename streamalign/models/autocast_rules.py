"""CUDA's autocast rules on the CPU: what a plan "as on CUDA" must run under.

Autocast casts an op's inputs by a per-device table (ATen's ``autocast_mode.h`` / ``.cpp``), and the CPU's
table is not CUDA's: CUDA runs ``layer_norm``, ``exp``, ``rsqrt``, ``pow``, ``softmax``, ``sum`` and more in
float32 (their bf16 inputs copied to float32, the copies saved for backward), the CPU does not; the CPU
promotes ``cat`` / ``stack`` and runs ``view_as_complex`` or the linear-algebra ops in float32, CUDA does not.
A fake-CPU simulation of a bf16 update therefore misses, e.g., the float32 copy every LayerNorm of a
recomputed block saves on CUDA.

:func:`cuda_autocast_rules` swaps the CPU's table for CUDA's while it is entered: for every op that has a
CUDA autocast rule unlike the CPU's it registers a kernel at the ``AutocastCPU`` dispatch key that applies the
CUDA rule (:data:`CUDA_RULES`, ATen's lists), and it lets every op that only the CPU casts fall through (no
cast). Ops whose two rules agree (:data:`SAME_RULE`) keep ATen's own kernel, and with it the cast cache of
float32 weights. The casts are ordinary ``.to`` calls above autograd, as in ATen, so autograd records and
saves what CUDA's would. The registration is process-wide and undone on exit.

Not emulated: the weight-cast cache for the ops that get a Python kernel (the lower-precision ones among
them are convolutions and matrix-vector products this project does not run under autocast).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch

LOWER = "lower_precision_fp"
FP32 = "fp32"
FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"
FP32_APPEND_DTYPE = "fp32_append_dtype"
PROMOTE = "promote"
BANNED = "banned"


def _names(text: str) -> list[str]:
    """The space-separated op names of `text`."""
    return text.split()


def _ops(text: str, rule: str) -> dict[str, str]:
    """{op: rule} for the space-separated op names of `text`."""
    return dict.fromkeys(_names(text), rule)


# CUDA's autocast rule per op ("name.overload"; "name" = the default overload): ATen's AT_FORALL_* lists and
# the CUDA-only registrations of autocast_mode.cpp (tests/test_autocast_rules.py reads them from the
# installed torch's header and its dispatcher)
CUDA_RULES: dict[str, str] = {
    **_ops("_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d "
           "conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv "
           "linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell "
           "_thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention "
           "scaled_dot_product_attention cudnn_convolution cudnn_convolution_transpose", LOWER),
    **_ops("acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar "
           "pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm rms_norm group_norm frobenius_norm.dim "
           "nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss "
           "nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
           "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss "
           "binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp upsample_nearest1d "
           "_upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d "
           "_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa "
           "upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa", FP32),
    **_ops("prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm "
           "linalg_matrix_norm.str_ord sum sum.dim_IntList", FP32_SET_OPT_DTYPE),
    **_ops("norm.Scalar norm.ScalarOpt_dim", FP32_APPEND_DTYPE),
    **_ops("addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add", PROMOTE),
    "binary_cross_entropy": BANNED,
}  # fmt: skip

# ops the CPU casts by the same rule as CUDA (autocast_mode.cpp's AutocastCPU table): ATen's kernel stays
SAME_RULE = frozenset(_names(
    "conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm addbmm linear _convolution.deprecated matmul conv_tbc "
    "conv_transpose1d conv_transpose2d.input conv_transpose3d.input prelu scaled_dot_product_attention cdist "
    "mse_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss poisson_nll_loss smooth_l1_loss "
    "l1_loss huber_loss margin_ranking_loss soft_margin_loss triplet_margin_loss multi_margin_loss kl_div "
    "multilabel_margin_loss binary_cross_entropy_with_logits"
))

# norm's fp32_append_dtype redispatches to the overload that takes a dtype
_APPEND_DTYPE_OVERLOAD = {"norm.Scalar": "ScalarOpt_dtype", "norm.ScalarOpt_dim": "ScalarOpt_dim_dtype"}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_ACTIVE = False  # cuda_autocast_rules is entered (an inner entry registers nothing)


def _overload(name: str) -> torch._ops.OpOverload:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _eligible(x: object) -> bool:
    """What autocast casts: a floating-point (not float64) tensor on the autocast device."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 and x.device.type == "cpu"


def _cast(x: object, dtype: torch.dtype) -> object:
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x.to(dtype) if _eligible(x) else x


def _run_cast(op: torch._ops.OpOverload, args: tuple, kwargs: dict, dtype: torch.dtype | None):
    """`op` on its arguments with every eligible tensor cast to `dtype` (None: as given)."""
    if dtype is None:
        return op(*args, **kwargs)
    return op(*_cast(args, dtype), **{k: _cast(v, dtype) for k, v in kwargs.items()})


def _widest(args: tuple, kwargs: dict) -> torch.dtype | None:
    dtype = None
    for x in (*args, *kwargs.values()):
        for t in x if isinstance(x, (list, tuple)) else (x,):
            if _eligible(t):
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _kernel(name: str, rule: str):
    """An AutocastCPU kernel applying CUDA's `rule` to op `name`, then running it with autocast excluded."""
    op = _overload(name)
    dtype_arg = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)
    if rule == FP32_APPEND_DTYPE:  # norm: redispatched to its overload with a dtype
        with_dtype = _overload(f"{name.partition('.')[0]}.{_APPEND_DTYPE_OVERLOAD[name]}")

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_CPU):
            if rule == BANNED:
                raise RuntimeError(f"torch.nn.functional.{name} and torch.nn.BCELoss are unsafe to autocast (CUDA's "
                                   "rule); use binary_cross_entropy_with_logits")  # fmt: skip
            if rule == LOWER:
                return _run_cast(op, args, kwargs, torch.get_autocast_dtype("cpu"))
            if rule == FP32:
                return _run_cast(op, args, kwargs, torch.float32)
            if rule == PROMOTE:
                return _run_cast(op, args, kwargs, _widest(args, kwargs))
            if not (args and _eligible(args[0])):  # the dtype rules look at the first argument only
                return op(*args, **kwargs)
            if rule == FP32_APPEND_DTYPE:
                return with_dtype(*args, **kwargs, dtype=torch.float32)
            # FP32_SET_OPT_DTYPE: an explicit dtype wins
            if dtype_arg < len(args):
                if args[dtype_arg] is None:
                    args = (*args[:dtype_arg], torch.float32, *args[dtype_arg + 1 :])
            elif kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


@functools.cache  # ATen's registrations are fixed once torch is imported (read before this module adds any)
def cpu_only_ops() -> tuple[str, ...]:
    """Ops ("name.overload") that have an AutocastCPU rule and no AutocastCUDA rule in this torch."""
    names = torch._C._dispatch_get_all_op_names()
    out = []
    for full in names:
        if not full.startswith("aten::"):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(full, "AutocastCPU") and not (
            torch._C._dispatch_has_kernel_for_dispatch_key(full, "AutocastCUDA")
        ):
            out.append(full.removeprefix("aten::"))
    return tuple(sorted(out))


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Within: CPU autocast casts by CUDA's rules (module docstring). Re-entrant (an inner entry is a no-op)."""
    global _ACTIVE
    if _ACTIVE:
        yield
        return
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # replacing ATen's AutocastCPU kernel warns once per op
            warnings.simplefilter("ignore", UserWarning)
            for name, rule in CUDA_RULES.items():
                if name not in SAME_RULE:
                    lib.impl(name, _kernel(name, rule), "AutocastCPU")
            for name in cpu_only_ops():
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        _ACTIVE = True
        yield
    finally:
        _ACTIVE = False
        lib._destroy()


def cuda_rules_if(device: str) -> contextlib.AbstractContextManager:
    """:func:`cuda_autocast_rules` when a simulation stands in for `device` 'cuda', else nothing."""
    return cuda_autocast_rules() if device == "cuda" else contextlib.nullcontext()
