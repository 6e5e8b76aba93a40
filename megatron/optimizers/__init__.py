"""Optimizer registry and parameter groups (no weight decay on norms and biases; under muP,
hidden matrices learn at lr / m). Muon, NOLAH-Muon (muon.py) and Lion (lion.py) register
themselves at the end of this module."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from megatron.model.mup import is_hidden_matrix, width_multiplier
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.memory import register_optimizer_state
from megatron.neox_arguments.rules import register_rule
from megatron.optimizers.matrices import mark_logical_matrices
from megatron.registry import Registry

OptimizerFactory = Callable[[list[dict], dict], torch.optim.Optimizer]
# NeoX compares optimizer.type case-insensitively ("Adam").
OPTIMIZERS: Registry[OptimizerFactory] = Registry(
    "optimizer", ignore_case=True, register_with="megatron.optimizers.register_optimizer"
)


def register_optimizer(*names: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator making ``optimizer.type`` any of ``names`` build the decorated factory as
    ``factory(param_groups, params)``."""
    return OPTIMIZERS.register(*names)


@register_optimizer_state("adam", "adamw")
def _adamw_states(params: dict) -> float:
    return 2.0  # first and second moments


@register_optimizer("adam", "adamw")
def _adamw(param_groups: list[dict], params: dict) -> torch.optim.Optimizer:
    # NeoX's "Adam" is decoupled weight decay (apex FusedAdam in AdamW mode); torch's AdamW is
    # the same update and runs everywhere (DeepSpeed's fused kernels need a compiler and a GPU).
    # On CUDA its fused kernel updates every tensor in a few launches instead of several per
    # tensor; `fused: false` under optimizer.params keeps the multi-tensor (foreach) path.
    return torch.optim.AdamW(
        param_groups,
        lr=params.get("lr", 1e-3),
        betas=tuple(params.get("betas", (0.9, 0.999))),
        eps=params.get("eps", 1e-8),
        fused=params.get("fused", _all_on_cuda(param_groups)) or None,
    )


def _all_on_cuda(param_groups: list[dict]) -> bool:
    return all(p.is_cuda for group in param_groups for p in group["params"])


@register_optimizer_state("sgd")
def _sgd_states(params: dict) -> float:
    return 1.0 if params.get("momentum", 0.0) else 0.0  # the momentum buffer, when used


@register_optimizer("sgd")
def _sgd(param_groups: list[dict], params: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        param_groups, lr=params.get("lr", 1e-3), momentum=params.get("momentum", 0.0)
    )


@register_optimizer("adafactor")
def _adafactor(param_groups: list[dict], params: dict) -> torch.optim.Optimizer:
    # Factored second moments: a 2-D weight keeps one row and one column vector. The
    # layout-free checkpoint stores states shaped like their parameter, so it refuses these.
    return torch.optim.Adafactor(
        param_groups,
        lr=params.get("lr", 1e-2),
        beta2_decay=params.get("beta2_decay", -0.8),
        eps=tuple(params.get("eps", (None, 1e-3))),
        d=params.get("d", 1.0),
    )


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name


def get_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    hidden_lr_mult: float = 1.0,
) -> list[dict]:
    """Weights with decay; norm parameters and biases without.

    With ``hidden_lr_mult`` != 1 (muP's 1/m for Adam) the hidden matrices get a group of their
    own whose ``lr_mult`` the LR schedule applies.
    """
    hidden, decay, no_decay = [], [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if _no_weight_decay(name, param):
            no_decay.append(param)
        elif hidden_lr_mult != 1.0 and is_hidden_matrix(param):
            hidden.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": hidden, "weight_decay": weight_decay, "lr_mult": hidden_lr_mult},
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


MUP_OPTIMIZERS = ("adam", "adamw")


@register_rule("optimizer")
def _check_optimizer(args: Any, problems: Problems) -> None:
    """optimizer.type names a registered optimizer (NeoX compares it case-insensitively), one
    muP can scale with use_mup."""
    kind = args.optimizer_type
    if isinstance(kind, str) and kind not in OPTIMIZERS:
        problems.add(OPTIMIZERS.unknown(kind, key=f"optimizer.type{args.where('optimizer')}"))
    kind = str((args.optimizer or {}).get("type", "adam")).lower()
    if args.use_mup and kind not in MUP_OPTIMIZERS:
        problems.add(
            f"use_mup{args.where('use_mup')}: muP learning rates are implemented for "
            f"{list(MUP_OPTIMIZERS)}, not optimizer.type {kind!r}"
        )


def mup_hidden_lr_mult(args) -> float:
    """muP's Adam learning-rate multiplier for hidden matrices, 1/m (Tensor Programs V, Table 3);
    1 without muP."""
    if not args.use_mup:
        return 1.0
    kind = str((args.optimizer or {}).get("type", "adam")).lower()
    if kind not in MUP_OPTIMIZERS:
        raise ValueError(
            f"use_mup: muP learning rates are implemented for {list(MUP_OPTIMIZERS)}, "
            f"not optimizer.type {kind!r}"
        )
    return 1.0 / width_multiplier(args)


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    spec = args.optimizer or {"type": "adam", "params": {}}
    factory = OPTIMIZERS.get(str(spec.get("type", "adam")), key="optimizer.type")
    params = dict(spec.get("params", {}))
    params["lr"] = args.lr
    mark_logical_matrices(model)  # for optimizers that treat q, k, v (gate, up) apart
    groups = get_param_groups(model.named_parameters(), args.weight_decay, mup_hidden_lr_mult(args))
    for group in groups:  # the LR schedule re-applies lr_mult at every step
        group["lr"] = args.lr * group.get("lr_mult", 1.0)
    return factory(groups, params)


# The optimizers defined in their own modules register with the registry above.
from megatron.optimizers import lion, muon  # noqa: E402, F401
