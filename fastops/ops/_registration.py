"""Fake-kernel and autograd registration shared by every op (the C++ op and its Triton twin alike)."""
import torch


def register(fwd_name, bwd_name, fake_forward, fake_backward, make_backward, setup_context):
    """Registers the fake kernels of ``fastops::<fwd_name>`` / ``<bwd_name>`` and the forward's autograd,
    whose backward calls the ``<bwd_name>`` op (``make_backward(bwd_op)`` builds it)."""
    torch.library.register_fake(f"fastops::{fwd_name}")(fake_forward)
    torch.library.register_fake(f"fastops::{bwd_name}")(fake_backward)
    bwd_op = getattr(torch.ops.fastops, bwd_name)
    torch.library.register_autograd(f"fastops::{fwd_name}", make_backward(bwd_op), setup_context=setup_context)
