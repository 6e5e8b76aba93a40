"""Sample indices (every pack_impl), dataset items and labels, splits, train_epochs, batch masks,
and the data-parallel-independent loader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _config_fixtures import small_config, write_config
from _data_fixtures import write_documents
from conftest import run_tool

from megatron.data.data_utils import (
    build_train_valid_test_datasets,
    get_train_valid_test_split,
    make_data_loader,
    train_iters_for_epochs,
)
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset
from megatron.data.masks import get_ltor_batch
from megatron.data.sample_index import (
    build_index,
    build_sample_idx,
    epoch_samples,
    num_epochs_needed,
    pack_starts,
)
from megatron.model import ModelConfig
from megatron.neox_arguments import NeoXArgs

pytestmark = pytest.mark.timeout(120)

SEQ = 16
IMPLS = ("packed", "pack_until_overflow", "unpacked")


@pytest.fixture
def sizes() -> list[int]:
    return np.random.default_rng(0).integers(1, 40, size=30).tolist()


@pytest.fixture
def data(tmp_path: Path, sizes: list[int]) -> MMapIndexedDataset:
    write_documents(tmp_path / "ds", sizes)
    return MMapIndexedDataset(tmp_path / "ds")


def dataset(data: MMapIndexedDataset, num_samples: int, **kwargs) -> GPT2Dataset:
    options = dict(seq_length=SEQ, seed=3)
    options.update(kwargs)
    seq_length, seed = options.pop("seq_length"), options.pop("seed")
    documents = np.arange(len(data))
    return GPT2Dataset("train", data, documents, num_samples, seq_length, seed, **options)


# --- packed ----------------------------------------------------------------------------------


def reference_sample_idx(sizes, doc_idx, seq_length: int) -> np.ndarray:
    """A token-by-token walk of the stream: the plain definition the vectorised code must match."""
    stream = [(pos, off) for pos, d in enumerate(doc_idx) for off in range(sizes[d])]
    return np.array(stream[::seq_length][: (len(stream) - 1) // seq_length + 1])


def test_sample_idx_matches_a_token_walk(sizes: list[int]) -> None:
    doc_idx = np.random.default_rng(1).permutation(len(sizes))
    for seq_length in (1, 7, SEQ, 100):
        got = build_sample_idx(np.array(sizes), doc_idx, seq_length)
        np.testing.assert_array_equal(got, reference_sample_idx(sizes, doc_idx, seq_length))


def test_samples_tile_the_shuffled_stream(data: MMapIndexedDataset, sizes: list[int]) -> None:
    ds = dataset(data, 100)
    stream = np.concatenate([data[int(d)] for d in ds.doc_idx])
    served = set()
    for i in range(len(ds)):
        text = ds[i]["text"]
        s = int(ds.shuffle_idx[i])
        assert text.dtype == np.int64 and text.shape == (SEQ + 1,)
        # Sample s is stream tokens [s*SEQ, (s+1)*SEQ]: its first token is sample s-1's last.
        np.testing.assert_array_equal(text, stream[s * SEQ : (s + 1) * SEQ + 1])
        served.add(s)
    assert served == set(range(len(ds)))
    assert len(ds) >= 100


def test_each_epoch_is_a_permutation_of_the_documents(sizes: list[int]) -> None:
    index = build_index(np.array(sizes), num_samples=200, seq_length=SEQ, seed=5)
    epochs = num_epochs_needed(sum(sizes), SEQ, 200)
    assert epochs > 1 and index.num_epochs == epochs
    assert len(index.doc_idx) == epochs * len(sizes)
    for epoch in index.doc_idx.reshape(epochs, len(sizes)):
        assert sorted(epoch.tolist()) == list(range(len(sizes)))
    assert not np.array_equal(index.doc_idx[: len(sizes)], index.doc_idx[len(sizes) :][:30])
    # One epoch fewer would not have been enough.
    assert ((epochs - 1) * sum(sizes) - 1) // SEQ < 200 <= (epochs * sum(sizes) - 1) // SEQ
    assert index.samples_per_epoch == (sum(sizes) - 1) // SEQ


@pytest.mark.parametrize("impl", IMPLS)
def test_last_epoch_is_shuffled_apart_only_when_little_of_it_is_used(
    sizes: list[int], impl: str
) -> None:
    per_epoch = epoch_samples(np.array(sizes), SEQ, 5, impl)
    # A sliver of a third epoch: the two complete epochs are served first.
    index = build_index(np.array(sizes), 2 * per_epoch + 2, SEQ, 5, impl)
    full = int(index.epoch_ends[-2])
    assert index.num_epochs == 3
    assert sorted(index.shuffle_idx[:full].tolist()) == list(range(full))
    assert sorted(index.shuffle_idx.tolist()) == list(range(len(index.sample_idx) - 1))
    # Most of the third epoch (>= 80%): everything is shuffled together.
    index = build_index(np.array(sizes), int(2.9 * per_epoch), SEQ, 5, impl)
    full = int(index.epoch_ends[-2])
    assert index.num_epochs == 3
    assert sorted(index.shuffle_idx[:full].tolist()) != list(range(full))


def test_empty_documents_are_skipped(tmp_path: Path) -> None:
    sizes = [0, 5, 0, 0, 9, 3, 0]
    write_documents(tmp_path / "ds", sizes)
    data = MMapIndexedDataset(tmp_path / "ds")
    ds = dataset(data, 3, seq_length=4, seed=0)
    stream = np.concatenate([data[int(d)] for d in ds.doc_idx])
    for i in range(len(ds)):
        s = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds[i]["text"], stream[s * 4 : s * 4 + 5])


@pytest.mark.parametrize("impl", IMPLS)
def test_index_is_deterministic_in_the_seed(sizes: list[int], impl: str) -> None:
    a = build_index(np.array(sizes), 50, SEQ, 7, impl)
    b = build_index(np.array(sizes), 50, SEQ, 7, impl)
    c = build_index(np.array(sizes), 50, SEQ, 8, impl)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)
    assert all(array.dtype == np.int64 for array in a)


def test_dataset_too_small(tmp_path: Path) -> None:
    write_documents(tmp_path / "tiny", [3, 4])
    data = MMapIndexedDataset(tmp_path / "tiny")
    with pytest.raises(DatasetError, match="too small") as info:
        dataset(data, 1)
    message = str(info.value)
    assert str(tmp_path / "tiny") in message
    assert "hold 7 tokens" in message and "seq_length + 1 = 17" in message


# --- whole documents ---------------------------------------------------------------------------


def reference_pack_starts(lengths, capacity: int) -> list[int]:
    """NeoX's pack_until_overflow loop: a document that would overflow starts a new sample."""
    starts, running = [0], 0
    for j, length in enumerate(lengths):
        if running and running + length > capacity:
            starts.append(j)
            running = 0
        running += length
    return starts


def test_pack_starts_match_the_loop() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        capacity = int(rng.integers(20, 60))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 300)))
        got = pack_starts(lengths, capacity)
        assert got.tolist() == reference_pack_starts(lengths.tolist(), capacity)


def documents_of(ds: GPT2Dataset, sample: int) -> list[int]:
    first, last = ds.sample_idx[sample, 0], ds.sample_idx[sample + 1, 0]
    return [int(d) for d in ds.doc_idx[first:last]]


def test_pack_until_overflow_packs_whole_documents(
    data: MMapIndexedDataset, sizes: list[int]
) -> None:
    ds = dataset(data, 60, pack_impl="pack_until_overflow")
    stream = ds.doc_idx.reshape(ds.num_epochs, len(sizes))
    for epoch in stream:  # every document once per epoch
        assert sorted(epoch.tolist()) == list(range(len(sizes)))
    for i in range(len(ds)):
        sample = int(ds.shuffle_idx[i])
        docs = documents_of(ds, sample)
        used = sum(min(sizes[d], SEQ + 1) for d in docs)
        assert 1 <= used <= SEQ + 1
        end = int(ds.sample_idx[sample + 1, 0])
        if end < len(ds.doc_idx):  # the next document would have overflowed
            assert used + min(sizes[int(ds.doc_idx[end])], SEQ + 1) > SEQ + 1
        text = ds[i]["text"]
        expected = np.concatenate([data[d][: SEQ + 1] for d in docs])
        np.testing.assert_array_equal(text[:used], expected)
        assert (text[used:] == -100).all() and len(text) == SEQ + 1


def test_unpacked_serves_one_document_per_sample(
    data: MMapIndexedDataset, sizes: list[int]
) -> None:
    ds = dataset(data, 45, pack_impl="unpacked")
    assert ds.num_epochs == 2 and len(ds) == 60
    assert sorted(ds.doc_idx[:30].tolist()) == list(range(30))
    served = []
    for i in range(len(ds)):
        (doc,) = documents_of(ds, int(ds.shuffle_idx[i]))
        served.append(doc)
        n = min(sizes[doc], SEQ + 1)
        text = ds[i]["text"]
        np.testing.assert_array_equal(text[:n], data[doc][:n])
        assert (text[n:] == -100).all()
    assert sorted(served) == sorted(list(range(30)) * 2)


@pytest.mark.parametrize("impl", ["pack_until_overflow", "unpacked"])
def test_allow_chopped(tmp_path: Path, impl: str) -> None:
    sizes = [5, 40, 7, 30, 3]  # 40 and 30 are longer than SEQ + 1
    write_documents(tmp_path / "ds", sizes)
    data = MMapIndexedDataset(tmp_path / "ds")
    chopped = dataset(data, 10, pack_impl=impl, allow_chopped=True)
    skipped = dataset(data, 10, pack_impl=impl, allow_chopped=False)
    assert set(chopped.doc_idx.tolist()) == set(range(5))
    assert set(skipped.doc_idx.tolist()) == {0, 2, 4}
    for i in range(len(chopped)):
        docs = documents_of(chopped, int(chopped.shuffle_idx[i]))
        if 1 in docs:  # a long document is cut to one sample and stands alone
            assert docs == [1]
            np.testing.assert_array_equal(chopped[i]["text"], data[1][: SEQ + 1])


def test_no_document_fits_without_chopping(tmp_path: Path) -> None:
    write_documents(tmp_path / "long", [30, 40])
    data = MMapIndexedDataset(tmp_path / "long")
    with pytest.raises(DatasetError, match="none of the 2 documents fits") as info:
        dataset(data, 5, pack_impl="unpacked", allow_chopped=False)
    assert str(tmp_path / "long") in str(info.value) and "17" in str(info.value)


# --- labels ----------------------------------------------------------------------------------


@pytest.fixture
def labelled(tmp_path: Path, sizes: list[int]) -> tuple[MMapIndexedDataset, MMapIndexedDataset]:
    write_documents(tmp_path / "sft", sizes, labels="prompt")
    return MMapIndexedDataset(tmp_path / "sft"), MMapIndexedDataset(tmp_path / "sft_label")


def test_labels_are_read_aligned_with_text(labelled) -> None:
    text, label = labelled
    ds = dataset(text, 50, label_dataset=label)
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"].shape == item["text"].shape == (SEQ + 1,)
        # Each label is its text token or -100 (tokens name their document and offset).
        token, lab = item["text"], item["label"]
        doc, offset = token // 1000, token % 1000
        masked = (offset < np.array([text.sizes[d] for d in doc]) // 2) | (doc % 4 == 0)
        np.testing.assert_array_equal(lab, np.where(masked, -100, token))


@pytest.mark.parametrize("impl", ["pack_until_overflow", "unpacked"])
def test_documents_without_labels_are_skipped_and_padding_is_masked(labelled, impl) -> None:
    text, label = labelled
    ds = dataset(text, 30, pack_impl=impl, label_dataset=label)
    assert not any(d % 4 == 0 for d in ds.doc_idx.tolist())  # their labels are all -100
    for i in range(len(ds)):
        item = ds[i]
        used = sum(min(int(text.sizes[d]), SEQ + 1) for d in documents_of(ds, ds.shuffle_idx[i]))
        assert (item["text"][used:] == 0).all() and (item["label"][used:] == -100).all()


def test_labels_of_another_shape_are_an_error(tmp_path: Path, sizes: list[int]) -> None:
    write_documents(tmp_path / "text", sizes)
    write_documents(tmp_path / "other", [s + 1 for s in sizes])
    text, other = MMapIndexedDataset(tmp_path / "text"), MMapIndexedDataset(tmp_path / "other")
    with pytest.raises(DatasetError, match="does not match") as info:
        dataset(text, 10, label_dataset=other)
    assert str(tmp_path / "other") in str(info.value) and str(tmp_path / "text") in str(info.value)


# --- batches: padding and reset masks ----------------------------------------------------------


def reference_reset(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's per-EOD loop: positions restart after each EOD, and tokens after it may not
    attend to it or anything before it."""
    b, s = tokens.shape
    mask = torch.ones(s, s).tril().expand(b, 1, s, s).clone()
    positions = torch.arange(s).expand(b, s).clone()
    for row in range(b):
        previous = 0
        for i in (tokens[row] == eod).nonzero().flatten().tolist():
            mask[row, 0, i + 1 :, : i + 1] = 0
            positions[row, i + 1 :] -= i + 1 - previous
            previous = i + 1
    return mask.bool(), positions


def test_reset_masks_match_megatrons_loop() -> None:
    text = torch.randint(0, 6, (3, 25), generator=torch.Generator().manual_seed(0))
    text[1, 24] = 0  # an EOD in the target column only
    ltor = get_ltor_batch(text, 0, reset_position_ids=True, reset_attention_mask=True)
    mask, positions = reference_reset(text[:, :-1], eod=0)
    assert (text[:, :-1] == 0).sum() > 3
    assert torch.equal(ltor.attention_mask, mask)
    assert torch.equal(ltor.position_ids, positions)
    plain = get_ltor_batch(text, 0)
    assert plain.attention_mask is None and plain.position_ids is None


def test_negative_text_is_padding() -> None:
    text = torch.tensor([[5, 6, 7, -100, -100]])
    ltor = get_ltor_batch(text, eod=0)
    assert ltor.tokens.tolist() == [[5, 6, 7, 0]]
    assert ltor.loss_mask.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_packed_documents_with_reset_masks_see_only_themselves() -> None:
    """With both reset flags the logits of a document packed after another equal its logits
    alone: the model honours the block-causal mask and the restarted positions."""
    from _model_fixtures import make_args

    from megatron.model import GPTModel

    torch.manual_seed(0)
    args = make_args(seq_length=12)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    eod = 1
    first, second = torch.tensor([5, 9, 3, eod]), torch.tensor([7, 8, 2, 4, 6, 11, 12, 13])
    text = torch.cat([first, second, torch.tensor([0])])[None]
    ltor = get_ltor_batch(text, eod, reset_position_ids=True, reset_attention_mask=True)
    with torch.no_grad():
        packed = model(ltor.tokens, ltor.position_ids, ltor.attention_mask)
        alone = model(second[None])
    torch.testing.assert_close(packed[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unmasked = model(ltor.tokens)
    assert not torch.allclose(unmasked[0, 4:], alone[0], atol=1e-3)


# --- splits, config and train_epochs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "num_docs", "expected"),
    [
        ("969,30,1", 1000, [0, 969, 999, 1000]),
        ("8/1/1", 13, [0, 11, 12, 13]),
        ("100", 7, [0, 7, 7, 7]),
        ("1,1", 5, [0, 3, 5, 5]),  # round(2.5) == 2 twice; train absorbs the difference
        ("0,1,0", 5, [0, 0, 5, 5]),
    ],
)
def test_split_ranges(split: str, num_docs: int, expected: list[int]) -> None:
    assert get_train_valid_test_split(split, num_docs) == expected


@pytest.mark.parametrize("split", ["a,b", "0,0,0", "-1,2"])
def test_bad_split(split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        get_train_valid_test_split(split, 10)


def args_for(**kwargs) -> SimpleNamespace:
    defaults = dict(seq_length=SEQ, seed=1234, data_impl="mmap", split="8,1,1", data_path=None)
    return SimpleNamespace(**{**defaults, **kwargs})


def test_datasets_from_data_path_stay_in_their_documents(tmp_path: Path) -> None:
    write_documents(tmp_path / "ds", [30] * 50)
    args = args_for(data_path=str(tmp_path / "ds"))
    train, valid, test = build_train_valid_test_datasets(args, (20, 5, 0))
    assert test is None
    bounds = get_train_valid_test_split("8,1,1", 50)
    for ds, (lo, hi) in ((train, bounds[0:2]), (valid, bounds[1:3])):
        assert len(ds) >= (20 if ds is train else 5)
        docs = np.concatenate([ds[i]["text"] for i in range(len(ds))]) // 1000
        assert docs.min() >= lo and docs.max() < hi


def test_datasets_from_separate_paths(tmp_path: Path) -> None:
    write_documents(tmp_path / "a", [40] * 5)
    write_documents(tmp_path / "b", [40] * 5)
    args = args_for(train_data_paths=[str(tmp_path / "a")], valid_data_paths=[str(tmp_path / "b")])
    train, valid, test = build_train_valid_test_datasets(args, (4, 2, 3))
    assert train is not None and valid is not None and test is None
    assert valid.indexed_dataset.path_prefix == str(tmp_path / "b")


def test_label_data_paths_with_data_path(tmp_path: Path) -> None:
    write_documents(tmp_path / "sft", [30] * 20, labels="prompt")
    args = args_for(
        data_path=str(tmp_path / "sft"),
        label_data_paths=[str(tmp_path / "sft_label")],
        pack_impl="unpacked",
    )
    train, _, _ = build_train_valid_test_datasets(args, (10, 0, 0))
    item = train[0]
    assert set(item) == {"text", "label"}
    assert (item["label"][:15] == -100).all() and (item["label"][15:30] >= 0).all()


def test_other_data_impl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_impl 'cached'"):
        build_train_valid_test_datasets(args_for(data_impl="cached"), (1, 0, 0))


def epoch_args(tmp_path: Path, **kwargs) -> SimpleNamespace:
    write_documents(tmp_path / "ep", [20, 35, 9, 50, 28, 14, 3, 41] * 5)
    values = dict(
        data_path=str(tmp_path / "ep"),
        split="100,0,0",
        train_epochs=3,
        train_batch_size=4,
        lr_decay_iters=None,
        lr_decay_fraction=None,
        extra_save_iters=None,
        checkpoint_factor=5,
        checkpoint_scale="linear",
        train_iters=None,
    )
    values.update(kwargs)
    return args_for(**values)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_epochs_gives_whole_steps_within_the_epochs(tmp_path: Path, impl: str) -> None:
    args = epoch_args(tmp_path, pack_impl=impl)
    iters, per_epoch, total = train_iters_for_epochs(args)
    tokens, docs = 5 * 200, 40
    expected = {"packed": (3 * tokens - 1) // SEQ, "unpacked": 3 * docs}.get(impl)
    if expected is not None:
        assert total == expected
    if impl == "pack_until_overflow":
        # At most SEQ + 1 tokens of whole documents (cut to SEQ + 1) per sample; several
        # documents share samples.
        capped = 5 * sum(min(n, SEQ + 1) for n in (20, 35, 9, 50, 28, 14, 3, 41))
        assert 3 * capped / (SEQ + 1) <= total < 3 * docs
    assert iters == total // 4
    # The config derives train_iters and what follows from it while it is built.
    config = NeoXArgs.from_dict(epoch_config(args))
    assert config.train_iters == iters and config.lr_decay_iters == iters
    assert config.save_iters == list(range(5, iters, 5))
    line = config.derived_table()
    assert f"train_iters={iters}" in line and f"({per_epoch} per epoch)" in line
    # The training index built for that many samples spans exactly the epochs asked for.
    train, _, _ = build_train_valid_test_datasets(args, (iters * 4, 0, 0))
    assert train.num_epochs == 3


def epoch_config(args: SimpleNamespace) -> dict:
    """The NeoX config of `epoch_args` (train_batch_size 4, one process)."""
    keys = ("data_path", "split", "train_epochs", "checkpoint_factor", "pack_impl")
    values = {key: getattr(args, key) for key in keys}
    return small_config(
        None, seq_length=SEQ, max_position_embeddings=SEQ, train_iters=None, **values
    )


def test_train_epochs_resolution_leaves_the_config_unchanged(tmp_path: Path) -> None:
    """train_epochs is resolved once, when the config is built: the launcher's JSON carries
    train_iters, and reading it back derives nothing more."""
    args = NeoXArgs.from_dict(epoch_config(epoch_args(tmp_path, pack_impl="packed")))
    assert args.train_iters == train_iters_for_epochs(args)[0]
    assert "train_epochs=3: " in args.notes[0]
    before = args.values()
    launched = NeoXArgs.from_json(args.to_json())
    assert launched.values() == before == args.values() and launched.notes == []
    with pytest.raises(ValueError, match="train_iters .* and train_epochs .* are both set"):
        NeoXArgs.from_dict({**epoch_config(args), "train_iters": 5})


def test_a_run_needs_train_iters_or_train_epochs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yml", small_config(None, train_iters=None))
    result = run_tool("train.py", config, check=False)
    assert result.returncode == 1
    assert "set train_iters or train_epochs" in result.stderr


def test_train_epochs_smaller_than_one_batch(tmp_path: Path) -> None:
    args = epoch_args(tmp_path, train_epochs=1, train_batch_size=1000)
    with pytest.raises(DatasetError, match="fewer than one batch of train_batch_size=1000"):
        train_iters_for_epochs(args)


# --- the loader ------------------------------------------------------------------------------


def loader_rows(ds, consumed: int, mb: int, rank: int, dp: int) -> list[torch.Tensor]:
    loader = make_data_loader(ds, consumed, mb, rank, dp, num_workers=0)
    return [batch["text"] for batch in loader]


@pytest.fixture
def packed(data: MMapIndexedDataset) -> GPT2Dataset:
    return dataset(data, 40, seed=11)


def test_loader_batches(packed: GPT2Dataset) -> None:
    batches = loader_rows(packed, 0, 4, 0, 1)
    assert len(batches) == len(packed) // 4
    assert batches[0].dtype == torch.int64
    assert batches[0].shape == (4, SEQ + 1)
    np.testing.assert_array_equal(batches[1][2].numpy(), packed[6]["text"])


def test_data_parallel_ranks_split_the_single_process_order(packed: GPT2Dataset) -> None:
    single = torch.cat(loader_rows(packed, 0, 2, 0, 1))
    rank0, rank1 = loader_rows(packed, 0, 2, 0, 2), loader_rows(packed, 0, 2, 1, 2)
    assert len(rank0) == len(rank1) == len(packed) // 4
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(rank0, rank1)])
    assert torch.equal(interleaved, single[: len(interleaved)])


def test_resume_continues_at_the_same_global_sample(packed: GPT2Dataset) -> None:
    single = torch.cat(loader_rows(packed, 0, 2, 0, 1))
    resumed = torch.cat(loader_rows(packed, 6, 2, 0, 1))
    assert torch.equal(resumed, single[6:][: len(resumed)])
    # Resumed with two data-parallel ranks instead of one.
    rank0, rank1 = loader_rows(packed, 6, 2, 0, 2), loader_rows(packed, 6, 2, 1, 2)
    interleaved = torch.cat([torch.cat([a, b]) for a, b in zip(rank0, rank1)])
    assert torch.equal(interleaved, single[6:][: len(interleaved)])


def test_loader_rejects_bad_positions(packed: GPT2Dataset) -> None:
    with pytest.raises(ValueError, match="consumed_samples"):
        make_data_loader(packed, len(packed) + 1, 2, 0, 1, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        make_data_loader(packed, 0, 2, 2, 2, 0)
    assert make_data_loader(None, 0, 2, 0, 1, 0) is None
