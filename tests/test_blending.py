"""Blending datasets by weight: the interleave, NeoX's document-count weights, datasets built from
the config, the printed mixture, and config errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _config_fixtures import small_config
from _data_fixtures import write_documents

from megatron.data.blendable_dataset import (
    BlendableDataset,
    blending_indices,
    weights_by_num_documents,
)
from megatron.data.data_utils import build_train_valid_test_datasets, describe_dataset
from megatron.neox_arguments import ConfigError, NeoXArgs

pytestmark = pytest.mark.timeout(120)

SEQ = 16


def test_large_blend_matches_the_weights_within_one_percent() -> None:
    weights = [0.5, 0.3, 0.15, 0.05]
    size = 200_000
    dataset_index, sample_index = blending_indices(weights, size)
    shares = np.bincount(dataset_index, minlength=4) / size
    np.testing.assert_allclose(shares, weights, rtol=0.01)
    # Each dataset's samples are taken in order 0, 1, 2, ...
    for i in range(4):
        mine = sample_index[dataset_index == i]
        np.testing.assert_array_equal(mine, np.arange(len(mine)))


@pytest.mark.parametrize("seed", range(5))
def test_every_prefix_tracks_the_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    weights = rng.random(n) + 0.01
    weights /= weights.sum()
    size = 3000
    dataset_index, _ = blending_indices(weights * 7, size)  # unnormalised weights are fine
    counts = np.cumsum(np.eye(n, dtype=np.int64)[dataset_index], axis=0)
    expected = np.arange(1, size + 1)[:, None] * weights
    assert np.abs(counts - expected).max() <= 1 + n / 2


def test_zero_weight_is_never_drawn_and_ties_go_to_the_first() -> None:
    dataset_index, _ = blending_indices([1, 0, 1], 10)
    assert dataset_index.tolist() == [0, 2] * 5


@pytest.mark.parametrize("weights", [[], [1, -1], [0, 0], [1, float("nan")]])
def test_bad_weights(weights) -> None:
    with pytest.raises(ValueError, match="weights must be"):
        blending_indices(weights, 10)


def test_weights_by_num_documents_is_neoxs_formula() -> None:
    counts, alpha = [100, 300, 600], 0.5
    p = np.array(counts) / 1000
    q = p**alpha / (p**alpha).sum()
    expected = q * (1 - p) / (q * (1 - p)).sum()
    np.testing.assert_allclose(weights_by_num_documents(counts, alpha), expected)
    # alpha < 1 flattens the distribution towards the small datasets.
    assert weights_by_num_documents(counts, 0.3)[0] > weights_by_num_documents(counts, 1.0)[0]
    np.testing.assert_allclose(weights_by_num_documents([7], 0.3), [1.0])


# --- from the config -----------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """Three datasets; tokens of dataset k are k * 100000 + document * 1000 + offset."""
    rng = np.random.default_rng(0)
    out = []
    for k, count in enumerate((40, 20, 10)):
        write_documents(tmp_path / f"d{k}", rng.integers(5, 60, count).tolist(), base=k * 100000)
        out.append(str(tmp_path / f"d{k}"))
    return out


def blend_args(paths: list[str], **kwargs) -> SimpleNamespace:
    values = dict(
        seq_length=SEQ,
        seed=9,
        data_impl="mmap",
        data_path=None,
        train_data_paths=paths,
        valid_data_paths=paths[:1],
        test_data_paths=paths[:1],
        train_data_weights=[3, 1, 1],
    )
    values.update(kwargs)
    return SimpleNamespace(**values)


def owner(item: dict) -> int:
    return int(item["text"][0]) // 100000


def test_blend_from_the_config_serves_the_weights(paths: list[str]) -> None:
    train, valid, _ = build_train_valid_test_datasets(blend_args(paths), (1000, 10, 0))
    assert isinstance(train, BlendableDataset) and len(train) == 1000
    owners = np.array([owner(train[i]) for i in range(len(train))])
    assert np.bincount(owners).tolist() == train.drawn.tolist()
    np.testing.assert_allclose(train.drawn / 1000, [0.6, 0.2, 0.2], atol=0.005)
    # Each member was built for what the blend draws from it, not more epochs than needed.
    for member, drawn in zip(train.datasets, train.drawn):
        assert drawn <= len(member) and member.num_samples == drawn
    assert not isinstance(valid, BlendableDataset)  # one path: the plain dataset


def test_mixture_is_described(paths: list[str]) -> None:
    train, _, _ = build_train_valid_test_datasets(blend_args(paths), (1000, 0, 0))
    table = describe_dataset("train", train)
    lines = table.splitlines()
    assert lines[0] == "train data mixture (1,000 samples):"
    for path, weight, member, drawn in zip(paths, (0.6, 0.2, 0.2), train.datasets, train.drawn):
        (row,) = [line for line in lines if path in line]
        epochs = drawn / member.samples_per_epoch
        assert f"{weight:.4f}" in row and f"{drawn:,}" in row and f"{epochs:.3f}" in row


def test_weight_by_num_documents_from_the_config(paths: list[str]) -> None:
    args = blend_args(paths, weight_by_num_documents=True, weighted_sampler_alpha=0.3)
    train, _, _ = build_train_valid_test_datasets(args, (2000, 0, 0))
    np.testing.assert_allclose(train.weights, weights_by_num_documents([40, 20, 10], 0.3))
    np.testing.assert_allclose(train.drawn / 2000, train.weights, atol=0.005)


def test_blend_is_the_same_for_any_build(paths: list[str]) -> None:
    a, _, _ = build_train_valid_test_datasets(blend_args(paths), (300, 0, 0))
    b, _, _ = build_train_valid_test_datasets(blend_args(paths), (300, 0, 0))
    for i in range(0, 300, 7):
        np.testing.assert_array_equal(a[i]["text"], b[i]["text"])


# --- config errors -------------------------------------------------------------------------------


def config_error(**overrides) -> str:
    values = small_config(
        None,
        train_data_paths=["a", "b"],
        valid_data_paths=["a"],
        test_data_paths=["a"],
        **overrides,
    )
    with pytest.raises(ConfigError) as info:
        NeoXArgs.from_dict(values, check_files=False)
    return str(info.value)


def test_weights_and_paths_of_different_lengths() -> None:
    message = config_error(train_data_weights=[1, 2, 3])
    assert "train_data_weights has 3 entries but train_data_paths has 2" in message


def test_negative_weights() -> None:
    assert "train_data_weights" in config_error(train_data_weights=[1, -2])
    assert "non-negative" in config_error(valid_data_weights=[0])


def test_label_paths_must_match_data_paths() -> None:
    message = config_error(train_label_data_paths=["a_label"])
    assert "train_label_data_paths" in message and "lists 1 datasets" in message


def test_train_epochs_with_a_blend() -> None:
    message = config_error(train_epochs=2, train_iters=None)
    assert "train_epochs" in message and "blend" in message


def test_label_data_paths_needs_data_path() -> None:
    message = config_error(label_data_paths=["x_label"])
    assert "label_data_paths" in message and "data_path" in message


def test_blending_keys_are_accepted() -> None:
    values = small_config(
        None,
        train_data_paths=["a", "b"],
        valid_data_paths=["a"],
        test_data_paths=["a"],
        train_data_weights=[2, 1],
        weight_by_num_documents=True,
        weighted_sampler_alpha=0.5,
        pack_impl="pack_until_overflow",
        allow_chopped=False,
        reset_position_ids=True,
        reset_attention_mask=True,
        train_label_data_paths=["a_l", "b_l"],
    )
    args = NeoXArgs.from_dict(values, check_files=False)
    assert args.pack_impl == "pack_until_overflow" and args.train_data_weights == [2, 1]
