"""`fastops info`: versions, build, device, and which backend can run each op here (and why not)."""
import platform

import torch

from . import _ext, backends


def _probe_inputs(op, device):
    """Small inputs for asking the registry whether a backend can run on `device`."""
    if op == "depthwise_conv2d":
        x = torch.randn(1, 4, 8, 8, device=device)
        return (x, torch.randn(4, 1, 3, 3, device=device), None)
    if op in ("squeeze_excite", "cbam", "conv1x1_squeeze_excite"):  # their predicates look at x only
        return (torch.randn(1, 4, 8, 8, device=device),)
    if op == "window_attention":  # (qkv, head_dim, window tokens)
        return (torch.randn(1, 7, 7, 3 * 8, device=device), 4, 49)
    if op == "sr_attention":  # (q, head_dim, Nr)
        return (torch.randn(1, 49, 8, device=device), 4, 49)
    if op == "spatial_reduction":  # (x, C, kernel size)
        return (torch.randn(1, 49, 8, device=device), 8, 7)
    if op == "bn_act":
        return (torch.randn(1, 4, 8, 8, device=device),)
    if op == "conv_bias_act":  # (x, weight, groups)
        return (torch.randn(1, 4, 8, 8, device=device), torch.randn(8, 4, 3, 3, device=device), 1)
    raise KeyError(op)


def info_text() -> str:
    from . import __version__
    from .triton import TRITON_ERROR

    lines = [f"fastops {__version__}", f"python {platform.python_version()} on {platform.machine()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}, threads {torch.get_num_threads()})"]
    if TRITON_ERROR is None:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if backends.triton_interpreting() else ""))
    else:
        lines.append(f"triton: unavailable ({TRITON_ERROR})")
    if _ext.C_LOADED:
        b = _ext.BUILD_INFO
        archs = _ext.cuda_archs()
        lines.append(f"fastops._C: loaded (CPU ISA {b.get('cpu_isa', '?')}, cpu_gemm={b.get('cpu_gemm', '?')}; CUDA "
                     + (f"compiled in for sm_{', sm_'.join(a.replace('.', '') for a in archs)})" if archs
                        else "not compiled in)"))
    else:
        lines.append(f"fastops._C: NOT loaded ({_ext.C_ERROR}); only the reference and triton backends can run")
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        lines.append(f"device: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), {torch.cuda.device_count()} GPU(s)")
        devices = ["cpu", "cuda"]
    else:
        lines.append("device: cpu only (no CUDA device visible)")
        devices = ["cpu"]
    forced = backends.forced_backend()
    lines.append(f"backend choice: {'forced ' + forced if forced else 'auto'} (FASTOPS_BACKEND)")
    lines.append("ops (backend: ok / why not):")
    for op in backends.ops():
        for dev in devices:
            lines.append(f"  {op} [{dev} tensors]")
            for b, why in backends.reasons(op, *_probe_inputs(op, dev)).items():
                lines.append(f"    {b:<9} {'ok' if why is None else 'no: ' + why}")
    return "\n".join(lines)


def info() -> None:
    """Print :func:`info_text`."""
    print(info_text())
