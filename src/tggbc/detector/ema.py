"""An exponential moving average of a model's weights, for evaluation and shipping.

With batches of two frames the weights after any one step carry that step's noise; their running
average over the last ~1 / (1 - decay) steps carries less of it (YOLO and RT-DETR ship such an
average). At the end of a cosine schedule the steps are small and the average can trail the last
weights instead: run 16 measured both on held-out scenes (README). Floating-point parameters and
buffers (BatchNorm's running statistics too) are averaged; integer buffers (BatchNorm's step
count) are copied.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * current, after every optimiser step (`update`).

    Starts as a copy of the model's current weights, so a run that starts from another run's
    weights averages from there rather than from zero.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.state = {name: t.detach().clone() for name, t in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        if current.keys() != self.state.keys():
            raise ValueError("the model's tensors changed names since the average began")
        floats = [name for name, t in self.state.items() if t.is_floating_point()]
        # One fused kernel per list rather than one per tensor: the model has a few hundred tensors.
        torch._foreach_lerp_([self.state[n] for n in floats], [current[n].detach() for n in floats], 1.0 - self.decay)
        for name, t in self.state.items():
            if not t.is_floating_point():
                t.copy_(current[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "state": self.state}

    def load_state_dict(self, stored: dict) -> None:
        if stored["decay"] != self.decay:
            raise ValueError(f"the stored average has decay {stored['decay']}, this one {self.decay}")
        if stored["state"].keys() != self.state.keys():
            raise ValueError("the stored average holds other tensors than the model")
        self.state = {name: t.clone() for name, t in stored["state"].items()}
