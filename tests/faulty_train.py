"""train.py with faults injected, for tests/test_fault_tolerance.py (never used by a real run).

FAULT_NAN="RANKS:ITERS" (e.g. "1:3" or "0:3,4,5") multiplies the loss of those ranks by NaN at
those iterations, so the loss and every gradient of the step are NaN, as after an overflow.
FAULT_STALL="RANK:ITER" makes that rank sleep at the start of that iteration's step, like a rank
stuck in a dataloader or a kernel: it stops making progress while its peers wait for it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch.distributed as dist

from megatron import training
from megatron.entry import run_entry_point


def parse(name: str) -> tuple[set[int], set[int]]:
    ranks, _, iterations = os.environ.get(name, ":").partition(":")
    numbers = lambda text: {int(x) for x in text.split(",") if x}  # noqa: E731
    return numbers(ranks), numbers(iterations)


def stall() -> None:
    time.sleep(600)


def inject_faults(trainer: training.Trainer) -> None:
    rank = dist.get_rank()
    nan_ranks, nan_iterations = parse("FAULT_NAN")
    stall_ranks, stall_iterations = parse("FAULT_STALL")
    objective, train = trainer.step.objective, trainer.step.train

    def poison() -> bool:
        return rank in nan_ranks and trainer.state.iteration + 1 in nan_iterations

    def poisoned(engine, batch, ctx):
        loss, extra = objective.loss(engine, batch, ctx)
        return (loss * float("nan") if poison() else loss), extra

    def stalling(batches, ctx):
        if rank in stall_ranks and trainer.state.iteration + 1 in stall_iterations:
            stall()
        return train(batches, ctx)

    trainer.step.objective = dataclasses.replace(objective, loss=poisoned)
    module = trainer.step.module
    if getattr(module, "loss_fn", None) is not None:  # a pipeline's last stage
        pipeline_loss = module.loss_fn

        def poisoned_pipeline(*args):
            loss = pipeline_loss(*args)
            return loss * float("nan") if poison() else loss

        module.loss_fn = poisoned_pipeline
    trainer.step.train = stalling


def main(args) -> None:
    trainer = training.Trainer(args)
    inject_faults(trainer)
    trainer.train()


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
