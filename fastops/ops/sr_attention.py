"""fastops.sr_attention: the public function, its backends, fake kernels and autograd."""
import math
from typing import Optional

import torch

from .. import _ext, backends
from .. import reference as _ref
from . import _checks, _registration

OP = "sr_attention"

# The CUDA kernels keep a query row's head slice in registers and put batch and head on grid dimensions
# limited to 65535.
CUDA_MAX_HEAD_DIM = 128
CUDA_MAX_GRID = 65535


def sr_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    r"""PVT spatial-reduction attention, fused: timm's ``pvt_v2.Attention`` between its ``q`` / ``kv``
    Linear layers and ``proj`` — many queries over a short, spatially reduced key/value set.

    For every batch element and head ``h`` (channels ``[h*hd, (h+1)*hd)``, ``hd = C / num_heads``):

    .. math::
        O = \mathrm{softmax}_{\mathrm{row}}(\mathrm{scale}\; Q K^\top)\, V,
        \qquad Q \in \mathbb{R}^{N \times hd},\; K, V \in \mathbb{R}^{N_r \times hd}

    ``q``, ``kv`` and the result are read and written in the Linear layers' token layouts: no
    reshape / permute / transpose copies. Softmax and accumulation are fp32 (online softmax over key
    blocks when ``N_r`` is long). The backward recomputes the probabilities from the saved log-sum-exp.

    Args:
        q: (B, N, C), the q Linear's output. float16 / bfloat16 / float32 (float64 on CPU).
        kv: (B, Nr, 2*C), the kv Linear's output: channels ``[k | v]``, each ``num_heads x hd`` (timm's
            order); Nr >= 1 (49 for PVTv2 at 224x224, N itself where a stage does not reduce).
        num_heads: heads; C must be a multiple of it.
        scale: default ``hd ** -0.5``.

    Returns:
        (B, N, C) contiguous in q's dtype, ready for ``proj``. Differentiable in q and kv.
    """
    _checks.tensor(OP, "q", q, 3, shape_doc="(B, N, C)")
    _checks.tensor(OP, "kv", kv, 3, shape_doc="(B, Nr, 2*C)")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"fastops.{OP}: num_heads must be a positive int, got {num_heads!r}")
    B, N, C = q.shape
    if min(B, N, C) < 1:
        raise ValueError(f"fastops.{OP}: q must have B, N, C >= 1, got shape {tuple(q.shape)}")
    if C % num_heads != 0:
        raise ValueError(f"fastops.{OP}: q's last dim C={C} must be a multiple of num_heads={num_heads}")
    if kv.shape[0] != B or kv.shape[2] != 2 * C or kv.shape[1] < 1:
        raise ValueError(f"fastops.{OP}: kv must have shape (B, Nr, 2*C) = ({B}, Nr >= 1, {2 * C}) for q of "
                         f"shape {tuple(q.shape)}, got {tuple(kv.shape)}")
    head_dim = C // num_heads
    if scale is None:
        scale = head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"fastops.{OP}: scale must be a finite float or None, got {scale!r}")
    q, kv = _checks.autocast_inputs(q.device.type, q, kv)
    _checks.same_device_dtype(OP, "q", q, "kv", kv)
    backend = backends.choose(OP, q.device, q, head_dim, kv.shape[1])
    if backend == "reference":
        return _ref.sr_attention(q, kv, num_heads, float(scale))
    fn = torch.ops.fastops.sr_attention_triton if backend == "triton" else torch.ops.fastops.sr_attention
    return _registration.call(fn, q.contiguous(), kv.contiguous(), num_heads, float(scale))[0]


def _cuda_limits(q, head_dim=1, nr=1) -> Optional[str]:
    if head_dim > CUDA_MAX_HEAD_DIM:
        return f"head_dim {head_dim}; the CUDA kernels take at most {CUDA_MAX_HEAD_DIM}"
    if q.shape[0] > CUDA_MAX_GRID or q.shape[-1] // head_dim > CUDA_MAX_GRID:
        return (f"batch {q.shape[0]} / {q.shape[-1] // head_dim} heads; the CUDA kernels take at most "
                f"{CUDA_MAX_GRID} each")
    return None


def _triton_limits(q, head_dim=1, nr=1) -> Optional[str]:
    from ..triton import sr_attention as _ts

    return _ts.limit_reason(q.dtype, head_dim, nr)


backends.register_kernel_backends(OP, limits={"cuda": _cuda_limits, "triton": _triton_limits})


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _fake_forward(q, kv, num_heads, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, N, C = q.shape
    return torch.empty_like(q), q.new_empty((B, num_heads, N), dtype=acc)


def _fake_backward(grad_out, q, kv, out, lse, num_heads, scale):
    return torch.empty_like(q), torch.empty_like(kv)


def _setup_context(ctx, inputs, output):
    q, kv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, kv, out, lse)
    ctx.conf = (num_heads, scale)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, kv, out, lse = ctx.saved_tensors
        gq, gkv = backward_op(grad_out.contiguous(), q, kv, out, lse, *ctx.conf)
        need = ctx.needs_input_grad
        return (gq if need[0] else None, gkv if need[1] else None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("sr_attention", "sr_attention_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import sr_attention as _triton_sra  # noqa: F401,E402  (defines the Triton custom ops)

    _register("sr_attention_triton", "sr_attention_backward_triton")
