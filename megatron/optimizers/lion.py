"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolation of momentum and gradient, decoupled weight decay; one state (``exp_avg``)."""

from __future__ import annotations

import torch

from megatron.neox_arguments.memory import register_optimizer_state
from megatron.optimizers import register_optimizer


class Lion(torch.optim.Optimizer):
    def __init__(
        self, param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99)
    ) -> None:
        super().__init__(param_groups, dict(lr=lr, betas=tuple(betas), weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                state["step"] += 1
                direction = state["exp_avg"].lerp(p.grad, 1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"])
                state["exp_avg"].lerp_(p.grad, 1 - beta2)
        return loss


@register_optimizer_state("lion")
def _lion_states(params: dict) -> float:
    return 1.0  # the momentum (Muon keeps it for matrices and Adam's two for the rest: the
    # estimate's default of 2 per parameter bounds it from above)


@register_optimizer("lion")
def _lion(param_groups: list[dict], params: dict) -> Lion:
    return Lion(param_groups, lr=params.get("lr", 1e-4), betas=params.get("betas", (0.9, 0.99)))
