"""Muon (Jordan et al. 2024) and NOLAH-Muon: momentum on each hidden weight matrix,
orthogonalised, next to an AdamW for the embeddings, the output layer, norms and biases.

Every layout computes the single-process update: each logical matrix (matrices.py) is
orthogonalised whole, from the gradient and momentum gathered over the tensor-parallel group,
and each rank keeps its slice. The data-parallel ranks, which hold the same matrices, share the
orthogonalisations out (each does its share, balanced by size) and broadcast the results; each
pipeline stage does its own layers. DeepSpeed's ZeRO and bf16/fp16 wrappers hand the optimizer
flat fragments of flattened parameter groups, which cut matrices apart, so the config refuses
them with Muon (``_check_muon``).

State per parameter, as torch's optimizers keep it (so layout-free checkpoints reshard it):
``momentum_buffer`` for the matrices, ``exp_avg`` and ``exp_avg_sq`` for the AdamW ones.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.model.mup import is_hidden_matrix
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_rule
from megatron.optimizers import register_optimizer
from megatron.optimizers.matrices import full_tensor, local_slice, logical_rows
from megatron.optimizers.nolah import GATES, PROJECTIONS, Nolah, momentum_coefficients
from megatron.optimizers.orthogonalize import NS_DTYPES, ORTHOGONALIZERS

UPDATE_SCALES = {
    # Moonlight (Liu et al. 2025): the update's RMS matches AdamW's typical 0.2-0.4.
    "rms": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    "shape": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
}
MUON_KEYS = {
    "lr": None,
    "momentum": 0.95,
    "nesterov": True,
    "orthogonalize": "newton_schulz",
    "ns_dtype": "bf16",
    "update_scale": "rms",
    "adamw_lr": None,  # the peak lr
    "adamw_betas": (0.9, 0.95),
    "adamw_eps": 1e-8,
    "adamw_wd": None,  # the config's weight_decay
}
NOLAH_KEYS = {"gate": "tanh", "momentum_scale": 0.9, "scale_percentile": 95.0, "projection": "silu"}
RANGES = {"momentum": (0.0, 1.0), "momentum_scale": (0.0, 1.0), "scale_percentile": (0.0, 100.0)}
CHOICES = {
    "orthogonalize": ORTHOGONALIZERS,
    "ns_dtype": NS_DTYPES,
    "update_scale": UPDATE_SCALES,
    "gate": GATES,
    "projection": PROJECTIONS,
}


class Muon(torch.optim.Optimizer):
    """Param groups with ``use_muon`` true hold 2-D matrices; the others step with AdamW
    (their ``betas``, ``eps``). ``orthogonalize_failures`` counts, per step, the matrices whose
    orthogonalisation failed (non-finite, or an SVD error): they took the normalised momentum."""

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        orthogonalize: str = "newton_schulz",
        ns_dtype: str = "bf16",
        update_scale: str = "rms",
        nolah: Nolah | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=0.0, use_muon=False, betas=tuple(betas), eps=eps)
        super().__init__(param_groups, defaults)
        self.momentum = momentum
        self.nesterov = nesterov
        self.orthogonalize = ORTHOGONALIZERS[orthogonalize]
        self.ns_dtype = NS_DTYPES[ns_dtype]
        self.update_scale = UPDATE_SCALES[update_scale]
        self.nolah = nolah or Nolah()
        self.orthogonalize_failures = torch.zeros(())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # the same on every rank (a skipped step drops them all)
                    continue
                if group["use_muon"]:
                    matrices.append((group, p))
                else:
                    adamw_update(p, group, self.state[p])
        directions = [self._momentum_direction(p) for _, p in matrices]
        for (group, p), update in zip(matrices, self.orthogonal_updates(matrices, directions)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])
        return loss

    def _momentum_direction(self, p: torch.nn.Parameter) -> torch.Tensor:
        """Update ``p``'s momentum; the full tensor of the direction to orthogonalise."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(())
            state["momentum_buffer"] = torch.zeros_like(p)
        state["step"] += 1
        grad = GATES[self.nolah.gate](full_tensor(p, p.grad))
        buffer = full_tensor(p, state["momentum_buffer"])
        coefficients = self._momentum_coefficients(p, grad)
        buffer = coefficients * buffer + grad
        state["momentum_buffer"].copy_(local_slice(p, buffer))
        return grad + coefficients * buffer if self.nesterov else buffer

    def _momentum_coefficients(self, p, grad: torch.Tensor) -> torch.Tensor | float:
        """The momentum, or with NOLAH's scaling its value per element of each logical matrix."""
        if self.nolah.momentum_scale is None:
            return self.momentum
        coefficients = torch.empty_like(grad)
        for rows in logical_rows(p):
            coefficients[rows] = momentum_coefficients(grad[rows], self.momentum, self.nolah)
        return coefficients

    def orthogonal_updates(self, matrices: list, directions: list) -> list[torch.Tensor]:
        """Each matrix's update (this rank's slice): this data-parallel rank computes its share
        and receives the others'."""
        if not matrices:
            return []
        world, rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
        owners = balanced_owners([d.numel() for d in directions], world)
        mine, failures = [], torch.zeros((), device=directions[0].device)
        for (_, p), direction, owner in zip(matrices, directions, owners):
            if owner == rank:
                update, failed = self._orthogonal_update(p, direction)
                mine.append(local_slice(p, update))
                failures += failed
        if world == 1:
            self.orthogonalize_failures = failures
            return mine
        params = [p for _, p in matrices]
        updates, self.orthogonalize_failures = exchange(mine, failures, owners, params)
        return updates

    def _orthogonal_update(self, p, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(full update, failures) for the full ``direction`` of ``p``."""
        update = torch.empty_like(direction)
        failures = torch.zeros((), device=direction.device)
        for rows in logical_rows(p):
            matrix = PROJECTIONS[self.nolah.projection](direction[rows])
            fallback = matrix * math.sqrt(min(matrix.shape)) / (matrix.norm() + 1e-7)
            try:
                result = self.orthogonalize(matrix, self.ns_dtype)
                ok = torch.isfinite(result).all()  # a tensor: no wait for the device
            except torch.linalg.LinAlgError:
                result, ok = fallback, torch.tensor(False, device=direction.device)
            failures += (~ok).float()
            update[rows] = torch.where(ok, result, fallback) * self.update_scale(*matrix.shape)
        return update.to(p.dtype), failures

    def metrics(self) -> dict[str, torch.Tensor]:
        """The step's failures over the whole model (a collective over the pipeline stages)."""
        failures = self.orthogonalize_failures.clone()
        if dist.is_initialized() and mpu.get_pipe_parallel_world_size() > 1:
            dist.all_reduce(failures, group=mpu.get_pipe_parallel_group())
        return {"orthogonalize_failures": failures}


def adamw_update(p: torch.nn.Parameter, group: dict, state: dict) -> None:
    """One AdamW step of ``p`` (decoupled weight decay, bias-corrected moments)."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = torch.zeros(())
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    step = state["step"].item()
    state["exp_avg"].lerp_(p.grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1**step))


def balanced_owners(sizes: list[int], world: int) -> list[int]:
    """The data-parallel rank orthogonalising each matrix: largest first, to the least loaded
    rank (the same answer on every rank)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = min(range(world), key=lambda r: load[r])
        owners[index] = owner
        load[owner] += sizes[index]
    return owners


def exchange(
    mine: list[torch.Tensor], failures: torch.Tensor, owners: list[int], like: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every matrix's update (shaped like its parameter in ``like``) from its owner: one
    broadcast per data-parallel rank of its updates and failure count, flattened; the total
    failures."""
    group = mpu.get_data_parallel_group()
    rank = mpu.get_data_parallel_rank()
    dtype, device = like[0].dtype, like[0].device
    updates: list[torch.Tensor] = list(like)  # each replaced below: every index has an owner
    total = torch.zeros((), device=device)
    for owner in range(mpu.get_data_parallel_world_size()):
        indices = [i for i, o in enumerate(owners) if o == owner]
        sizes = [like[i].numel() for i in indices] + [1]
        if owner == rank:
            flat = torch.cat([u.reshape(-1) for u in mine] + [failures.to(dtype).view(1)])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
        *pieces, count = flat.split(sizes)
        for i, piece in zip(indices, pieces):
            updates[i] = piece.view_as(like[i])
        total += count.float().sum()
    return updates, total


def build_muon(param_groups: list[dict], params: dict, nolah: Nolah) -> Muon:
    """Split each group into its hidden matrices (Muon) and the rest (AdamW at ``adamw_lr``,
    through the schedule's ``lr_mult``)."""
    settings = {**MUON_KEYS, **{k: v for k, v in params.items() if k in MUON_KEYS}}
    lr = settings["lr"]
    adamw_mult = (settings["adamw_lr"] or lr) / lr
    groups = []
    for group in param_groups:
        matrices = [p for p in group["params"] if p.ndim == 2 and is_hidden_matrix(p)]
        chosen = {id(p) for p in matrices}
        others = [p for p in group["params"] if id(p) not in chosen]
        if matrices:
            groups.append({**group, "params": matrices, "use_muon": True})
        if others:
            decay = group["weight_decay"]
            if decay and settings["adamw_wd"] is not None:  # norms and biases stay undecayed
                decay = settings["adamw_wd"]
            mult = group.get("lr_mult", 1.0) * adamw_mult
            groups.append({**group, "params": others, "weight_decay": decay, "lr_mult": mult})
            groups[-1]["lr"] = group["lr"] * adamw_mult
    return Muon(
        groups,
        lr=lr,
        momentum=settings["momentum"],
        nesterov=settings["nesterov"],
        orthogonalize=settings["orthogonalize"],
        ns_dtype=settings["ns_dtype"],
        update_scale=settings["update_scale"],
        nolah=nolah,
        betas=tuple(settings["adamw_betas"]),
        eps=settings["adamw_eps"],
    )


@register_optimizer("muon")
def _muon(param_groups: list[dict], params: dict) -> Muon:
    return build_muon(param_groups, params, Nolah())


@register_optimizer("muon_nolah")
def _muon_nolah(param_groups: list[dict], params: dict) -> Muon:
    options = {key: params.get(key, default) for key, default in NOLAH_KEYS.items()}
    return build_muon(param_groups, params, Nolah(**options))


@register_rule("muon")
def _check_muon(args: Any, problems: Problems) -> None:
    """Muon's keys and choices, and the layouts that keep its matrices whole."""
    kind = str((args.optimizer or {}).get("type", "")).lower()
    if kind not in ("muon", "muon_nolah"):
        return
    where = args.where("optimizer")
    params = args.optimizer.get("params", {})
    known = {**MUON_KEYS, **(NOLAH_KEYS if kind == "muon_nolah" else {})}
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(
                f"optimizer.params.{key}{where}: not a {kind} key; expected one of "
                f"{sorted(known)}{hint}"
            )
    for key, names in CHOICES.items():
        if key in params and key in known and params[key] not in names:
            problems.add(
                f"optimizer.params.{key}{where}: expected one of {sorted(names)}, "
                f"got {params[key]!r}"
            )
    for key, (low, high) in RANGES.items():
        value = params.get(key)
        if (
            key in known
            and value is not None
            and not (isinstance(value, int | float) and low <= value <= high)
        ):
            problems.add(
                f"optimizer.params.{key}{where}: expected a number in [{low}, {high}], got {value!r}"
            )
    if args.zero_stage:
        problems.add(
            f"zero_optimization.stage={args.zero_stage}{args.where('zero_optimization')}: "
            f"{kind} orthogonalises whole weight matrices, and ZeRO hands the optimizer flat "
            "fragments of flattened parameters that cut them apart; use stage 0 (Muon's state "
            "is one buffer per matrix, half of Adam's)"
        )
    if args.precision != "fp32":
        problems.add(
            f"precision {args.precision!r}{args.where('precision')}: {kind} needs fp32; "
            "DeepSpeed's bf16/fp16 optimizers flatten the parameters into fragments that cut "
            "the weight matrices apart (Newton-Schulz still runs in ns_dtype)"
        )
