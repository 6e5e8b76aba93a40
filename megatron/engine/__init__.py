"""The engines that train the model: the train step per engine and the parallel plan.

step.py         what every step shares: DeepSpeed setup, clipping, the loss reduction
sequential.py   SequentialStep: the model (GPTModel or the LSTM) on DeepSpeed's engine
pipeline.py     PipelineStep: the pipeline stages on DeepSpeed's pipeline engine
grad_norm.py    which rank counts which gradient; the norm and clipping for plain optimizers
nonfinite.py    steps with a NaN/Inf loss or gradient norm: not applied, counted, a run of them stops
watchdog.py     hangs: collective timeouts named, every rank's stacks dumped
parallelize.py  the tensor- and sequence-parallel plan applied to a built model
auto_batch.py   train_micro_batch_size_per_gpu: auto on CUDA: probe the real model, halve on OOM
"""

from __future__ import annotations

from typing import Any

import torch


def build_step(args: Any, device: torch.device):
    """The train step for this layout (pipe_parallel_size 0 and 1 both mean the sequential
    model); imported here so a sequential run never loads DeepSpeed's pipeline engine."""
    if args.pipe_parallel_size >= 2:
        from megatron.engine.pipeline import PipelineStep

        return PipelineStep(args, device)
    from megatron.engine.sequential import SequentialStep

    return SequentialStep(args, device)
