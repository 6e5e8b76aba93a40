"""Sample indices for language-model datasets, built from document sizes with vectorised NumPy.

A dataset's documents are laid out in a stream, one fresh permutation per epoch, and cut into
samples of at most `seq_length + 1` tokens. Four int64 arrays describe the result:

* doc_idx     [epochs * documents]   the stream: positions in the `sizes` array given
* sample_idx  [num_built + 1, 2]     (position in doc_idx, token offset) where each sample starts;
                                     the next row is where it ends
* shuffle_idx [num_built]            the order in which samples are served
* epoch_ends  [epochs]               samples completed by the end of each epoch of the stream

How documents become samples is the packing implementation (`pack_impl`, NeoX's key):

* ``packed``: the stream is cut every `seq_length` tokens; sample i is tokens
  [i * seq_length, (i + 1) * seq_length] (inclusive), so consecutive samples share one token and
  every token is a target exactly once. sample_idx row i + 1 is sample i's last token.
* ``pack_until_overflow``: whole documents are added to a sample until the next one would push
  it past `seq_length + 1` tokens; that document starts the next sample. The rest is padding.
* ``unpacked``: one document per sample, padded.

In the two document-wise modes sample i is the documents doc_idx[sample_idx[i, 0] :
sample_idx[i + 1, 0]] (offsets are 0), empty documents are skipped, and a document longer than
`seq_length + 1` tokens is cut to that length when `allow_chopped` is true, or skipped when false.
In ``packed`` mode documents always continue across samples, so `allow_chopped` has no effect.

Serving order follows Megatron/NeoX's rule for the last epoch: when more than one epoch is needed
and the last one contributes fewer than 80% of an epoch's samples, the samples of the complete
epochs are shuffled among themselves and served first, then the last epoch's; otherwise all
samples are shuffled together. Unlike NeoX (which shuffles all epochs' documents together) every
epoch is its own permutation, so each document appears exactly once per epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Fraction of an epoch below which the last epoch is shuffled separately (Megatron/NeoX's 0.8).
SEPARATE_LAST_EPOCH_BELOW = 0.8
PACK_IMPLS = ("packed", "pack_until_overflow", "unpacked")
# Implementations that keep documents whole (samples are lists of documents, padded).
DOCUMENTWISE = frozenset({"pack_until_overflow", "unpacked"})


class IndexArrays(NamedTuple):
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    epoch_ends: np.ndarray

    @property
    def num_epochs(self) -> int:
        return len(self.epoch_ends)

    @property
    def samples_per_epoch(self) -> int:
        """Samples completed by the end of the first epoch."""
        return int(self.epoch_ends[0])


def index_generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for document order and sample order, so that drawing more epochs of
    documents never changes how the samples are shuffled."""
    docs, samples = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(docs), np.random.default_rng(samples)


class DocumentOrder:
    """Epoch e of the stream is the e-th permutation drawn, however many epochs are asked for."""

    def __init__(self, documents: np.ndarray, rng: np.random.Generator) -> None:
        self.documents = np.asarray(documents, dtype=np.int64)
        self.rng = rng
        self._epochs: list[np.ndarray] = []

    def stream(self, num_epochs: int) -> np.ndarray:
        while len(self._epochs) < num_epochs:
            self._epochs.append(self.documents[self.rng.permutation(len(self.documents))])
        if not num_epochs or not len(self.documents):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._epochs[:num_epochs])


def build_shuffle_idx(
    num_built: int, epoch_ends: np.ndarray, num_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Serving order of `num_built` samples, `num_samples` of which are needed (see module doc)."""
    head = 0
    if len(epoch_ends) > 1:
        full = int(epoch_ends[-2])
        per_epoch = full / (len(epoch_ends) - 1)
        if num_samples - full < SEPARATE_LAST_EPOCH_BELOW * per_epoch:
            head = full
    order = np.empty(num_built, dtype=np.int64)
    order[:head] = rng.permutation(head)
    order[head:] = head + rng.permutation(num_built - head)
    return order


# --- packed -----------------------------------------------------------------------------------


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give `num_samples` packed samples (samples share one token)."""
    # Samples available after E epochs: (E * tokens_per_epoch - 1) // seq_length.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Start (doc_idx position, offset) of every packed sample of the stream `sizes[doc_idx]`,
    plus the end.

    Boundary i is stream token i * seq_length, found by binary search in the cumulative document
    ends; side="right" skips empty documents (a token belongs to the first document ending past
    it).
    """
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        raise ValueError("cannot cut samples from documents holding no tokens")
    num_built = (total - 1) // seq_length
    boundaries = np.arange(num_built + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, boundaries, side="right")
    offset = boundaries - (ends[position] - lengths[position])
    return np.stack([position, offset], axis=1).astype(np.int64)


def build_packed(sizes: np.ndarray, num_samples: int, seq_length: int, seed: int) -> IndexArrays:
    """`packed` indices: documents continue across samples (so `allow_chopped` plays no part)."""
    tokens_per_epoch = int(sizes.sum())
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    doc_rng, sample_rng = index_generators(seed)
    doc_idx = DocumentOrder(np.arange(len(sizes)), doc_rng).stream(num_epochs)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length)
    epochs = np.arange(1, num_epochs + 1, dtype=np.int64)
    epoch_ends = (epochs * tokens_per_epoch - 1) // seq_length
    shuffle_idx = build_shuffle_idx(len(sample_idx) - 1, epoch_ends, num_samples, sample_rng)
    return IndexArrays(doc_idx, sample_idx, shuffle_idx, epoch_ends)


# --- whole documents --------------------------------------------------------------------------


def eligible_documents(sizes: np.ndarray, seq_length: int, allow_chopped: bool) -> np.ndarray:
    """Positions of the documents that can form samples when documents are not split."""
    sizes = np.asarray(sizes, dtype=np.int64)
    keep = sizes > 0
    if not allow_chopped:
        keep &= sizes <= seq_length + 1
    return np.flatnonzero(keep)


def _check_eligible(sizes: np.ndarray, eligible: np.ndarray, seq_length: int) -> None:
    if len(eligible):
        return
    if not np.any(sizes > 0):
        raise ValueError(f"all {len(sizes)} documents are empty")
    raise ValueError(
        f"none of the {len(sizes)} documents fits one sample of seq_length + 1 = "
        f"{seq_length + 1} tokens (the shortest holds {int(sizes[sizes > 0].min())} tokens) "
        "and allow_chopped is false"
    )


def validate(sizes: np.ndarray, seq_length: int, pack_impl: str, allow_chopped: bool) -> None:
    """Raise ValueError when documents of `sizes` cannot give a single sample (cheap: every
    process checks before one of them builds the index)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if seq_length < 1:
        raise ValueError(f"seq_length must be at least 1, got {seq_length}")
    if pack_impl not in PACK_IMPLS:
        raise ValueError(f"unknown pack_impl {pack_impl!r}; known: {sorted(PACK_IMPLS)}")
    if pack_impl in DOCUMENTWISE:
        eligible = eligible_documents(sizes, seq_length, allow_chopped)
        _check_eligible(sizes, eligible, seq_length)
        return
    tokens = int(sizes.sum())
    if tokens < seq_length + 1:
        raise ValueError(
            f"{len(sizes)} documents hold {tokens} tokens, fewer than one sample of "
            f"seq_length + 1 = {seq_length + 1}"
        )


def pack_starts(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Where each sample starts when whole documents of `lengths` (each 1..capacity) are packed
    greedily: a document that would overflow the current sample starts the next one.

    The start after position j is found for every j at once by binary search; the starts
    reachable from 0 are then collected by pointer doubling (O(n log samples), no Python loop).
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cumulative = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cumulative[1:])
    # Sample starting at j holds documents j..k-1 with cumulative[k] - cumulative[j] <= capacity.
    jump = np.searchsorted(cumulative, cumulative[:-1] + capacity, side="right") - 1
    jump = np.append(jump, n)  # position n is the end: it maps to itself
    starts = np.zeros(1, dtype=np.int64)
    while starts[-1] != n:
        # starts holds f^0..f^(2^i - 1) of 0 and jump is f^(2^i): append the next 2^i.
        starts = np.concatenate([starts, jump[starts]])
        jump = jump[jump]
    return starts[: np.searchsorted(starts, n)]


def _epoch_ends(sample_bounds: np.ndarray, epoch_size: int, num_epochs: int) -> np.ndarray:
    """Samples ending within each epoch of a stream of `epoch_size` documents per epoch."""
    ends = np.arange(1, num_epochs + 1, dtype=np.int64) * epoch_size
    return np.searchsorted(sample_bounds[1:], ends, side="right").astype(np.int64)


class WholeDocuments:
    """The stream of whole documents that `pack_until_overflow` and `unpacked` cut into samples.

    `eligible` (positions in sizes) restricts the documents further, e.g. to those with labels.
    """

    def __init__(
        self,
        sizes: np.ndarray,
        seq_length: int,
        allow_chopped: bool,
        one_per_sample: bool,
        eligible: np.ndarray | None,
        rng: np.random.Generator,
    ) -> None:
        self.capacity = seq_length + 1
        usable = eligible_documents(sizes, seq_length, allow_chopped)
        _check_eligible(sizes, usable, seq_length)
        if eligible is not None:
            usable = np.intersect1d(usable, eligible)
            if not len(usable):
                raise ValueError(
                    f"none of the {len(sizes)} documents is eligible (every one with tokens was "
                    "excluded, e.g. for having no label >= 0 within seq_length + 1 tokens)"
                )
        self.num_documents = len(usable)
        self.lengths = np.minimum(sizes, self.capacity)
        self.order = DocumentOrder(usable, rng)
        self.one_per_sample = one_per_sample

    def samples(self, num_epochs: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc_idx, sample bounds in doc_idx) of the first `num_epochs` epochs."""
        doc_idx = self.order.stream(num_epochs)
        if self.one_per_sample:
            return doc_idx, np.arange(len(doc_idx) + 1, dtype=np.int64)
        starts = pack_starts(self.lengths[doc_idx], self.capacity)
        return doc_idx, np.append(starts, len(doc_idx))

    def enough_for(self, num_samples: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The fewest epochs giving `num_samples` samples: (epochs, doc_idx, bounds)."""
        doc_idx, bounds = self.samples(1)
        num_epochs = max(1, -(-num_samples // (len(bounds) - 1)))
        if num_epochs > 1:
            doc_idx, bounds = self.samples(num_epochs)
        while len(bounds) - 1 < num_samples:  # samples may straddle epochs: estimate was short
            num_epochs += 1
            doc_idx, bounds = self.samples(num_epochs)
        return num_epochs, doc_idx, bounds


def build_documentwise(
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    allow_chopped: bool,
    pack_impl: str,
    eligible: np.ndarray | None = None,
) -> IndexArrays:
    """`pack_until_overflow` and `unpacked` indices over whole documents."""
    doc_rng, sample_rng = index_generators(seed)
    one_per_sample = pack_impl == "unpacked"
    documents = WholeDocuments(sizes, seq_length, allow_chopped, one_per_sample, eligible, doc_rng)
    num_epochs, doc_idx, bounds = documents.enough_for(num_samples)
    sample_idx = np.zeros((len(bounds), 2), dtype=np.int64)
    sample_idx[:, 0] = bounds
    epoch_ends = _epoch_ends(bounds, documents.num_documents, num_epochs)
    shuffle_idx = build_shuffle_idx(len(bounds) - 1, epoch_ends, num_samples, sample_rng)
    return IndexArrays(doc_idx, sample_idx, shuffle_idx, epoch_ends)


# --- entry points ---------------------------------------------------------------------------


def build_index(
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    pack_impl: str = "packed",
    allow_chopped: bool = True,
    eligible: np.ndarray | None = None,
) -> IndexArrays:
    """The index arrays for at least `num_samples` samples of documents with these `sizes`.

    `eligible` (whole-document impls only) restricts the documents used. Raises ValueError when
    the documents cannot give one sample.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    validate(sizes, seq_length, pack_impl, allow_chopped)
    if pack_impl in DOCUMENTWISE:
        return build_documentwise(
            sizes, num_samples, seq_length, seed, allow_chopped, pack_impl, eligible
        )
    return build_packed(sizes, num_samples, seq_length, seed)


def epoch_samples(
    sizes: np.ndarray,
    seq_length: int,
    seed: int,
    pack_impl: str = "packed",
    allow_chopped: bool = True,
    eligible: np.ndarray | None = None,
    num_epochs: int = 1,
) -> int:
    """Samples the first `num_epochs` passes over the documents give, as `build_index` with the
    same arguments cuts them."""
    sizes = np.asarray(sizes, dtype=np.int64)
    validate(sizes, seq_length, pack_impl, allow_chopped)
    if pack_impl not in DOCUMENTWISE:
        return (num_epochs * int(sizes.sum()) - 1) // seq_length
    doc_rng, _ = index_generators(seed)
    one_per_sample = pack_impl == "unpacked"
    documents = WholeDocuments(sizes, seq_length, allow_chopped, one_per_sample, eligible, doc_rng)
    return len(documents.samples(num_epochs)[1]) - 1
