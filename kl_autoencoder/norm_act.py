"""GroupNorm followed by SiLU, the pair that opens every ResNet branch, with less memory held for backward.

    model.set_lean_norm_act(8 * 2**20)   # decided once per model; None (the default) keeps the plain modules
    y = norm_act(block.norm1, block.act, x, lean_from_bytes)   # == block.act(block.norm1(x)), same bits forward

Autograd on the plain pair keeps two activations per pair for backward: GroupNorm's input (for its own backward)
and its output (SiLU's backward needs SiLU's input). `GroupNormSiLU` keeps only the input and the per-group
statistics, and rebuilds the normalised tensor in backward with one multiply-add per element. That is a third of a
ResNet block's saved activations. On CPU it is also faster for large activations: each image-sized tensor above
glibc's mmap threshold is fresh zeroed pages from the kernel, and the pair then allocates one instead of two
(BENCHMARKS.md: +7-13 % per step at 128-256 px on kl-f8; neutral at 4 MiB activations, -3 % at the 2 MiB
of the quickstart, hence the size threshold). Without autograd the SiLU simply runs in place.

Only a block whose lean pair is on calls `norm_act`: with it off (the model as built or loaded) a block calls its
two modules as diffusers' blocks do, with no check per call (model.py). With it on, `norm_act` first takes the
cheapest exit (autograd on and an input under the threshold: the modules), then the checks below.

The fused paths run only where they cannot change what a caller sees: the activation is exactly `nn.SiLU`, neither
module has hooks or a replaced `forward` (tiling's whole-image GroupNorm, the fp16 activation probes), no autocast
(GroupNorm's fp32 policy stays torch's) and not inside torch.compile (inductor fuses the pair itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_globals


def group_scale_shift(mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with known per-(sample, group) mean and 1/std as a per-(sample, channel) scale and shift [N, C]:
    group_norm(x) == x * scale + shift, one pass over x. Used here and by tiling's whole-image statistics."""
    scale = rstd.repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight
        shift = shift * weight + bias
    return scale, shift


class GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) saving x, the weights and the group mean / 1/std; backward recomputes group_norm(x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
                ) -> torch.Tensor:
        n, c, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, positions, groups, eps)
        F.silu(y, inplace=True)  # the normalised tensor is not kept: its memory becomes the output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        scale, shift = group_scale_shift(mean, rstd, weight, bias, c // ctx.groups)
        normalised = torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])
        grad_normalised = torch.ops.aten.silu_backward.grad_input(grad_y, normalised, grad_input=normalised)
        mask = list(ctx.needs_input_grad[:3])
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad_normalised, x, mean, rstd, weight, n, c, positions, ctx.groups, mask)
        return grad_x, grad_weight, grad_bias, None, None


def _untouched(*modules: nn.Module) -> bool:
    """No hooks (per module or global) and no instance-level `forward`: calling the modules is calling their math."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def can_fuse(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> bool:
    """Whether `norm_act` may bypass the modules (see the module docstring for why each condition)."""
    return (type(act) is nn.SiLU and type(norm) is nn.GroupNorm and norm.affine and x.dim() == 4
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
            and _untouched(norm, act))


def norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor, lean_from_bytes: int | None = None) -> torch.Tensor:
    """act(norm(x)) the lean way: with autograd, `GroupNormSiLU` for inputs of at least `lean_from_bytes` (None:
    never); without, the SiLU in place."""
    grad = torch.is_grad_enabled()
    if grad and (lean_from_bytes is None or x.numel() * x.element_size() < lean_from_bytes):
        return act(norm(x))  # the common case under the threshold: no further check
    if not can_fuse(norm, act, x):
        return act(norm(x))
    if not grad:
        return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps), inplace=True)
    return GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
