"""Optimizer registry and parameter groups (no weight decay on norms and biases)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

OptimizerFactory = Callable[[list[dict], dict], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(*names: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def add(factory: OptimizerFactory) -> OptimizerFactory:
        for name in names:
            OPTIMIZERS[name.lower()] = factory
        return factory

    return add


@register_optimizer("adam", "adamw")
def _adamw(param_groups: list[dict], params: dict) -> torch.optim.Optimizer:
    # NeoX's "Adam" is decoupled weight decay (apex FusedAdam in AdamW mode); torch's AdamW is
    # the same update and runs everywhere (DeepSpeed's fused kernels need a compiler and a GPU).
    return torch.optim.AdamW(
        param_groups,
        lr=params.get("lr", 1e-3),
        betas=tuple(params.get("betas", (0.9, 0.999))),
        eps=params.get("eps", 1e-8),
    )


@register_optimizer("sgd")
def _sgd(param_groups: list[dict], params: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        param_groups, lr=params.get("lr", 1e-3), momentum=params.get("momentum", 0.0)
    )


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name


def get_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Two groups: weights with decay; norm parameters and biases without."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    spec = args.optimizer or {"type": "adam", "params": {}}
    name = str(spec.get("type", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer.type {spec.get('type')!r} is not one of {sorted(OPTIMIZERS)}; "
            "add one with megatron.optimizers.register_optimizer"
        )
    params = dict(spec.get("params", {}))
    params["lr"] = args.lr
    groups = get_param_groups(model.named_parameters(), args.weight_decay)
    return OPTIMIZERS[name](groups, params)
