"""Batch sampling whose global sample order does not depend on the data-parallel size."""

from __future__ import annotations

from collections.abc import Iterator


class PretrainingBatchSampler:
    """Index batches for one data-parallel rank, starting at `consumed_samples`.

    Global sample g is dataset item g. Each step takes the next `micro_batch_size * dp_size`
    consecutive samples and rank r gets the r-th slice of `micro_batch_size`, so a run resumed
    with another dp_size (same consumed_samples) continues at the same global sample. A final
    partial step is dropped: every rank must see a full micro batch.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size), got {dp_rank} of {dp_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside the dataset's "
                f"{total_samples} samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.samples_per_step
            yield list(range(start, start + self.micro_batch_size))
