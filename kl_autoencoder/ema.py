"""The exponential moving average of the trained weights (`train.ema`), with diffusers' warm-up of the decay.

Its own room because the loop, validation (which measures the averaged weights), the export and distillation all use
it; it needs only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA(nn.Module):
    """Exponential moving average of a model's floating-point state (parameters and buffers), kept in fp32, with
    diffusers' warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"shadow_{i}", model.state_dict()[name].detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates: int | None = 0  # host copy of num_updates (None: re-read once, after a load)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._updates = None

    def shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"shadow_{i}") for i in range(len(self.names))]

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (0-based): warms up as (1 + n) / (10 + n), as diffusers' EMAModel,
        so the average of a short run is not dominated by the initial weights."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        if self._updates is None:  # the decay is a host number: read the device counter once, not every step
            self._updates = int(self.num_updates.item())
        decay = self.decay_at(self._updates)
        torch._foreach_lerp_(self.shadows(), [state[name].float() for name in self.names], 1.0 - decay)
        self.num_updates += 1
        self._updates += 1

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged tensors in place of its own."""
        state = dict(model.state_dict())
        for name, shadow in zip(self.names, self.shadows()):
            state[name] = shadow.to(state[name].dtype)
        return state

