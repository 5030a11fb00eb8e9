"""Host-side pieces shared by the Triton launchers: the device guard, the activations the channel
attention launchers apply to their small fp32 MLP tensors, and the AOT signature builder."""
import math

import torch
import torch.nn.functional as F


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
