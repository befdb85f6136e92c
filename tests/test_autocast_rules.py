"""CUDA's autocast rules emulated on the CPU (streamalign.models.autocast_rules), checked against the installed
torch: its header's op lists, its dispatcher's registrations, and what its CPU autocast does outside."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamalign.models.autocast_rules import CUDA_RULES, SAME_RULE, cpu_only_ops, cuda_autocast_rules

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
LISTS = {"AT_FORALL_LOWER_PRECISION_FP": "lower_precision_fp", "AT_FORALL_FP32": "fp32",
         "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype", "AT_FORALL_PROMOTE": "promote"}  # fmt: skip


def header_rules() -> dict[str, str]:
    """ATen's CUDA lists, read from the installed header: {"op" or "op.overload": rule}."""
    text = HEADER.read_text()
    rules = {}
    for macro, rule in LISTS.items():
        body = re.search(rf"#define {macro}\(_\)(.*?)(?:\n\s*\n|#define)", text, re.S).group(1)
        for op, overload in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body):
            rules[f"{op}.{overload}" if overload else op] = rule
    body = re.search(r"#define AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE\(_\)(.*?)#define", text, re.S).group(1)
    for name in re.findall(r'"(norm\.\w+)"', body):
        rules[name] = "fp32_append_dtype"
    return rules


def dispatcher_ops(key: str) -> set[str]:
    return {n.removeprefix("aten::") for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, key)}  # fmt: skip


@pytest.mark.skipif(not HEADER.exists(), reason="this torch ships no ATen headers")
def test_the_table_is_atens_cuda_lists():
    """Every op of the header's CUDA lists with its rule; the rest of the table is what autocast_mode.cpp
    registers for CUDA alone (cuDNN convolutions, the banned binary_cross_entropy)."""
    header = header_rules()
    assert len(header) > 100
    extra = {k: v for k, v in CUDA_RULES.items() if k not in header}
    assert {k: CUDA_RULES.get(k) for k in header} == header
    assert extra == {"cudnn_convolution": "lower_precision_fp", "cudnn_convolution_transpose": "lower_precision_fp",
                     "binary_cross_entropy": "banned"}  # fmt: skip


def test_the_table_covers_every_cuda_autocast_kernel_of_this_torch():
    """The dispatcher's AutocastCUDA registrations are exactly the table's ops; the ops kept on ATen's CPU
    kernel have one at both keys, and the CPU-only ones (to fall through) have none for CUDA."""
    cuda, cpu = dispatcher_ops("AutocastCUDA"), dispatcher_ops("AutocastCPU")
    assert set(CUDA_RULES) == cuda
    assert cuda & cpu >= SAME_RULE
    assert set(cpu_only_ops()) == cpu - cuda
    assert {"cat", "stack", "view_as_complex"} <= set(cpu_only_ops())


def test_the_kept_cpu_kernels_cast_as_cuda_does():
    """The ops kept on ATen's own AutocastCPU kernel do what CUDA's rule says: lower precision for the matrix
    products, float32 for the losses."""
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(a, b.T).dtype == torch.bfloat16 and (a @ b).dtype == torch.bfloat16
        assert torch.mm(a, b).dtype == torch.bfloat16 and torch.bmm(a[None], b[None]).dtype == torch.bfloat16
        x = torch.randn(3, 4, dtype=torch.bfloat16)
        assert F.mse_loss(x, x).dtype == torch.float32 and F.l1_loss(x, x).dtype == torch.float32
    assert {"linear", "matmul", "mm", "bmm", "mse_loss", "l1_loss"} <= SAME_RULE


def casts() -> dict[str, torch.dtype]:
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    full = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return {"layer_norm": F.layer_norm(x, (8,)).dtype, "exp": x.exp().dtype, "rsqrt": x.rsqrt().dtype,
                "pow": (x**2).dtype, "sum": x.sum().dtype, "sum_dim": x.sum(0).dtype,
                "sum_dtype": x.sum(dtype=torch.bfloat16).dtype, "softmax": x.softmax(-1).dtype,
                "cumsum": x.cumsum(0).dtype, "norm": x.norm().dtype, "addcmul": torch.addcmul(x, x, full).dtype,
                "float64": x.double().exp().dtype, "mv": torch.mv(full, full[0]).dtype,
                "stack": torch.stack([x, x]).dtype}  # fmt: skip


def test_within_the_rules_bf16_autocast_casts_as_on_cuda_and_the_cpu_rules_come_back():
    bf16, fp32 = torch.bfloat16, torch.float32
    cpu = casts()
    with cuda_autocast_rules():
        cuda = casts()
        with cuda_autocast_rules():  # re-entrant
            assert casts() == cuda
    assert casts() == cpu
    assert cpu == {**dict.fromkeys(cpu, bf16), "sum_dtype": bf16, "addcmul": fp32, "float64": torch.float64,
                   "mv": fp32}  # fmt: skip
    assert cuda == {**dict.fromkeys(cuda, fp32), "sum_dtype": bf16, "float64": torch.float64, "mv": bf16,
                    "stack": bf16}  # fmt: skip
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=bf16), pytest.raises(RuntimeError, match="unsafe"):
        F.binary_cross_entropy(torch.rand(3), torch.rand(3))


def test_a_layer_norm_saves_its_float32_copy_for_backward():
    """What the plan misses without the rules: CUDA's LayerNorm of a bf16 input saves a float32 copy of it."""
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)

    def saved() -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            F.layer_norm(x, (64,))
        return sum(seen.values())

    cpu = saved()
    with cuda_autocast_rules():
        cuda = saved()
    rows = x.shape[0]  # saved: the input and its per-row mean and 1/std, in the dtype the op ran in
    assert cpu == x.numel() * 2 + 2 * rows * 2
    assert cuda == x.numel() * 4 + 2 * rows * 4  # the float32 copy instead of the bf16 input
