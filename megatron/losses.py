"""Training objectives (`train_impl`): a registry of loss functions over one micro-batch.

    normal  next-token cross entropy where labels are >= 0 (SFT label data masks the prompt)
    dpo     Direct Preference Optimization on {"pos", "neg"} pairs (Rafailov et al., 2023)
    kto     Kahneman-Tversky Optimization on {"text", "reward"} documents (Ethayarajh et al., 2024)

A loss function takes (model, batch, context) and returns (loss, metrics): `loss` is the scalar
to backpropagate, `metrics` maps names to detached scalars that the trainer averages and logs
next to `lm_loss`. DPO and KTO compare the policy with a frozen copy of the starting weights
(`LossContext.reference`); `register_train_impl(..., reference=...)` says when one is needed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from megatron import mpu
from megatron.data.masks import LTORBatch, get_ltor_batch
from megatron.neox_arguments.errors import Problems
from megatron.neox_arguments.rules import register_names, register_rule
from megatron.registry import Registry

Metrics = dict[str, torch.Tensor]


@dataclass
class LossContext:
    """What a loss needs besides the model and the batch."""

    args: Any
    eod: int
    reference: torch.nn.Module | None = None


LossFn = Callable[[torch.nn.Module, dict, LossContext], tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class TrainImpl:
    name: str
    loss: LossFn
    # args -> whether this objective compares against a frozen reference model.
    needs_reference: Callable[[Any], bool]


TRAIN_IMPLS: Registry[TrainImpl] = Registry(
    "train_impl", register_with="megatron.losses.register_train_impl"
)
register_names("train_impl", TRAIN_IMPLS)


@register_rule("train_impl")
def _check_train_impl(args: Any, problems: Problems) -> None:
    if args.train_impl == "rm" and "rm" not in TRAIN_IMPLS:
        problems.add(
            f"train_impl='rm'{args.where('train_impl')} is not supported yet (needs a "
            f"reward head); supported: {TRAIN_IMPLS.choices()}"
        )


def register_train_impl(
    name: str, reference: bool | Callable[[Any], bool] = False
) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss function to the registry under `name`."""

    def needs_reference(args: Any) -> bool:
        return reference(args) if callable(reference) else bool(reference)

    def add(fn: LossFn) -> LossFn:
        TRAIN_IMPLS.register(name, TrainImpl(name, fn, needs_reference))
        return fn

    return add


def get_train_impl(name: str) -> TrainImpl:
    return TRAIN_IMPLS.get(name)


def build_reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model`'s current weights, in eval mode (no dropout)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


# The reference weights live beside a run's checkpoints, so a resumed run compares against the
# weights the run started from, not the ones it resumed with.
REFERENCE_FILE = "reference_model.safetensors"


def save_reference_model(reference: torch.nn.Module, save_dir: str | os.PathLike) -> None:
    """Write `{save_dir}/reference_model.safetensors` (global rank 0; temporary name, then
    rename)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = Path(save_dir) / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_model(reference, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_reference_model(reference: torch.nn.Module, load_dir: str | os.PathLike) -> bool:
    """Load the reference weights saved beside the checkpoints in `load_dir`, if there are any."""
    path = Path(load_dir) / REFERENCE_FILE
    if not path.is_file():
        return False
    try:
        load_model(reference, str(path), strict=True, device=str(_device(reference)))
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{path} does not fit the configured model: {err}") from err
    return True


# -- shared pieces -------------------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def ltor(text: torch.Tensor, label: torch.Tensor | None, ctx: LossContext) -> LTORBatch:
    """Inputs and targets of [b, s + 1] samples, with the config's mask settings."""
    args = ctx.args
    return get_ltor_batch(
        text,
        ctx.eod,
        label=label,
        eod_mask_loss=args.eod_mask_loss,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
    )


def concat_ltor(first: LTORBatch, second: LTORBatch) -> LTORBatch:
    """Two batches stacked along the batch dimension, for one forward pass."""

    def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.cat([a, b])

    return LTORBatch(
        *(cat(getattr(first, f), getattr(second, f)) for f in LTORBatch.__dataclass_fields__)
    )


def token_losses(model: torch.nn.Module, batch: LTORBatch) -> torch.Tensor:
    """Per-token cross entropy [b, s] (fp32: the kernel upcasts the logits)."""
    logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    return mpu.vocab_parallel_cross_entropy(logits, batch.labels)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when nothing is unmasked)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_logps(model: torch.nn.Module | None, batch: LTORBatch) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens [b]."""
    if model is None:
        raise ValueError("this train_impl needs a reference model, but none was built")
    return -(token_losses(model, batch) * batch.loss_mask).sum(-1)


def _on(model: torch.nn.Module, batch: dict, key: str) -> torch.Tensor | None:
    value = batch.get(key)
    # Batches come pinned on CUDA: the copy is queued without making the host wait.
    return None if value is None else value.to(_device(model), non_blocking=True)


# -- normal: language modelling ------------------------------------------------------------------


@register_train_impl("normal")
def lm_loss(model: torch.nn.Module, batch: dict, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
    """Mean next-token loss over {"text": [b, s + 1], optional "label": [b, s + 1]}."""
    inputs = ltor(_on(model, batch, "text"), _on(model, batch, "label"), ctx)
    return masked_mean(token_losses(model, inputs), inputs.loss_mask), {}


def pipeline_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """'normal' on a pipeline's last stage, whose labels are (targets, loss_mask)."""
    targets, loss_mask = labels
    return masked_mean(mpu.vocab_parallel_cross_entropy(logits, targets), loss_mask)


# -- dpo -----------------------------------------------------------------------------------------


def dpo_objective(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO's sigmoid loss from summed sequence log-probs [b]; the implicit rewards are
    beta * (policy - reference) log-probs."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    with torch.no_grad():
        metrics = {
            "chosen_rewards": chosen_rewards.mean(),
            "rejected_rewards": rejected_rewards.mean(),
            "margins": (chosen_rewards - rejected_rewards).mean(),
            "reward_acc": (chosen_rewards > rejected_rewards).float().mean(),
            "policy_chosen_logp": policy_chosen.mean(),
            "policy_rejected_logp": policy_rejected.mean(),
        }
    return loss, metrics


@register_train_impl("dpo", reference=lambda args: not args.dpo_reference_free)
def dpo_loss(model: torch.nn.Module, batch: dict, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
    """DPO over {"pos", "neg", "pos_label", "neg_label"}; chosen and rejected share one forward."""
    chosen = ltor(_on(model, batch, "pos"), _on(model, batch, "pos_label"), ctx)
    rejected = ltor(_on(model, batch, "neg"), _on(model, batch, "neg_label"), ctx)
    both = concat_ltor(chosen, rejected)
    policy_chosen, policy_rejected = sequence_logps(model, both).chunk(2)
    if ctx.args.dpo_reference_free:
        reference_chosen = reference_rejected = torch.zeros_like(policy_chosen)
    else:
        with torch.no_grad():
            reference_chosen, reference_rejected = sequence_logps(ctx.reference, both).chunk(2)
    loss, metrics = dpo_objective(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, ctx.args.dpo_beta
    )
    if not ctx.args.dpo_reference_free:
        metrics["ref_chosen_logp"] = reference_chosen.mean()
        metrics["ref_rejected_logp"] = reference_rejected.mean()
    return loss, metrics


# -- kto -----------------------------------------------------------------------------------------


def kto_objective(
    policy: torch.Tensor,
    reference: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, Metrics]:
    """KTO's loss from summed sequence log-probs [b] and rewards [b] (> 0 desirable, < 0
    undesirable, 0 ignored).

    The reference point z0 is the batch's KL estimate: as in GPT-NeoX, each half of the batch uses
    the mean policy/reference log-ratio of the *other* half, clipped at 0 and not differentiated
    (the KTO paper estimates it on mismatched pairs for the same reason: a sample must not see its
    own log-ratio in z0).
    """
    if policy.numel() < 2:
        raise ValueError("KTO needs at least 2 samples per micro-batch to estimate the KL term")
    log_ratio = policy - reference
    half = (log_ratio.numel() + 1) // 2
    with torch.no_grad():
        first_kl = log_ratio[:half].mean().clamp(min=0)
        second_kl = log_ratio[half:].mean().clamp(min=0)
        z0 = torch.cat([second_kl.expand(half), first_kl.expand(log_ratio.numel() - half)])
    desirable, undesirable = reward > 0, reward < 0
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - log_ratio))),
    )
    used = (desirable | undesirable).float()
    loss = (losses * used).sum() / used.sum().clamp(min=1)
    with torch.no_grad():
        rewards = beta * log_ratio
        metrics = {
            "kl": z0.mean(),
            "desirable_rewards": masked_mean(rewards, desirable.float()),
            "undesirable_rewards": masked_mean(rewards, undesirable.float()),
            # A desirable sample should gain likelihood over the reference, an undesirable lose.
            "reward_acc": masked_mean((rewards * reward.sign() > 0).float(), used),
        }
    return loss, metrics


@register_train_impl("kto", reference=True)
def kto_loss(model: torch.nn.Module, batch: dict, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
    """KTO over {"text", optional "label", "reward": [b]} (one document per sample)."""
    if "reward" not in batch:
        raise ValueError(
            "train_impl kto needs a reward per sample: set train_reward_data_paths "
            "(written by preprocess_data_with_chat_template.py --reward-key)"
        )
    inputs = ltor(_on(model, batch, "text"), _on(model, batch, "label"), ctx)
    policy = sequence_logps(model, inputs)
    with torch.no_grad():
        reference = sequence_logps(ctx.reference, inputs)
    args = ctx.args
    return kto_objective(
        policy,
        reference,
        _on(model, batch, "reward").float(),
        args.kto_beta,
        args.kto_desirable_weight,
        args.kto_undesirable_weight,
    )
