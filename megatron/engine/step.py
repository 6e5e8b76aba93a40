"""The train step as one object per engine: what SequentialStep and PipelineStep share.

A step builds the model for its engine and hands it to ``deepspeed.initialize``; it owns how
loader batches reach the model, forward and backward over the gradient-accumulation
micro-batches, the one gradient-norm computation (grad_norm.py), the non-finite guard
(nonfinite.py) and the loss reduction. Metrics stay device tensors; the host waits for the
accelerator once a step, when the ranks decide whether the update is finite.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.engine.grad_norm import GradNormClipper, mark_norm_ownership, plain_optimizer
from megatron.engine.nonfinite import NonFiniteGuard
from megatron.learning_rates import build_lr_scheduler
from megatron.logging import print_rank_0
from megatron.losses import LossContext, get_train_impl
from megatron.model.compile import compile_transformer_blocks
from megatron.optimizers import build_optimizer

Metrics = dict[str, Any]


@contextmanager
def steps_ignored(optimizer: torch.optim.Optimizer):
    """Make ``optimizer.step`` do nothing inside the block.

    DeepSpeed's fp16/bf16 wrappers at ZeRO stage 0 (FP16_Optimizer, FP16_UnfusedOptimizer) step
    the optimizer once on zero gradients while they initialise, to create its states. For Adam
    that step counts: bias correction runs one step ahead for the whole run (the first update is
    0.735 lr at betas (0.9, 0.95) where ZeRO 1-3 take lr) and weight decay is applied once.
    Ignored, the states are created at the first real step, as under ZeRO.
    """
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step  # the class's step again


def configure_activation_checkpointing(args: Any) -> None:
    """Configure deepspeed.checkpointing when `checkpoint_activations` is on (every rank, before
    the model is built)."""
    if not args.checkpoint_activations:
        return
    import deepspeed

    deepspeed.checkpointing.configure(
        mpu,
        partition_activations=args.partition_activations,
        num_checkpoints=args.num_layers,
    )


def average_across_data_parallel(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and mpu.get_data_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, group=mpu.get_data_parallel_group())
        value /= mpu.get_data_parallel_world_size()
    return value


def mean_metrics(losses: list[torch.Tensor], extras: list[Metrics]) -> Metrics:
    """lm_loss and each extra metric: mean over micro-batches and data-parallel ranks."""
    metrics = {"lm_loss": average_across_data_parallel(torch.stack(losses).mean())}
    for key in extras[0] if extras else ():
        values = torch.stack([extra[key] for extra in extras]).float().mean()
        metrics[key] = average_across_data_parallel(values)
    return metrics


class TrainStep(ABC):
    """Build the model, the optimizer, the LR schedule and the DeepSpeed engine; subclasses say
    how their engine builds the model and runs a step."""

    # Passed to deepspeed.initialize: whose process groups the engine uses.
    engine_mpu: Any = mpu

    def __init__(self, args: Any, device: torch.device) -> None:
        import deepspeed

        self.args = args
        # The objective (megatron/losses.py); pipelines train 'normal' (validation says so).
        self.objective = get_train_impl(args.train_impl)
        # Built before the model: a pipeline's loss function reports to it.
        self.guard = NonFiniteGuard(args.skip_nonfinite_steps, norm_counts=args.precision != "fp16")
        configure_activation_checkpointing(args)
        model = self.build_model(device)
        mark_norm_ownership(model, mpu.get_tensor_model_parallel_rank())
        config = self.deepspeed_config()
        self.clipper = None
        if plain_optimizer(args):  # the hook clips and reports the norm
            self.clipper = GradNormClipper(model, self.norm_group(model), args.gradient_clipping)
            config["gradient_clipping"] = 0.0
        if args.torch_compile:
            mpu.compile_cross_entropy_kernels()
            blocks = compile_transformer_blocks(model)
            print_rank_0(f"torch_compile: compiled {blocks} blocks and the cross-entropy kernels")
        optimizer = build_optimizer(args, model)
        # What the optimizer reports per step (Muon's orthogonalize_failures), if anything.
        self.optimizer_metrics = getattr(optimizer, "metrics", dict)
        if self.clipper is not None:
            optimizer.register_step_pre_hook(self.clipper)
        optimizer.register_step_pre_hook(self.guard)  # after the clipper: it sees the norm first
        self.scheduler = build_lr_scheduler(args, optimizer)
        with steps_ignored(optimizer):
            self.engine, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                config=config,
                dist_init_required=False,
                mpu=self.engine_mpu,
            )
        # What checkpoints save and load: DeepSpeed's wrapper where it wraps ours.
        self.optimizer = self.engine.optimizer

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    # -- what an engine provides -------------------------------------------------------------

    @abstractmethod
    def build_model(self, device: torch.device) -> nn.Module:
        """This process's model (or pipeline stage), with the parallel plan applied."""

    def deepspeed_config(self) -> dict:
        """The config for deepspeed.initialize (a fresh dict: ours to edit)."""
        return self.args.deepspeed_config

    @abstractmethod
    def norm_group(self, model: nn.Module) -> Any:
        """The group over which the ranks holding one model's weights sum the norm."""

    def batches(self, loader: Iterator[dict], ctx: LossContext) -> Iterator:
        """Loader micro-batches as the engine takes them."""
        return loader

    @abstractmethod
    def train(self, batches: Iterator, ctx: LossContext) -> Metrics:
        """One optimizer step over gradient_accumulation_steps micro-batches: lm_loss (and the
        objective's metrics), reduced; grad_norm where known."""

    @abstractmethod
    def eval_losses(self, batches: Iterator, ctx: LossContext, iters: int) -> Metrics:
        """``iters`` steps' worth of micro-batches without gradients, reduced as in train."""

    # -- shared --------------------------------------------------------------------------------

    def with_grad_norm(self, metrics: Metrics) -> Metrics:
        """The step's metrics with the gradient norm and the optimizer's own metrics."""
        metrics = {**metrics, **self.optimizer_metrics()}
        norm = self.clipper.norm if self.clipper is not None else self.engine.get_global_grad_norm()
        return metrics if norm is None else {**metrics, "grad_norm": norm}
