"""Loss and perplexity of a loaded model on the configured validation and test data: what
eval.py reports when no `eval_tasks` are named.

Each split is read as training reads it (`data_path` + `split`, or `{valid,test}_data_paths`,
with the same packing, masks and labels) from its start: `eval_iters` iterations of
`train_batch_size` samples, the test figure training prints at its end, or with
`eval_iters: -1` one epoch of the split. The loss is averaged over every predicted token of
the split (the sum over data-parallel ranks divided by their token count), and perplexity is
its exponential.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.data_utils import build_train_valid_test_datasets, describe_dataset
from megatron.logging import print_rank_0
from megatron.losses import LossContext, ltor
from megatron.neox_arguments import ConfigError

SPLITS = ("valid", "test")


def one_epoch(dataset: Any) -> int:
    """Samples in one pass over a split (for a blend, over each of its datasets)."""
    if isinstance(dataset, BlendableDataset):
        return sum(one_epoch(member) for member in dataset.datasets if member is not None)
    return dataset.samples_per_epoch


def split_datasets(args: Any) -> dict[str, tuple[Any, int]]:
    """{split: (dataset, samples to score)} of the valid and test data (a split without
    documents is left out); a dataset may serve more samples than are scored."""
    if args.dataset_impl != "gpt2" or args.train_impl != "normal":
        raise ConfigError(
            f"eval.py without eval_tasks reports language-model loss; dataset_impl "
            f"{args.dataset_impl!r} / train_impl {args.train_impl!r} data are not plain text: "
            "name eval_tasks or use gpt2 data"
        )
    if args.eval_iters == 0:
        raise ConfigError(
            "eval_iters is 0: set it to a number of iterations, or -1 for the whole split"
        )
    if not (args.data_path or args.valid_data_paths or args.test_data_paths):
        raise ConfigError(
            "eval.py without eval_tasks scores the valid and test data, but the config gives "
            "none: set data_path (with a split that leaves them documents) or "
            "valid_data_paths / test_data_paths, or name eval_tasks"
        )
    try:
        if args.eval_iters == -1:
            # Built once to learn each split's epoch, then again to serve exactly one.
            _, *probe = build_train_valid_test_datasets(args, (0, 1, 1))
            counts = [one_epoch(d) if d is not None else 0 for d in probe]
        else:
            counts = [args.eval_iters * args.train_batch_size] * 2
        _, valid, test = build_train_valid_test_datasets(args, (0, *counts))
    except (ValueError, OSError) as err:
        raise ConfigError(f"eval.py: cannot read the evaluation data: {err}") from err
    found = {name: (d, n) for name, d, n in zip(SPLITS, (valid, test), counts) if d is not None}
    if not found:
        raise ConfigError(
            "eval.py: no valid or test documents to score: set valid_data_paths / "
            f"test_data_paths, or give them a share of data_path (split {args.split!r}; e.g. "
            "split: 949,50,1)"
        )
    for name, (dataset, _) in found.items():
        print_rank_0(describe_dataset(name, dataset))
    return found


@torch.inference_mode()
def split_loss(
    model: torch.nn.Module, dataset: Any, samples: int, args: Any, eod: int
) -> dict[str, float]:
    """lm_loss, lm_loss_ppl, tokens and samples of the first `samples` of one split; every
    data-parallel rank scores every dp-th sample and the sums are reduced."""
    rank, world = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    micro = args.train_micro_batch_size_per_gpu
    mine = list(range(rank, samples, world))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[mine[i : i + micro] for i in range(0, len(mine), micro)],
        num_workers=args.num_workers,
    )
    context = LossContext(args, eod)
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    for batch in loader:
        inputs = ltor(batch["text"].to(device), _to(batch.get("label"), device), context)
        logits = model(inputs.tokens, inputs.position_ids, inputs.attention_mask)
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), inputs.labels.flatten(), reduction="none"
        )
        mask = inputs.loss_mask.flatten().float()
        sums += torch.stack([(losses * mask).sum(), mask.sum()]).double()
    if world > 1:
        dist.all_reduce(sums, group=mpu.get_data_parallel_group())
    total, tokens = sums.tolist()
    if tokens == 0:
        raise ConfigError("eval.py: the evaluation data hold no token whose loss counts")
    loss = total / tokens
    return {
        "lm_loss": loss,
        "lm_loss_ppl": math.exp(min(loss, 700.0)),
        "tokens": int(tokens),
        "samples": samples,
    }


def _to(value: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if value is None else value.to(device)


def perplexity_table(splits: dict[str, dict]) -> str:
    """One line per split: its loss, perplexity and how many tokens they average over."""
    return "\n".join(
        f"{split:>5} | lm_loss {f['lm_loss']:.6f} | lm_loss_ppl {f['lm_loss_ppl']:.4f} | "
        f"{f['tokens']:,} tokens in {f['samples']:,} samples"
        for split, f in splits.items()
    )


def evaluate_perplexity(model: torch.nn.Module, args: Any, eod: int) -> dict[str, dict]:
    """{split: its figures} for the valid and test data the config gives."""
    return {
        name: split_loss(model, dataset, samples, args, eod)
        for name, (dataset, samples) in split_datasets(args).items()
    }
