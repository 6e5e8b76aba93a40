"""Pairwise (DPO) and KTO datasets: one aligned document per sample, padding, filtering, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _config_fixtures import small_config, write_dataset

from megatron.data.data_utils import build_train_valid_test_datasets
from megatron.data.indexed_dataset import DatasetError, MMapIndexedDataset
from megatron.data.pairwise_dataset import (
    AlignedDocumentDataset,
    Source,
    build_kto_datasets,
    build_pairwise_datasets,
)
from megatron.neox_arguments import NeoXArgs

pytestmark = pytest.mark.timeout(120)

SEQ = 8


def pair_documents(n: int, lengths=None) -> tuple[list[list[int]], list[list[int]]]:
    """Document i starts with token 10 + i on both sides; chosen continues with 1s, rejected
    with 2s, and the sides differ in length."""
    lengths = lengths or [3 + i % 5 for i in range(n)]
    pos = [[10 + i] + [1] * length for i, length in enumerate(lengths)]
    neg = [[10 + i] + [2] * (length + 1) for i, length in enumerate(lengths)]
    return pos, neg


def labels_for(docs: list[list[int]], prompt: int = 1) -> list[list[int]]:
    """Labels with the first `prompt` tokens masked."""
    return [[-100] * prompt + doc[prompt:] for doc in docs]


def open_pairs(folder: Path, pos, neg, with_labels: bool = True) -> list[Source]:
    sources = []
    for key, docs in (("pos", pos), ("neg", neg)):
        tokens = MMapIndexedDataset(write_dataset(folder / key, docs))
        labels = None
        if with_labels:
            labels = MMapIndexedDataset(
                write_dataset(folder / f"{key}_label", labels_for(docs), dtype=np.int32)
            )
        sources.append(Source(key, tokens, f"{key}_label", labels))
    return sources


def test_items_are_aligned_padded_pairs(tmp_path):
    pos, neg = pair_documents(6)
    dataset = AlignedDocumentDataset("train", open_pairs(tmp_path, pos, neg), 6, SEQ, seed=1)
    assert len(dataset) == 6
    seen = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"pos", "neg", "pos_label", "neg_label"}
        assert all(v.dtype == np.int64 and v.shape == (SEQ + 1,) for v in item.values())
        doc = int(item["pos"][0]) - 10
        seen.append(doc)
        assert item["neg"][0] == item["pos"][0]  # the same document on both sides
        for key, docs in (("pos", pos), ("neg", neg)):
            expected = docs[doc][: SEQ + 1]
            n = len(expected)
            assert item[key][:n].tolist() == expected
            assert (item[key][n:] == 0).all()  # token padding
            assert item[f"{key}_label"][0] == -100  # the masked prompt
            assert item[f"{key}_label"][1:n].tolist() == expected[1:]
            assert (item[f"{key}_label"][n:] == -100).all()  # label padding
    # One epoch serves every document once, in a shuffled order.
    assert sorted(seen) == list(range(6)) and seen != list(range(6))


def test_epochs_and_determinism(tmp_path):
    pos, neg = pair_documents(5)
    sources = open_pairs(tmp_path, pos, neg)
    dataset = AlignedDocumentDataset("train", sources, 12, SEQ, seed=3)
    docs = [int(dataset[i]["pos"][0]) - 10 for i in range(len(dataset))]
    assert len(docs) >= 12
    assert np.bincount(docs, minlength=5).tolist() == [len(docs) // 5] * 5
    again = AlignedDocumentDataset("train", sources, 12, SEQ, seed=3)
    assert [int(again[i]["pos"][0]) - 10 for i in range(len(again))] == docs
    other = AlignedDocumentDataset("train", sources, 12, SEQ, seed=4)
    assert [int(other[i]["pos"][0]) - 10 for i in range(len(other))] != docs


def test_long_pairs_are_truncated_or_dropped(tmp_path):
    pos, neg = pair_documents(4, lengths=[3, 20, 4, 5])
    sources = open_pairs(tmp_path, pos, neg)
    chopped = AlignedDocumentDataset("train", sources, 4, SEQ, seed=1)
    long_item = next(chopped[i] for i in range(4) if chopped[i]["pos"][0] == 11)
    assert long_item["pos"].tolist() == pos[1][: SEQ + 1]
    assert long_item["neg_label"].tolist() == labels_for(neg)[1][: SEQ + 1]
    whole = AlignedDocumentDataset("train", sources, 6, SEQ, seed=1, allow_chopped=False)
    # Document 1's pair overflows: with allow_chopped false it is never served.
    assert 11 not in {int(whole[i]["pos"][0]) for i in range(len(whole))}
    # Document 3's rejected side (7 tokens) fits, its chosen side too: kept.
    assert 13 in {int(whole[i]["pos"][0]) for i in range(len(whole))}


def test_pairs_without_labels_in_their_first_sample_are_dropped(tmp_path):
    pos, neg = pair_documents(3, lengths=[3, 12, 3])
    sources = open_pairs(tmp_path, pos, neg)
    # Document 1's rejected labels start after the first SEQ targets.
    late = labels_for(neg)
    late[1] = [-100] * (SEQ + 1) + neg[1][SEQ + 1 :]
    sources[1].labels = MMapIndexedDataset(write_dataset(tmp_path / "late", late, dtype=np.int32))
    dataset = AlignedDocumentDataset("train", sources, 4, SEQ, seed=1)
    assert {int(dataset[i]["pos"][0]) for i in range(len(dataset))} == {10, 12}


def test_without_label_data_every_token_is_a_label(tmp_path):
    pos, neg = pair_documents(2)
    dataset = AlignedDocumentDataset("t", open_pairs(tmp_path, pos, neg, False), 2, SEQ, seed=1)
    item = dataset[0]
    n = len(pos[int(item["pos"][0]) - 10])
    assert item["pos_label"][:n].tolist() == item["pos"][:n].tolist()
    assert (item["pos_label"][n:] == -100).all()


def test_misaligned_datasets_are_errors_naming_both_files(tmp_path):
    pos, neg = pair_documents(5)
    sources = open_pairs(tmp_path, pos, neg[:4])
    with pytest.raises(DatasetError, match=r"neg has 4 documents but .*pos has 5"):
        AlignedDocumentDataset("train", sources, 5, SEQ, seed=1)
    sources = open_pairs(tmp_path / "b", pos, neg)
    short = labels_for(pos)
    short[2] = short[2][:-1]
    sources[0].labels = MMapIndexedDataset(write_dataset(tmp_path / "short", short, np.int32))
    with pytest.raises(DatasetError, match=r"label dataset .*short does not match .*sequence 2"):
        AlignedDocumentDataset("train", sources, 5, SEQ, seed=1)


def test_no_usable_document_is_an_error(tmp_path):
    pos, neg = pair_documents(2)
    sources = open_pairs(tmp_path, pos, neg)
    sources[0].labels = MMapIndexedDataset(
        write_dataset(tmp_path / "none", [[-100] * len(d) for d in pos], np.int32)
    )
    with pytest.raises(DatasetError, match="none of the 2 documents .* is usable"):
        AlignedDocumentDataset("train", sources, 2, SEQ, seed=1)


def pairwise_config(folder: Path, splits=("train", "valid"), **overrides) -> NeoXArgs:
    pos, neg = pair_documents(6)
    values = {}
    for split in splits:
        for side, docs in (("pos", pos), ("neg", neg)):
            prefix = folder / f"{split}_{side}"
            values[f"{side}_{split}_data_paths"] = [write_dataset(prefix, docs)]
            label = write_dataset(folder / f"{split}_{side}_label", labels_for(docs), np.int32)
            values[f"{side}_{split}_label_data_paths"] = [label]
    config = small_config(
        dataset_impl="pairwise", train_impl="dpo", seq_length=SEQ, **values, **overrides
    )
    return NeoXArgs.from_dict(config)


def test_build_from_config_gives_none_for_splits_without_paths(tmp_path):
    args = pairwise_config(tmp_path)
    train, valid, test = build_train_valid_test_datasets(args, (10, 4, 4))
    assert len(train) >= 10 and len(valid) >= 4 and test is None
    assert set(train[0]) == {"pos", "neg", "pos_label", "neg_label"}
    assert build_pairwise_datasets(args, (10, 0, 4))[1] is None  # no samples requested
    with pytest.raises(ValueError, match="num_samples must be"):
        build_pairwise_datasets(args, (10, 4))


def test_several_paths_per_split_are_an_error(tmp_path):
    args = pairwise_config(tmp_path)
    args.pos_train_data_paths = args.pos_train_data_paths * 2
    with pytest.raises(ValueError, match="pos_train_data_paths lists 2 datasets"):
        build_pairwise_datasets(args, (4, 0, 0))


# -- KTO -----------------------------------------------------------------------------------------


def kto_args(folder: Path, rewards: list[list[float]], docs=None) -> NeoXArgs:
    docs = docs or [[10 + i, 3, 4, 5] for i in range(len(rewards))]
    text = write_dataset(folder / "text", docs)
    reward = write_dataset(folder / "reward", rewards, dtype=np.int32)
    values = {f"{s}_data_paths": [text] for s in ("train", "valid", "test")}
    values.update({f"{s}_reward_data_paths": [reward] for s in ("train", "valid", "test")})
    return NeoXArgs.from_dict(small_config(train_impl="kto", seq_length=SEQ, **values))


def test_kto_items_carry_the_document_reward(tmp_path):
    # Per-document values, a per-token list (NeoX's layout: summed), and a reward-0 document.
    rewards = [[1], [-1], [0], [1, 1, -1, 0], [-2, 0, 0, 0]]
    args = kto_args(tmp_path, rewards)
    train, _, _ = build_train_valid_test_datasets(args, (8, 4, 4))
    expected = {10: 1.0, 11: -1.0, 13: 1.0, 14: -2.0}  # document 12 (reward 0) is dropped
    served = set()
    for i in range(len(train)):
        item = train[i]
        assert set(item) == {"text", "label", "reward"}
        doc = int(item["text"][0])
        served.add(doc)
        assert float(item["reward"]) == expected[doc]
        assert item["label"][:4].tolist() == item["text"][:4].tolist()
        assert (item["label"][4:] == -100).all()
    assert served == set(expected)


def test_kto_reward_of_the_wrong_length_is_an_error(tmp_path):
    args = kto_args(tmp_path, [[1], [1, -1]])
    with pytest.raises(
        DatasetError, match=r"reward document 1 of .*reward holds 2 values; expected 1"
    ):
        build_kto_datasets(args, (4, 0, 0))
