"""`train_micro_batch_size_per_gpu: auto`: the largest divisor of the per-rank batch that fits,
by a (simulated) device probe or by the memory estimate; the global batch never changes."""

from __future__ import annotations

import pytest
import torch
from _config_fixtures import small_config

from megatron.config import ConfigError, NeoXArgs
from megatron.engine.auto_batch import pick_micro_batch
from megatron.neox_arguments.memory import estimate_memory
from megatron.neox_arguments.micro_batch import apply_micro_batch, candidates

pytestmark = pytest.mark.timeout(120)


def auto_config(**overrides) -> NeoXArgs:
    values = dict(train_batch_size=64, train_micro_batch_size_per_gpu="auto", device_memory="1TB")
    return NeoXArgs.from_dict(small_config(**{**values, **overrides}))


@pytest.mark.parametrize(
    "per_rank,expected",
    [(32, [32, 16, 8, 4, 2, 1]), (24, [24, 12, 6, 3, 1]), (20, [20, 10, 5, 2, 1]), (7, [7, 1])],
)
def test_candidates_halve_through_divisors(per_rank, expected):
    assert list(candidates(per_rank)) == expected


def test_probe_halves_on_out_of_memory_and_keeps_the_global_batch():
    args = auto_config(num_gpus=2)  # 32 samples per rank
    tried = []

    def peak(micro: int) -> int:
        tried.append(micro)
        if micro > 6:
            raise torch.cuda.OutOfMemoryError("simulated")
        return 0

    micro = pick_micro_batch(args, total_memory=10**12, peak=peak)
    assert (micro, tried) == (4, [32, 16, 8, 4])
    apply_micro_batch(args, micro)
    assert (args.train_batch_size, args.gradient_accumulation_steps) == (64, 8)
    assert args.deepspeed_config["train_micro_batch_size_per_gpu"] == 4


def test_probe_counts_the_optimizer_state_still_to_come():
    args = auto_config()
    budget, per_sample = 2_000_000, 30_000
    optimizer_state = estimate_memory(args).optimizer  # about 1 MB
    # 64 samples would fit without the optimizer state.
    total = int(budget / args.auto_batch_memory_fraction)
    micro = pick_micro_batch(args, total_memory=total, peak=lambda m: m * per_sample)
    assert micro == 32
    assert 32 * per_sample + optimizer_state <= budget < 64 * per_sample + optimizer_state


def test_estimate_picks_the_largest_size_within_the_device_memory():
    sixteen = estimate_memory(auto_config(), 16).total
    args = auto_config(device_memory=str(int(sixteen / 0.9) + 1))
    assert args.train_micro_batch_size_per_gpu == 16
    assert (args.train_batch_size, args.gradient_accumulation_steps) == (64, 4)
    assert any("auto -> 16" in note for note in args.notes)
    # The launched processes read the chosen numbers.
    again = NeoXArgs.from_json(args.to_json())
    assert (again.train_micro_batch_size_per_gpu, again.auto_micro_batch) == (16, True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"device_memory": "1KB"}, "not even a micro-batch of 1 fits"),
        ({"train_batch_size": None}, "auto.*needs train_batch_size"),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps unset"),
        ({"auto_batch_memory_fraction": 1.5}, "auto_batch_memory_fraction must be in"),
    ],
)
def test_bad_auto_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        auto_config(**overrides)


def test_cluster_profiles_leave_an_automatic_micro_batch_alone():
    from tools.slurm.profiles import batch_overrides, load_profile

    profile = load_profile("a100-40gb")  # halves a fixed micro-batch
    assert batch_overrides(profile, {"train_micro_batch_size_per_gpu": 8}) == [
        "train_micro_batch_size_per_gpu=4",
        "gradient_accumulation_steps=2",
    ]
    values = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 64}
    assert batch_overrides(profile, values) == []
