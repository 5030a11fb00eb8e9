"""Fake-kernel and autograd registration shared by every op (the C++ op and its Triton twin alike)."""
import torch


def register(fwd_name, bwd_name, fake_forward, fake_backward, make_backward, setup_context):
    """Registers the fake kernels of ``fastops::<fwd_name>`` / ``<bwd_name>`` and the forward's autograd,
    whose backward calls the ``<bwd_name>`` op (``make_backward(bwd_op)`` builds it)."""
    torch.library.register_fake(f"fastops::{fwd_name}")(fake_forward)
    torch.library.register_fake(f"fastops::{bwd_name}")(fake_backward)
    bwd_op = getattr(torch.ops.fastops, bwd_name)
    torch.library.register_autograd(f"fastops::{fwd_name}", make_backward(bwd_op), setup_context=setup_context)


def call(op, *args):
    """``op(*args)``, skipping the autograd layer when no argument needs a gradient (grad mode off, or no
    tensor argument requiring grad): the autograd kernel that :func:`register` installs is Python, ~7 us a
    call, which a batch-1 MobileNetV2 pays 52 times. Under torch.compile the plain call is traced."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
