"""Every parameter of several modules as a view into one tensor: speed machinery of the classic algorithms.

Small networks train with many tiny optimizer steps, where the per-tensor overhead of the optimiser, of gradient
clipping and of zeroing (one kernel per weight and bias) costs more than the arithmetic; on one flat tensor each is
one operation. ppo, a2c and dqn build their optimiser on it; nothing else changes (the modules, their state_dicts and
checkpoints are as before).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatParameters:
    """The parameters of several modules stored as views into one contiguous tensor, gradients likewise.

    Small networks are trained with many tiny steps, where the per-tensor work of the optimiser, of
    `clip_grad_norm_` and of `zero_grad` (one kernel per weight and bias, 13 tensors for an actor and a critic)
    costs more than the arithmetic. With every parameter a view into `flat` and every gradient a view into
    `flat.grad`, each of those is a single operation on one tensor. Backward still writes each module's gradient
    (into its view, in place), and the modules, their state_dicts and checkpoints are unchanged.
    The optimiser must be built on `[flat_parameters.flat]`, not on the modules' parameters.
    """

    def __init__(self, modules: list[nn.Module]):
        parameters = [p for module in modules for p in module.parameters()]
        total = sum(p.numel() for p in parameters)
        self.flat = nn.Parameter(torch.empty(total, dtype=parameters[0].dtype, device=parameters[0].device))
        self.flat.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in parameters:
            size = p.numel()
            self.flat.data[offset:offset + size].copy_(p.data.reshape(-1))
            p.data = self.flat.data[offset:offset + size].view_as(p)
            # A gradient that already exists is accumulated in place by autograd, so backward fills the view.
            p.grad = self.flat.grad[offset:offset + size].view_as(p)
            offset += size
        self.parameters = parameters

    def zero_grad(self) -> None:
        """Zero every gradient at once (never set them to None: the views must survive)."""
        self.flat.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Scale all gradients together so their global L2 norm is at most `max_norm` (<= 0: no clipping).

        Same rule as torch.nn.utils.clip_grad_norm_: factor min(1, max_norm / (norm + 1e-6)). Returns the norm
        before clipping.
        """
        norm = torch.linalg.vector_norm(self.flat.grad)
        if max_norm > 0:
            self.flat.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def descend(self, loss: Tensor, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
        """One gradient step on `loss`: zero the gradients, backpropagate, clip their global norm to `max_norm`
        (<= 0: no clipping) and step `optimizer` (built on `[self.flat]`). Returns the norm before clipping."""
        self.zero_grad()
        loss.backward()
        norm = self.clip_grad_norm(max_norm)
        optimizer.step()
        return norm
