"""Cross entropy over logits whose vocabulary dimension is split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.mpu.initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        # Subtract the global max so exp() cannot overflow.
        logits_max = logits.max(dim=-1).values
        _all_reduce(logits_max, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        per_rank = logits.size(-1)
        start = get_tensor_model_parallel_rank() * per_rank
        outside = (labels < start) | (labels >= start + per_rank)
        local = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(target, dist.ReduceOp.SUM)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM)
        loss = sum_exp.log() - target

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, local, outside = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(label); the saved softmax is reused in place
        # (backward runs once) to avoid a second logits-sized buffer.
        grad = softmax
        hit = (~outside).unsqueeze(-1).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's vocabulary shard of the logits.

    ``logits`` is [b, s, padded_vocab / tp] (the whole padded vocabulary at TP=1); ``labels``
    holds global token ids in [0, padded_vocab).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
            "expected labels shaped like logits without the vocabulary dimension"
        )
    return _VocabParallelCrossEntropy.apply(logits, labels)
