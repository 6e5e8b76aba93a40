"""Cross entropy over logits whose vocabulary dimension is split across tensor-parallel ranks.

The forward saves the logits in their own precision and the log-sum-exp; the backward recomputes
the softmax from them. Both logits-sized passes are written as small kernels (``_sum_exp``,
``_logits_grad``) that ``compile_cross_entropy_kernels`` hands to torch.compile: compiled, each
is one fused read of the low-precision logits instead of several fp32 copies the size of the
logits (9 GB at a micro-batch of 22 x 2048 tokens over GPT-2's vocabulary).
"""

from __future__ import annotations

from types import SimpleNamespace

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


def _sum_exp(logits: torch.Tensor, logits_max: torch.Tensor) -> torch.Tensor:
    """sum(exp(logits - max)) over the vocabulary, in fp32."""
    return (logits.float() - logits_max.unsqueeze(-1)).exp_().sum(dim=-1)


def _logits_grad(
    logits: torch.Tensor,
    log_sum_exp: torch.Tensor,
    local: torch.Tensor,
    outside: torch.Tensor,
    grad_loss: torch.Tensor,
) -> torch.Tensor:
    """d loss / d logits = (softmax - one_hot(label)) * grad_loss, in the logits' precision."""
    grad = (logits.float() - log_sum_exp.unsqueeze(-1)).exp_()
    # The one-hot as a comparison with the vocabulary index: elementwise, so it fuses.
    vocab = torch.arange(logits.size(-1), device=logits.device)
    grad.add_((vocab == local.unsqueeze(-1)) & ~outside.unsqueeze(-1), alpha=-1)
    return grad.mul_(grad_loss.unsqueeze(-1)).to(logits.dtype)


# The kernels in use: eager until compile_cross_entropy_kernels() swaps in compiled ones.
_kernels = SimpleNamespace(sum_exp=_sum_exp, logits_grad=_logits_grad)


def compile_cross_entropy_kernels() -> None:
    """Run the logits-sized passes as torch.compile kernels from now on (the torch_compile key)."""
    _kernels.sum_exp = torch.compile(_sum_exp, dynamic=False)
    _kernels.logits_grad = torch.compile(_logits_grad, dynamic=False)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Subtract the global max so exp() cannot overflow (the max of bf16 values is exact).
        logits_max = logits.detach().amax(dim=-1).float()
        _all_reduce(logits_max, dist.ReduceOp.MAX)
        sum_exp = _kernels.sum_exp(logits, logits_max)
        _all_reduce(sum_exp, dist.ReduceOp.SUM)

        per_rank = logits.size(-1)
        start = get_tensor_model_parallel_rank() * per_rank
        outside = (labels < start) | (labels >= start + per_rank)
        local = (labels - start).masked_fill(outside, 0)
        target = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).float() - logits_max
        target = target.masked_fill(outside, 0.0)
        _all_reduce(target, dist.ReduceOp.SUM)

        log_sum_exp = sum_exp.log()
        ctx.save_for_backward(logits, log_sum_exp.add(logits_max), local, outside)
        return log_sum_exp - target

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, log_sum_exp, local, outside = ctx.saved_tensors
        return _kernels.logits_grad(logits, log_sum_exp, local, outside, grad_loss), None


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
