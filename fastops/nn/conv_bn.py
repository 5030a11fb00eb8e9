"""Conv -> BatchNorm -> activation modules on fastops.conv_bn_act / fastops.bn_act, and the functions that
run an existing ``nn.Conv2d`` + ``nn.BatchNorm2d`` pair through them with nn.BatchNorm2d's module semantics."""
import operator
from typing import Optional

import torch
import torch.nn as nn

from .. import backends
from ..ops import _checks
from ..ops.bn_act import bn_act
from ..ops.squeeze_excite import conv1x1_squeeze_excite
from ..ops.conv_bn_act import (conv_bn_act, fold_bn, plan_conv_bias_act, reusable_part, run_conv_bias_act,
                               run_reusable_part)

# Activation modules the fused ops can take over, by their fastops name.
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: "none"}


def act_name_of(module: Optional[nn.Module]) -> Optional[str]:
    """The fastops act name of an activation module (None -> "none"), or None when it has no fused form."""
    if module is None:
        return "none"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return "relu6" if (module.min_val, module.max_val) == (0.0, 6.0) else None
    for cls, name in _ACT_MODULES.items():
        if type(module) is cls:
            return name
    return None


def _bn_mode(bn: nn.BatchNorm2d):
    """(training, momentum, running_mean, running_var) as nn.BatchNorm2d.forward uses them, counting the batch
    in ``num_batches_tracked`` when it does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return (training, momentum, bn.running_mean if use_running else None,
            bn.running_var if use_running else None)


def _check_conv(conv: nn.Conv2d, who: str) -> None:
    if conv.padding_mode != "zeros":
        raise ValueError(f"fastops.nn.{who}: only padding_mode='zeros' convolutions can be fused, got "
                         f"{conv.padding_mode!r}")


def _fold_tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    return conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var


def _tensor_state(tensors):
    """What identifies the values of these tensors between calls: version counter, data pointer, dtype and
    device of each (None for a missing one)."""
    return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class BNFoldCache:
    """The folded (weight, bias) of a conv + eval BN, recomputed when any of their tensors changes (in place:
    ``_version``; replaced: identity or data pointer) or dtype / device does. Not used while autograd needs the
    fold's graph or under torch.compile (the fold is then part of the traced graph).

    It also keeps the plan of the last eval call of :func:`conv_bn_act_modules` (the checked and prepared
    arguments of the fused op) with what it was made for, so that a call with the same input shape, strides,
    dtype and device, the same modules in the same state and no gradient needed goes straight to the op:
    the argument checks cost ~25 us a call in Python, a quarter of a small layer's time at batch 1."""

    plan = None  # (key, ops.conv_bn_act.reusable_part); a class default for old pickles

    def __init__(self):
        self.key = None
        self.tensors = ()  # held, so that a replaced tensor's id cannot be reused by its successor
        self.value = None
        self.plan = None

    def __getstate__(self):
        # A plan is only valid for the tensors it was made with: a copy starts without one.
        return dict(self.__dict__, plan=None)

    def get(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: torch.Tensor):
        tensors = _fold_tensors(conv, bn)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in tensors)):
            return fold_bn(weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        key = (weight.dtype, weight.device, bn.eps, weight is conv.weight) + _tensor_state(tensors)
        same = len(self.tensors) == len(tensors) and all(map(operator.is_, self.tensors, tensors))
        if key != self.key or not same:
            # Normal tensors even under inference_mode: they outlive the block (and the CPU backend keeps a
            # packed copy only of tensors with a version counter). inference_mode(False) turns grad
            # mode back on, so no_grad comes after it.
            with torch.inference_mode(False), torch.no_grad():
                self.value = fold_bn(weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
            self.key, self.tensors = key, tensors
            self.plan = None  # it holds the old fold
        return self.value

    def plan_key(self, x, conv, bn, act, residual):
        """What a plan depends on besides the modules' tensors (see :meth:`get`), or None where no plan may be
        used: grad mode on, torch.compile tracing, autocast, a module in training mode."""
        dev = x.device.type
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or bn.training
                or torch.is_autocast_enabled(dev)):
            return None
        r = None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device)
        return (x.shape, x.stride(), x.dtype, x.device, r, act, backends.forced_backend(), conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.padding_mode, bn.eps, self.key)

    def planned_call(self, x, conv, bn, act, residual):
        """The fused op's output through the stored plan, or None when there is none for these arguments."""
        if self.plan is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        key, part = self.plan
        tensors = _fold_tensors(conv, bn)
        if (not all(map(operator.is_, self.tensors, tensors)) or _tensor_state(tensors) != self.key[4:]
                or self.plan_key(x, conv, bn, act, residual) != key):
            return None
        return run_reusable_part(part, x, residual)


def conv_bn_act_modules(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu",
                        residual: Optional[torch.Tensor] = None, fold_cache: Optional[BNFoldCache] = None):
    """``act(bn(conv(x)) + residual)`` through :func:`fastops.conv_bn_act`, with ``bn``'s module semantics
    (``bn.training``, ``track_running_stats``, ``num_batches_tracked``, ``momentum=None`` as a cumulative
    average). ``fold_cache`` keeps the eval-mode folded weights between calls, and the checked arguments of
    the last no-grad eval call (see :class:`BNFoldCache`)."""
    if fold_cache is not None:
        y = fold_cache.planned_call(x, conv, bn, act, residual)
        if y is not None:
            return y
    _check_conv(conv, "conv_bn_act_modules")
    training, momentum, rm, rv = _bn_mode(bn)
    weight = conv.weight
    if not training:
        (weight,) = _checks.autocast_inputs(x.device.type, weight)
        w, b = (fold_cache.get(conv, bn, weight) if fold_cache is not None else
                fold_bn(weight, conv.bias, bn.weight, bn.bias, rm, rv, bn.eps))
        backend, args = plan_conv_bias_act("conv_bias_act", x, w, b, conv.stride, conv.padding, conv.dilation,
                                           conv.groups, act, residual)
        if fold_cache is not None and fold_cache.value is not None and w is fold_cache.value[0]:
            key = fold_cache.plan_key(x, conv, bn, act, residual)
            part = reusable_part(backend, args, x, w, b, residual)
            if key is not None and part is not None:
                fold_cache.plan = (key, part)
        return run_conv_bias_act(backend, args)
    return conv_bn_act(x, weight, conv.bias, bn.weight, bn.bias, rm, rv, bn.eps, conv.stride, conv.padding,
                       conv.dilation, conv.groups, act, residual, True, momentum)


def conv_bn_se_fusable(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`conv_bn_se_modules` serves ``x``: an eval-mode BN with running statistics, a plain 1x1
    convolution (stride 1, no padding, one group), and CPU tensors on the ``cpu`` backend (the fused op has no
    CUDA or Triton kernel; there the conv and the SE stay two ops)."""
    return (not bn.training and bn.running_mean is not None and bn.running_var is not None
            and x.device.type == "cpu" and backends.forced_backend() in (None, "cpu")
            and backends.c_ext_reason(x.device, "cpu") is None and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def conv_bn_se_modules(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, se: nn.Module,
                       residual: Optional[torch.Tensor] = None, out_act: Optional[str] = None,
                       fold_cache: Optional[BNFoldCache] = None) -> torch.Tensor:
    """``out_act(se(bn(conv(x))) + residual)`` as one :func:`fastops.conv1x1_squeeze_excite` call, with the
    eval-mode ``bn`` folded into the 1x1 ``conv`` (kept in ``fold_cache`` between calls); ``se`` is a
    :class:`fastops.nn.SqueezeExcite`. Only where :func:`conv_bn_se_fusable` holds."""
    (weight,) = _checks.autocast_inputs(x.device.type, conv.weight)
    w, b = (fold_cache.get(conv, bn, weight) if fold_cache is not None else
            fold_bn(weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps))
    return conv1x1_squeeze_excite(x, w, b, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, se.act_name,
                                  se.gate_name, residual, out_act)


def bn_act_module(x: torch.Tensor, bn: nn.BatchNorm2d, act: str = "relu", residual: Optional[torch.Tensor] = None):
    """``act(bn(x) + residual)`` through :func:`fastops.bn_act`, with ``bn``'s module semantics."""
    training, momentum, rm, rv = _bn_mode(bn)
    return bn_act(x, bn.weight, bn.bias, rm, rv, bn.eps, act, residual, training, momentum)


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)) + residual)`` as one :func:`fastops.conv_bn_act` call; state_dict keys ``conv.*`` and
    ``bn.*`` as timm's ``ConvNormAct`` (and any ``conv`` / ``bn`` pair). Eval mode folds BN into the conv
    once and reuses the folded weights until a parameter or running statistic changes.

    Args: as ``nn.Conv2d`` (``padding`` defaults to timm's symmetric ``((stride - 1) + dilation (k - 1)) // 2``),
    plus ``act`` (a fastops act name), ``eps`` and ``momentum`` for the BatchNorm2d.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, act="relu", eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype)
        self.act_name = act
        self._fold = BNFoldCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "ConvBNAct":
        """A ConvBNAct that shares ``conv`` and ``bn`` (no copy); ``act`` an activation module or None."""
        name = act_name_of(act)
        if name is None:
            raise ValueError(f"fastops.nn.ConvBNAct.from_modules: activation {act} has no fused form")
        _check_conv(conv, "ConvBNAct.from_modules")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv, new.bn, new.act_name, new._fold = conv, bn, name, BNFoldCache()
        return new

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """timm's ``ConvNormAct`` with a Conv2d, a BatchNorm2d(Act) and a fusable activation."""
        if type(m).__name__ != "ConvNormAct" or not isinstance(getattr(m, "conv", None), nn.Conv2d):
            return False
        bn = getattr(m, "bn", None)
        return (type(m.conv) is nn.Conv2d and m.conv.padding_mode == "zeros" and isinstance(bn, nn.BatchNorm2d)
                and isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity)
                and act_name_of(getattr(bn, "act", None)) is not None
                and isinstance(getattr(m, "aa", None) or nn.Identity(), nn.Identity))

    @classmethod
    def from_timm(cls, m: nn.Module) -> "ConvBNAct":
        act = getattr(m.bn, "act", None)
        bn = BNAct.from_bn(m.bn, act)
        new = cls.from_modules(m.conv, bn, act)
        new.train(m.training)
        return new

    def forward(self, x, residual=None):
        return conv_bn_act_modules(x, self.conv, self.bn, self.act_name, residual, self._fold)

    def extra_repr(self):
        return f"act={self.act_name!r}"


class BNAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by an activation (and an optional residual add before it), as one
    :func:`fastops.bn_act` call. Same state_dict keys as ``nn.BatchNorm2d`` / timm's ``BatchNormAct2d``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, act="relu",
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act_name = act

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "BNAct":
        """A BNAct sharing ``bn``'s parameters and buffers (no copy)."""
        name = act_name_of(act)
        if name is None:
            raise ValueError(f"fastops.nn.BNAct.from_bn: activation {act} has no fused form")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, name, device="meta")
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var, new.num_batches_tracked = (bn.running_mean, bn.running_var,
                                                                      bn.num_batches_tracked)
        new.train(bn.training)
        return new

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """timm's ``BatchNormAct2d`` with no dropout and a fusable activation."""
        return (type(m).__name__ == "BatchNormAct2d" and isinstance(m, nn.BatchNorm2d)
                and isinstance(getattr(m, "drop", nn.Identity()), nn.Identity)
                and act_name_of(getattr(m, "act", None)) is not None)

    @classmethod
    def from_timm(cls, m: nn.Module) -> "BNAct":
        return cls.from_bn(m, getattr(m, "act", None))

    def forward(self, x, residual=None):
        return bn_act_module(x, self, self.act_name, residual)

    def extra_repr(self):
        return super().extra_repr() + f", act={self.act_name!r}"


# Fusing conv -> bn (-> act) chains of an existing model ------------------------------------------------

class FusedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state_dict keys) whose forward also applies the BatchNorm2d and
    activation that followed it in the model, as one :func:`fastops.conv_bn_act` call. The BN module stays
    where it was (keys unchanged) as a :class:`FoldedBatchNorm2d` whose forward passes its input through."""

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: "FoldedBatchNorm2d", act: str) -> "FusedConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new._bn = (bn,)  # a tuple, so that bn is not registered twice (it keeps its own place and keys)
        new.act_name = act
        new._fold = BNFoldCache()
        new.train(conv.training)
        return new

    def forward(self, x):
        return conv_bn_act_modules(x, self, self._bn[0], self.act_name, None, self._fold)

    def extra_repr(self):
        return super().extra_repr() + f", fused with the following BatchNorm2d, act={self.act_name!r}"


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d (same parameters, buffers and keys) applied by the :class:`FusedConv2d` before it; its own
    forward returns its input unchanged."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        new = cls.__new__(cls)
        new.__dict__.update(bn.__dict__)
        return new

    def forward(self, x):
        return x


def _bn_act_of(bn: nn.Module) -> Optional[str]:
    """The activation a BatchNorm module applies itself ("none" for nn.BatchNorm2d), None if it cannot be fused."""
    if type(bn) is nn.BatchNorm2d:
        return "none"
    if isinstance(bn, BNAct):
        return bn.act_name if type(bn).forward is BNAct.forward else None
    if BNAct.is_convertible(bn):
        return act_name_of(getattr(bn, "act", None))
    return None


class _Tracer(torch.fx.Tracer):
    """Stops at convs and BNs (timm's BatchNormAct2d included), at every module of this package or of its
    models (those already call fastops ops; tracing into them would run their Python with proxies) and at the
    modules ``keep`` names."""

    def __init__(self, keep=None):
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m, qualname):
        return (isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or type(m).__module__.split(".")[0] in ("fastops", "models")
                or (self.keep is not None and self.keep(m)) or super().is_leaf_module(m, qualname))


def _chains(model: nn.Module, keep=None):
    """(conv path, bn path, act path or None, act name) for every conv -> bn (-> act module) chain in which
    each module is called exactly once and each output feeds only the next step."""
    graph = _Tracer(keep).trace(model)
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        conv = model.get_submodule(node.target)
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        if (bn_node.op != "call_module" or calls[bn_node.target] != 1 or bn_node.args != (node,)
                or bn_node.kwargs):
            continue
        bn = model.get_submodule(bn_node.target)
        act = _bn_act_of(bn) if isinstance(bn, nn.BatchNorm2d) else None
        if act is None or bn.num_features != conv.out_channels:
            continue
        act_path = None
        if act == "none" and len(bn_node.users) == 1:
            act_node = next(iter(bn_node.users))
            if (act_node.op == "call_module" and calls[act_node.target] == 1 and act_node.args == (bn_node,)
                    and not act_node.kwargs):
                name = act_name_of(model.get_submodule(act_node.target))
                if name not in (None, "none"):
                    act, act_path = name, act_node.target
        out.append((node.target, bn_node.target, act_path, act))
    return out


def fuse_conv_bn(model: nn.Module, keep=None) -> int:
    """Fuses every conv -> BatchNorm2d (-> activation module) chain of ``model`` in place: the conv becomes a
    :class:`FusedConv2d` doing all three through :func:`fastops.conv_bn_act`, the BN a pass-through
    :class:`FoldedBatchNorm2d` (parameters and keys kept), the activation module an ``nn.Identity``. Chains are
    found by tracing ``model`` with torch.fx (modules called once, outputs used only by the next step); timm's
    ``BatchNormAct2d`` counts as BN + its activation. A model that torch.fx cannot trace has its children
    tried one by one. Modules for which ``keep(module)`` is true are left whole. Returns the number of chains
    fused."""
    if keep is not None and keep(model):
        return 0
    try:
        chains = _chains(model, keep)
    except Exception:  # noqa: BLE001  (data-dependent control flow etc.: try the parts)
        return sum(fuse_conv_bn(child, keep) for child in model.children())
    for conv_path, bn_path, act_path, act in chains:
        bn = FoldedBatchNorm2d.from_bn(model.get_submodule(bn_path))
        fused = FusedConv2d.from_modules(model.get_submodule(conv_path), bn, act)
        model.set_submodule(conv_path, fused)
        model.set_submodule(bn_path, bn)
        if act_path is not None:
            model.set_submodule(act_path, nn.Identity())
    return len(chains)
