"""Pieces shared by the Triton launchers: the device guard, the activations the channel attention launchers
apply to their small fp32 MLP tensors, the AOT signature builder, and the named activations of bn_act /
conv_bias_act as @triton.jit functions (ACT codes below; forward, derivative at z, derivative read from the
output), matching csrc/bn_act_common.h."""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# ACT constexpr of the bn_act / conv_bias_act kernels, by the ops' act names.
ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "hardswish": 5}


def act_code(op: str, name: str) -> int:
    code = ACT_CODES.get(name) if isinstance(name, str) else None
    if code is None:
        raise ValueError(f"fastops.{op}: act must be one of none, relu, relu6, silu, gelu, hardswish; got {name!r}")
    return code


def act_grad_from_output(name: str) -> bool:
    """act' can be read from act's output (no pre-activation recompute needed)."""
    return name in ("none", "relu", "relu6")


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z) for fp32 z."""
    y = z
    if ACT == 1:
        y = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
    elif ACT == 2:
        y = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == 3:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 5:
        r = z + 3.0
        y = z * tl.where(r > 0.0, tl.where(r < 6.0, r, 6.0), 0.0) * (1.0 / 6.0)
    return y


@triton.jit
def act_bwd(z, ACT: tl.constexpr):
    """d act / dz at the pre-activation z (hardswish: 0 for z <= -3, 1 for z >= 3, z / 3 + 1/2 between)."""
    g = tl.full(z.shape, 1.0, tl.float32)
    if ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 5:
        g = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, z * (1.0 / 3.0) + 0.5, 1.0))
    return g


@triton.jit
def act_bwd_from_output(y, ACT: tl.constexpr):
    """d act / dz read from y = act(z); only for none / relu / relu6."""
    g = tl.full(y.shape, 1.0, tl.float32)
    if ACT == 1:
        g = tl.where(y > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where((y > 0.0) & (y < 6.0), 1.0, 0.0)
    return g


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def device_guard(t: torch.Tensor):
    """Makes t's GPU the current device inside the block (nothing for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


def act(name, z):
    if name == "relu":
        return F.relu(z)
    if name == "silu":
        return F.silu(z)
    return F.gelu(z)


def act_grad(name, z):
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


def gate(name, z):
    return torch.sigmoid(z) if name == "sigmoid" else F.relu6(z + 3.0) / 6.0


def gate_grad(name, z, g):
    """d gate / dz, given z and g = gate(z)."""
    if name == "sigmoid":
        return g * (1 - g)
    return ((z > -3) & (z < 3)).to(z.dtype) / 6.0


def f32(t):
    return None if t is None else t.to(torch.float32)


def aot_signatures(specs, ptr_type):
    """[(kernel, constexprs)] -> [(kernel, signature, constexprs)] for fastops.triton.aot: constexprs as
    given, pointer arguments (``*_ptr``) typed by ``ptr_type(name)``, everything else i32."""
    out = []
    for kernel, constexprs in specs:
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptr_type(name)
            else:
                sig[name] = "i32"
        out.append((kernel, sig, constexprs))
    return out


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: plain tf32 rounding of fp32 operands costs ~5e-4 relative error, so fp32 inputs
    take the 3-pass tf32 split (still tensor cores, fp32-level error); fp16 / bf16 operands ignore it; the
    interpreter computes exactly."""
    if interpreting():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"
