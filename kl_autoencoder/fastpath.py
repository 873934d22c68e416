"""The fast path: switchable speed settings for training and inference, each measured in BENCHMARKS.md.

    fast = FastPath.for_device(device, training=True)  # the measured defaults for this device and job
    model = apply_fast_path(model, fast)          # channels_last, checkpointing, lean GroupNorm+SiLU, torch.compile
    prepare_loss_network(perceptual, fast)        # LPIPS' VGG in NHWC
    optimizer = make_adamw(model.parameters(), lr=1e-4, fused=fast.fused_adamw)
    with autocast(device, fast):
        loss, logs = training_step(model, to_model_input(x, fast), perceptual, weights)
    model = prepare_for_inference(model, device)  # encode/decode: eval mode, the inference layout

Every switch changes speed or memory, never the math: tests/test_fastpath.py checks each one against the plain
path (same outputs and gradients in fp32; bf16 within its rounding). What stays fixed whatever the switches: the
posterior and every loss in fp32 (model.encode and losses.py cast), fused SDPA attention (model.py), and
`zero_grad(set_to_none=True)` with no host-device sync inside the step (the trainer).
"""

from __future__ import annotations

import importlib
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn


LEAN_NORM_ACT_CPU_BYTES = 8 * 2**20  # measured crossover on CPU (BENCHMARKS.md)


@dataclass(frozen=True)
class FastPath:
    """Speed switches. The defaults are the plain path; `FastPath.for_device` gives the measured choice."""

    channels_last: bool = False  # the model in NHWC: oneDNN/cuDNN convs without reorders; slow GroupNorm bwd on CPU
    loss_channels_last: bool = False  # the frozen LPIPS VGG in NHWC: ~1.2x on CPU (oneDNN), the GPU layout too
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on GPU; None = fp32 everywhere
    tf32: bool = False  # TF32 tensor-core matmuls/convs on Ampere+ GPUs (no effect on CPU)
    compile: bool = False  # torch.compile (fuses GroupNorm+SiLU and the elementwise tails); eager fallback
    compile_mode: str | None = None  # e.g. "max-autotune" on GPU; None = inductor's default
    fused_adamw: bool = False  # one multi-tensor AdamW kernel (CUDA, and CPU in recent torch)
    gradient_checkpointing: bool = False  # recompute block activations in backward: memory for ~30% time
    lean_norm_act_bytes: int | None = None  # GroupNorm+SiLU inputs this large keep only the input (norm_act.py)

    @classmethod
    def for_device(cls, device: torch.device | str, training: bool = False, **overrides: Any) -> "FastPath":
        """The settings BENCHMARKS.md measured as fastest on this device type, for training or inference (any field
        overridable)."""
        device = torch.device(device)
        if device.type == "cuda":
            fast = cls(channels_last=True, loss_channels_last=True, autocast_dtype=torch.bfloat16, tf32=True,
                       compile=compiler_available(device), fused_adamw=True)
        else:
            # CPU (AVX2/AVX-512 without AMX): bf16 is emulated and slower than fp32, and inductor's compile time
            # (minutes) outweighs its gain in short runs. NHWC pays for inference and for VGG's wide convs, but not
            # for training the VAE: GroupNorm's backward is 1.5-3x slower in NHWC on CPU. So the model is NHWC for
            # inference and NCHW for training; LPIPS is NHWC; fused AdamW. The lean GroupNorm+SiLU from 8 MiB
            # activations in training: faster from 16 MiB (fewer fresh pages), neutral at 4 MiB, slower at 2 MiB;
            # in inference (no autograd) it is the SiLU in place, whatever the size.
            fast = cls(channels_last=not training, loss_channels_last=True,
                       fused_adamw=fused_adamw_supported(device), lean_norm_act_bytes=LEAN_NORM_ACT_CPU_BYTES)
        return replace(fast, **overrides)


# ------------------------------------------------------------------------------------------------ capability checks


def compiler_available(device: torch.device | str) -> bool:
    """Whether torch.compile's default backend can generate code here: Triton on CUDA, a C++ compiler on CPU."""
    device = torch.device(device)
    try:
        importlib.import_module("torch._dynamo")
    except Exception:  # a torch build without dynamo
        return False
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            return bool(has_triton())
        except Exception:
            return False
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether `torch.optim.AdamW(fused=True)` accepts parameters on this device (CPU support is recent)."""
    device = torch.device(device)
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([probe], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def stays_on_cpu(device: str | None = None) -> bool:
    """Whether a run (or one `accelerate launch` process) works on the CPU: asked for (`device` "cpu", or
    ACCELERATE_USE_CPU, which `accelerate launch --cpu` sets) or no CUDA device here. Accelerate's own default is to
    treat a process without a GPU as a single process, so its rank and process count are only right when told."""
    if device is not None:
        return torch.device(device).type == "cpu"
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def mixed_precision_for(requested: str, cpu: bool) -> tuple[str, str]:
    """(the autocast mode a training run uses, the one line that says so). "auto" is bf16 where it is fast: a CUDA
    device with native bf16; elsewhere fp32 ("no"), since a CPU without AMX emulates bf16 many times slower (22x
    on an AVX2 laptop for an SDXL-size step). An explicit mode is the user's, with a word when it is slow there."""
    if requested == "auto":
        native = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mode = "bf16" if native else "no"
        where = "this GPU has native bf16" if native else ("on a CPU fp32 is faster" if cpu else "no native bf16")
        return mode, f"mixed precision: {mode} (train.mixed_precision=auto: {where})"
    note = f"mixed precision: {requested}"
    if cpu and requested != "no":
        note += (f" (train.mixed_precision={requested} on a CPU: autocast is emulated there and often many times "
                 "slower than fp32; train.mixed_precision=auto or no for fp32)")
    return requested, note


# ------------------------------------------------------------------------------------------------ applying it


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (10-bit mantissa inputs, fp32 accumulation)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_fast_path(model: nn.Module, fast: FastPath, device: torch.device | str | None = None) -> nn.Module:
    """Apply the model-side switches in place; return the module to call (compiled when `fast.compile`).

    The returned module shares parameters with `model`; keep `model` for state_dict/export (a compiled module's
    keys carry an `_orig_mod.` prefix).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if fast.tf32 and device.type == "cuda":
        set_tf32(True)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast.gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise TypeError(f"{type(model).__name__} has no enable_gradient_checkpointing(); cannot checkpoint")
        model.enable_gradient_checkpointing(True)
    if fast.lean_norm_act_bytes is not None and hasattr(model, "set_lean_norm_act"):
        model.set_lean_norm_act(fast.lean_norm_act_bytes)
    if fast.compile:
        return compile_with_fallback(model, device, mode=fast.compile_mode)
    return model


def prepare_for_inference(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` on `device`, in eval mode, the measured inference layout (NHWC on CPU and CUDA) and, on CPU, the lean
    GroupNorm+SiLU (without autograd: the SiLU in place, one activation-sized tensor less per pair), in place.

    Not compiled: inductor's minutes of compile time outweigh its gain on a folder of images.
    """
    fast = FastPath.for_device(device)
    model.to(device).eval()
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast.lean_norm_act_bytes is not None and hasattr(model, "set_lean_norm_act"):
        model.set_lean_norm_act(fast.lean_norm_act_bytes)  # the SiLU in place (norm_act.py)
    return model


def prepare_loss_network(module: nn.Module, fast: FastPath) -> nn.Module:
    """Put a frozen loss network (LPIPS' VGG) in NHWC when `fast.loss_channels_last`, in place.

    Its first conv then turns the reconstruction NHWC (whatever the model's layout) and every later layer stays so.
    The weights are what matter: an NHWC input meeting NCHW weights re-layouts the weight in every conv call
    (measured on CPU: LPIPS fwd+bwd 1.5x slower than with NHWC weights).
    """
    if fast.loss_channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def to_model_input(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """The batch in the layout the model runs in (one copy when channels_last, none otherwise)."""
    return x.contiguous(memory_format=torch.channels_last) if fast.channels_last and x.dim() == 4 else x


def autocast(device: torch.device | str, fast: FastPath) -> ContextManager:
    """Autocast to `fast.autocast_dtype` on this device, or a no-op context for fp32."""
    device = torch.device(device)
    if fast.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=fast.autocast_dtype)


def autocast_for(device: torch.device) -> ContextManager:
    """The inference precision policy of `FastPath.for_device` (bf16 on CUDA, fp32 on CPU) as a context."""
    return autocast(device, FastPath.for_device(device))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_adamw(params: Iterable[nn.Parameter], lr: float, fused: bool = False, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused when asked and supported by the parameters' device (else torch's default implementation)."""
    params = list(params)
    if fused and params and fused_adamw_supported(params[0].device):
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile / CompiledWithFallback wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


class CompiledWithFallback(nn.Module):
    """torch.compile'd module that falls back to eager, with one warning, if compiling fails at the first call.

    Compilation errors only surface when the compiled function first runs, so the fallback is decided there; an
    error that eager mode also raises is re-raised from the eager call, so real bugs are not hidden.
    """

    def __init__(self, module: nn.Module, compiled: Callable[..., Any]):
        super().__init__()
        self.module = module  # `unwrap()` in the trainer follows `.module`
        self._compiled: Callable[..., Any] | None = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as error:  # compiler missing/broken: backend errors have no common base class
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error)[:300]}); running eager",
                              RuntimeWarning, stacklevel=2)
                self._compiled = None
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # encode/decode/config/... of the wrapped model
            return getattr(self.module, name)


def compile_with_fallback(model: nn.Module, device: torch.device | str, mode: str | None = None) -> nn.Module:
    """torch.compile `model`'s forward, or return it unchanged, with a warning, when no compiler is available here."""
    if not compiler_available(device):
        warnings.warn(f"torch.compile is unavailable on {device} (no Triton / C++ compiler); running eager",
                      RuntimeWarning, stacklevel=2)
        return model
    return CompiledWithFallback(model, torch.compile(model, mode=mode))
