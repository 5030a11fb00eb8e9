"""Fake-kernel and autograd registration shared by every op (the C++ op and its Triton twin alike)."""
import functools

import torch

from .. import _ext

if _ext.C_LOADED:
    from .. import _C


def register(fwd_name, bwd_name, fake_forward, fake_backward, make_backward, setup_context):
    """Registers the fake kernels of ``fastops::<fwd_name>`` / ``<bwd_name>`` and the forward's autograd,
    whose backward calls the ``<bwd_name>`` op (``make_backward(bwd_op)`` builds it).

    ``<bwd_name>`` gets an autograd kernel too, whose own backward raises: without one, PyTorch only warns
    and treats its outputs as constants, so a double backward (create_graph=True) would return zeros."""
    torch.library.register_fake(f"fastops::{fwd_name}")(fake_forward)
    torch.library.register_fake(f"fastops::{bwd_name}")(fake_backward)
    bwd_op = getattr(torch.ops.fastops, bwd_name)
    torch.library.register_autograd(f"fastops::{bwd_name}", _no_double_backward(fwd_name),
                                    setup_context=_no_context)
    # Through `call`: a first-order backward (grad mode off) then skips the Python autograd kernel above.
    torch.library.register_autograd(f"fastops::{fwd_name}", make_backward(functools.partial(call, bwd_op)),
                                    setup_context=setup_context)


def _no_context(ctx, inputs, output):
    pass


def _no_double_backward(fwd_name):
    op = fwd_name[:-len("_triton")] if fwd_name.endswith("_triton") else fwd_name

    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastops.{op}: gradients of gradients (double backward, create_graph=True) are not supported by "
            f"fastops' kernels; FASTOPS_BACKEND=reference runs the differentiable plain-PyTorch reference")
    return backward


def call(op, *args):
    """``op(*args)``, skipping the autograd layer when no argument needs a gradient (grad mode off, or no
    tensor argument requiring grad): the autograd kernel that :func:`register` installs is Python, ~7 us a
    call, which a batch-1 MobileNetV2 pays 52 times. Under torch.compile the plain call is traced.

    Eager calls may keep packed copies of no-grad weights between calls (csrc/cpu/packed_weights.h); the
    traced call, which compiled code makes directly, does not: there a weight may be a reused buffer."""
    if torch.compiler.is_compiling():
        return op(*args)
    prev = _keep_packed(True)
    try:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    finally:
        _keep_packed(prev)


def _no_packed_weights(flag):
    return False


# getattr: an extension built from older sources lacks the function; it then runs as if it had it off.
_keep_packed = getattr(_C, "_keep_packed_weights", _no_packed_weights) if _ext.C_LOADED else _no_packed_weights
