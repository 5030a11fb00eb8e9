"""NaN and inf through the fused kernels, as PyTorch passes them: relu / relu6 keep a NaN (torch.relu(nan) is
nan, where max(z, 0) would give 0), and BatchNorm's batch statistics of a channel holding inf or NaN are what
F.batch_norm reports (inf mean / NaN variance), not a variance clamped to 0."""
import pytest
import torch
import torch.nn.functional as F

import fastops
from fastops import _ext
from fastops import reference as R

from ._util import backend_params, skip_unless_runnable


def _same_nonfinite(out, ref):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (
        f"NaN at {int(torch.isnan(out).sum())} places, the reference at {int(torch.isnan(ref).sum())}")
    torch.testing.assert_close(torch.nan_to_num(out), torch.nan_to_num(ref), rtol=1e-4, atol=1e-4)


def _with_nan(*shape, cl=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[0, 1, 2, 3] = float("nan")
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize("backend_dev", backend_params("conv_bias_act"))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["relu", "relu6"])
@pytest.mark.parametrize("kind", ["1x1", "depthwise"])
def test_conv_bias_act_relu_keeps_nan(backend_dev, cl, act, kind):
    backend, dev = backend_dev
    x = _with_nan(2, 8, 9, 9, cl=cl).to(dev)
    groups, k = (1, 1) if kind == "1x1" else (8, 3)
    w = torch.randn(16 if kind == "1x1" else 8, 8 // groups, k, k, device=dev)
    skip_unless_runnable("conv_bias_act", backend, x, w, groups)
    if backend == "cpu" and kind == "1x1" and _ext.BUILD_INFO.get("cpu_gemm") != "1":
        pytest.skip("this build's 1x1 convs go to oneDNN, whose fused relu maps NaN to 0 (see README)")
    with fastops.use_backend(backend):
        out = fastops.conv_bias_act(x, w, None, 1, k // 2, 1, groups, act)
    ref = R.conv_bias_act(x, w, None, None, [1, 1], [k // 2] * 4, [1, 1], groups, act)
    assert torch.isnan(ref).any()
    _same_nonfinite(out, ref)


@pytest.mark.parametrize("backend_dev", backend_params("bn_act"))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_bn_act_eval_relu_keeps_nan(backend_dev, cl, act):
    backend, dev = backend_dev
    x = _with_nan(2, 4, 5, 5, cl=cl).to(dev)
    rm, rv = torch.randn(4, device=dev), torch.rand(4, device=dev) + 0.5
    skip_unless_runnable("bn_act", backend, x)
    with fastops.use_backend(backend):
        out = fastops.bn_act(x, None, None, rm, rv, act=act)
    ref = getattr(F, act)(F.batch_norm(x, rm, rv))
    _same_nonfinite(out, ref)


@pytest.mark.parametrize("backend_dev", backend_params("squeeze_excite"))
@pytest.mark.parametrize("out_act", ["none", "relu"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
def test_squeeze_excite_relu_keeps_nan(backend_dev, out_act, gate):
    backend, dev = backend_dev
    x = _with_nan(2, 4, 5, 5).to(dev)
    w1, w2 = torch.randn(2, 4, device=dev), torch.randn(4, 2, device=dev)
    skip_unless_runnable("squeeze_excite", backend, x)
    with fastops.use_backend(backend):
        out = fastops.squeeze_excite(x, w1, None, w2, None, "relu", gate, out_act=out_act)
    ref = R.squeeze_excite(x, w1, None, w2, None, "relu", gate, out_act=out_act)
    assert torch.isnan(ref[0]).all()  # the NaN reaches the whole sample through the pooled mean and the MLP
    _same_nonfinite(out, ref)


@pytest.mark.parametrize("backend_dev", backend_params("cbam"))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
def test_cbam_keeps_nan(backend_dev, cl, gate):
    """Gates keep NaN (relu6(nan + 3) / 6 is nan) and the max poolings return it, as torch.amax does."""
    backend, dev = backend_dev
    x = _with_nan(2, 4, 5, 5, cl=cl).to(dev)
    w1, w2, cw = torch.randn(2, 4, device=dev), torch.randn(4, 2, device=dev), torch.randn(1, 2, 3, 3, device=dev)
    bn = [torch.ones(1, device=dev), torch.zeros(1, device=dev), torch.zeros(1, device=dev), torch.ones(1, device=dev)]
    skip_unless_runnable("cbam", backend, x)
    op = torch.ops.fastops.cbam_triton if backend == "triton" else torch.ops.fastops.cbam
    out, pooled, spatial, _ = op(x, w1, None, w2, None, cw, *bn, 1e-5, False, "relu", gate)
    ref = R.cbam(x, w1, None, w2, None, cw, *bn, gate=gate)
    assert torch.isnan(ref[0]).all() and not torch.isnan(ref[1]).any()
    _same_nonfinite(out, ref)
    _same_nonfinite(pooled[:, 1], x.amax((2, 3)))
    assert torch.isnan(pooled[0, 1, 1]) and torch.isnan(spatial[0]).all() and not torch.isnan(spatial[1]).any()
    # +inf and -inf in one channel: its mean is NaN but its max is inf (NaN only where a value is)
    x2 = x.clone()
    x2[0, 1, 2, 3], x2[0, 1, 0, 0] = float("inf"), float("-inf")
    pooled2 = op(x2, w1, None, w2, None, cw, *bn, 1e-5, False, "relu", gate)[1]
    _same_nonfinite(pooled2[:, 1], x2.amax((2, 3)))
    assert torch.isnan(pooled2[0, 0, 1]) and pooled2[0, 1, 1] == float("inf")


@pytest.mark.parametrize("backend_dev", backend_params("cbam"))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
def test_cbam_nan_at_one_pixel(backend_dev, cl):
    """x1 = x * ca is NaN at a single pixel (inf * 0: channel 1's gate is exactly 0): the channel-wise mean and
    max are NaN at that pixel only, as the reference's."""
    backend, dev = backend_dev
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    x[0, 1, 2, 3] = float("inf")
    x = (x.contiguous(memory_format=torch.channels_last) if cl else x).to(dev)
    w1 = torch.rand(2, 4, device=dev) + 0.1
    w2 = torch.rand(4, 2, device=dev) + 0.1
    w2[1] = -1.0  # channel 1: gate hard_sigmoid(-inf) = 0; the others hard_sigmoid(+inf) = 1
    cw = torch.randn(1, 2, 3, 3, device=dev)
    bn = [torch.ones(1, device=dev), torch.zeros(1, device=dev), torch.zeros(1, device=dev), torch.ones(1, device=dev)]
    skip_unless_runnable("cbam", backend, x)
    op = torch.ops.fastops.cbam_triton if backend == "triton" else torch.ops.fastops.cbam
    out, _, spatial, _ = op(x, w1, None, w2, None, cw, *bn, 1e-5, False, "relu", "hard_sigmoid")
    ref = R.cbam(x, w1, None, w2, None, cw, *bn, gate="hard_sigmoid")
    for j in range(2):
        assert torch.isnan(spatial[:, j]).nonzero().tolist() == [[0, 2, 3]]
    _same_nonfinite(out, ref)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_bn_act_training_statistics_of_inf_and_nan(cl):
    x = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 0, 0] = float("inf")  # the channel's first element, which the one-pass statistics start from
    x[1, 1, 2, 2] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_t, rv_t = rm.clone(), rv.clone()
    with fastops.use_backend("cpu"):
        fastops.bn_act(x, None, None, rm, rv, training=True, act="none")
    F.batch_norm(x, rm_t, rv_t, training=True)
    torch.testing.assert_close(rm, rm_t, equal_nan=True)
    torch.testing.assert_close(rv, rv_t, equal_nan=True)
    assert torch.isnan(rv[:2]).all() and torch.isinf(rm[1]) and torch.isfinite(rm[2])
