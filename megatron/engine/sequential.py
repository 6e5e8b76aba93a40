"""The sequential model on DeepSpeed's engine: one forward and backward per micro-batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from megatron import mpu
from megatron.engine.parallelize import parallelize
from megatron.engine.step import Metrics, TrainStep, mean_metrics
from megatron.losses import LossContext
from megatron.model import ModelConfig, build_model


class SequentialStep(TrainStep):
    def build_model(self, device: torch.device) -> nn.Module:
        # Vocabulary-parallel logits: the loss is vocab_parallel_cross_entropy.
        model = build_model(ModelConfig.from_neox(self.args), parallel_output=True).to(device)
        return parallelize(model, self.args.sequence_parallel)

    def norm_group(self, model: nn.Module):
        return mpu.get_model_parallel_group()

    def train(self, batches: Iterator[dict], ctx: LossContext) -> Metrics:
        losses, extras = [], []
        for _ in range(self.args.gradient_accumulation_steps):
            loss, extra = self.objective.loss(self.engine, next(batches), ctx)
            self.guard.observe(loss)
            self.engine.backward(loss)
            self.engine.step()  # the optimizer steps at the last micro-batch
            losses.append(loss.detach())
            extras.append(extra)
        return self.with_grad_norm(mean_metrics(losses, extras))

    @torch.no_grad()
    def eval_losses(self, batches: Iterator[dict], ctx: LossContext, iters: int) -> Metrics:
        self.engine.eval()
        losses, extras = [], []
        for _ in range(iters * self.args.gradient_accumulation_steps):
            loss, extra = self.objective.loss(self.engine, next(batches), ctx)
            losses.append(loss)
            extras.append(extra)
        self.engine.train()
        return mean_metrics(losses, extras)
