"""train_impl objectives (megatron/losses.py): normal with labels, DPO and KTO against hand-computed
values, and tiny DPO / KTO runs through the launcher."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _config_fixtures import small_config, write_config, write_dataset
from _model_fixtures import make_args
from conftest import run_tool

from megatron.losses import (
    TRAIN_IMPLS,
    LossContext,
    build_reference_model,
    dpo_objective,
    get_train_impl,
    kto_objective,
    load_reference_model,
    register_train_impl,
    save_reference_model,
)
from megatron.model import GPTModel, ModelConfig
from megatron.neox_arguments import ConfigError, NeoXArgs

pytestmark = pytest.mark.timeout(600)

LOSS_FLAGS = dict(eod_mask_loss=False, reset_position_ids=False, reset_attention_mask=False)


def loss_args(**overrides) -> SimpleNamespace:
    values = dict(LOSS_FLAGS, dpo_beta=0.1, dpo_reference_free=False, kto_beta=0.1)
    values.update(kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    return SimpleNamespace(**{**values, **overrides})


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(ModelConfig.from_neox(make_args(padded_vocab_size=64))).eval()


def manual_sequence_logps(model, text: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the labelled targets, written out with torch's log_softmax."""
    logp = F.log_softmax(model(text[:, :-1]).float(), dim=-1)
    targets = label[:, 1:]
    mask = targets >= 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


# -- registry and normal -------------------------------------------------------------------------


def test_registry_lists_the_objectives_and_rejects_unknown_or_duplicate_names():
    assert {"normal", "dpo", "kto"} <= set(TRAIN_IMPLS)
    assert get_train_impl("dpo").needs_reference(loss_args())
    assert not get_train_impl("dpo").needs_reference(loss_args(dpo_reference_free=True))
    assert get_train_impl("kto").needs_reference(loss_args())
    assert not get_train_impl("normal").needs_reference(loss_args())
    with pytest.raises(ValueError, match="unknown train_impl 'nope'"):
        get_train_impl("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_train_impl("normal")(lambda model, batch, ctx: None)


def test_normal_loss_counts_only_labelled_tokens():
    model = tiny_model()
    text = torch.randint(1, 64, (2, 17))
    label = torch.full_like(text, -100)
    label[0, 5:9] = text[0, 5:9]  # an "assistant reply" in each sample
    label[1, 10:] = text[1, 10:]
    loss, metrics = get_train_impl("normal").loss(
        model, {"text": text, "label": label}, LossContext(loss_args(), eod=0)
    )
    logits = model(text[:, :-1]).float()
    targets = label[:, 1:]
    mask = targets >= 0
    manual = F.cross_entropy(logits[mask], targets[mask])
    assert metrics == {}
    torch.testing.assert_close(loss, manual)
    # Without labels every target counts, so the loss differs.
    unmasked, _ = get_train_impl("normal").loss(model, {"text": text}, LossContext(loss_args(), 0))
    torch.testing.assert_close(
        unmasked, F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten())
    )
    assert not torch.isclose(unmasked, loss)


# -- dpo -----------------------------------------------------------------------------------------


def test_dpo_objective_matches_a_hand_computed_value():
    policy_chosen = torch.tensor([-10.0, -4.0])
    policy_rejected = torch.tensor([-12.0, -3.0])
    reference_chosen = torch.tensor([-11.0, -4.5])
    reference_rejected = torch.tensor([-11.0, -2.0])
    loss, metrics = dpo_objective(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5
    )
    # Pair 1: chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5, margin 1.
    # Pair 2: chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -1 = -0.5, margin 0.75.
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.75))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["chosen_rewards"].item() == pytest.approx(0.375)
    assert metrics["rejected_rewards"].item() == pytest.approx(-0.5)
    assert metrics["margins"].item() == pytest.approx(0.875)
    assert metrics["reward_acc"].item() == 1.0


def test_dpo_at_the_reference_is_log_2_and_its_gradient_prefers_chosen():
    policy = torch.tensor([-5.0, -7.0], requires_grad=True)
    loss, metrics = dpo_objective(
        policy[:1], policy[1:], policy[:1].detach(), policy[1:].detach(), 0.1
    )
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["reward_acc"].item() == 0.0  # ties are not wins
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises chosen, lowers rejected


def dpo_batch(b: int = 2, s: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    pos, neg = (torch.randint(1, 64, (b, s + 1), generator=generator) for _ in range(2))
    pos_label, neg_label = pos.clone(), neg.clone()
    pos_label[:, :6] = -100  # the prompt
    neg_label[:, :6] = -100
    pos_label[0, 12:] = -100  # padding
    return {"pos": pos, "neg": neg, "pos_label": pos_label, "neg_label": neg_label}


def test_dpo_loss_uses_label_masked_sequence_logps_of_policy_and_reference():
    policy, reference = tiny_model(0), tiny_model(1)
    batch = dpo_batch()
    loss, metrics = get_train_impl("dpo").loss(
        policy, batch, LossContext(loss_args(dpo_beta=0.2), 0, reference)
    )
    pc = manual_sequence_logps(policy, batch["pos"], batch["pos_label"])
    pr = manual_sequence_logps(policy, batch["neg"], batch["neg_label"])
    rc = manual_sequence_logps(reference, batch["pos"], batch["pos_label"])
    rr = manual_sequence_logps(reference, batch["neg"], batch["neg_label"])
    expected = -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ref_chosen_logp"], rc.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["policy_rejected_logp"], pr.mean(), rtol=1e-5, atol=1e-5)


def test_reference_free_dpo_compares_policy_logps_only():
    policy = tiny_model(0)
    batch = dpo_batch()
    loss, metrics = get_train_impl("dpo").loss(
        policy, batch, LossContext(loss_args(dpo_reference_free=True), 0, reference=None)
    )
    pc = manual_sequence_logps(policy, batch["pos"], batch["pos_label"])
    pr = manual_sequence_logps(policy, batch["neg"], batch["neg_label"])
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * (pc - pr)).mean(), rtol=1e-5, atol=1e-6)
    assert "ref_chosen_logp" not in metrics
    torch.testing.assert_close(metrics["chosen_rewards"], 0.1 * pc.mean(), rtol=1e-5, atol=1e-5)


def test_reference_model_is_a_frozen_copy():
    policy = tiny_model(0)
    reference = build_reference_model(policy)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(reference.parameters()))


def test_reference_model_round_trips_beside_the_checkpoints(tmp_path):
    reference = build_reference_model(tiny_model(0))
    assert not load_reference_model(reference, tmp_path)  # nothing saved yet
    save_reference_model(reference, tmp_path / "ckpt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["reference_model.safetensors"]
    other = build_reference_model(tiny_model(1))
    assert load_reference_model(other, tmp_path / "ckpt")
    for a, b in zip(reference.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    wrong = GPTModel(ModelConfig.from_neox(make_args(padded_vocab_size=64, hidden_size=32)))
    with pytest.raises(ValueError, match="reference_model.safetensors does not fit"):
        load_reference_model(wrong, tmp_path / "ckpt")


# -- kto -----------------------------------------------------------------------------------------


def test_kto_objective_matches_a_hand_computed_value():
    policy = torch.tensor([-4.0, -6.0, -3.0, -9.0])
    reference = torch.tensor([-5.0, -5.0, -5.0, -5.0])  # log-ratios 1, -1, 2, -4
    reward = torch.tensor([1.0, -1.0, -1.0, 0.0])  # the last sample is ignored
    loss, metrics = kto_objective(policy, reference, reward, 0.5, 2.0, 3.0)
    # Each half's reference point is the other half's mean log-ratio, clipped at 0:
    # first half (1, -1) -> z = max(0, (2 - 4) / 2) = 0; second half (2, -4) -> z = max(0, 0) = 0.
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (2.0 * (1 - sig(0.5 * 1)) + 3.0 * (1 - sig(0.5 * 1)) + 3.0 * (1 - sig(-0.5 * 2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["kl"].item() == 0.0
    assert metrics["desirable_rewards"].item() == pytest.approx(0.5)
    assert metrics["undesirable_rewards"].item() == pytest.approx((-0.5 + 1.0) / 2)
    assert metrics["reward_acc"].item() == pytest.approx(2 / 3)


def test_kto_reference_point_comes_from_the_other_half():
    policy = torch.tensor([-1.0, -1.0, -2.0, -2.0], requires_grad=True)
    reference = torch.tensor([-3.0, -3.0, -3.0, -3.0])  # log-ratios 2, 2, 1, 1
    reward = torch.ones(4)
    loss, metrics = kto_objective(policy, reference, reward, 1.0, 1.0, 1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # first half uses z = 1 (second half's mean), second half z = 2.
    expected = (2 * (1 - sig(2 - 1)) + 2 * (1 - sig(1 - 2))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(1.5)
    loss.backward()  # z is not differentiated: each gradient involves its own log-ratio only
    assert torch.all(policy.grad < 0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kto_objective(policy[:1], reference[:1], reward[:1], 1.0, 1.0, 1.0)


# -- runs through the launcher -------------------------------------------------------------------

PROMPTS = 24
SEQ = 32
ITERS = 8


def preference_data(folder: Path) -> dict[str, str]:
    """Byte-token pairs: a prompt, then a chosen reply of 'y's or a rejected reply of 'n's.
    Labels cover only the reply (the prompt is -100)."""
    rng = np.random.default_rng(0)
    data: dict[str, list] = {"pos": [], "neg": [], "pos_label": [], "neg_label": []}
    for _ in range(PROMPTS):
        prompt = list(rng.integers(97, 123, size=int(rng.integers(6, 14))))
        for side, letter in (("pos", ord("y")), ("neg", ord("n"))):
            reply = [letter] * int(rng.integers(4, 10))
            data[side].append(prompt + reply)
            data[f"{side}_label"].append([-100] * len(prompt) + reply)
    return {name: write_dataset(folder / name, docs, dtype=np.int32) for name, docs in data.items()}


def run(tmp: Path, name: str, values: dict) -> dict:
    folder = tmp / name
    values = {
        **small_config(
            seq_length=SEQ,
            max_position_embeddings=SEQ,
            train_iters=ITERS,
            eval_interval=ITERS,
            eval_iters=1,
            log_interval=1,
            log_dir=str(folder / "logs"),
            optimizer={"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}},
            min_lr=3e-3,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            num_workers=0,
            seed=5,
        ),
        **values,
    }
    run_tool("deepy.py", "train.py", write_config(folder / "config.yml", values))
    lines = (folder / "logs" / "metrics.jsonl").read_text().splitlines()
    return {(r["iteration"], r["split"]): r for r in map(json.loads, lines)}


def dpo_paths(data: dict[str, str]) -> dict[str, list[str]]:
    paths = {}
    for split in ("train", "valid"):
        for side in ("pos", "neg"):
            paths[f"{side}_{split}_data_paths"] = [data[side]]
            paths[f"{side}_{split}_label_data_paths"] = [data[f"{side}_label"]]
    return dict(train_impl="dpo", dataset_impl="pairwise", dpo_beta=0.5, **paths)


def test_dpo_run_starts_at_log_2_and_the_margin_grows(tmp_path):
    settings = dpo_paths(preference_data(tmp_path / "data"))
    metrics = run(tmp_path, "dpo", settings)
    first, last = metrics[(1, "train")], metrics[(ITERS, "train")]
    # Policy == reference before the first update, so every pair's loss is log(2).
    assert first["lm_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["margins"] == pytest.approx(0.0, abs=1e-5)
    assert last["margins"] > first["margins"] + 1.0
    assert last["chosen_rewards"] > last["rejected_rewards"]
    assert last["reward_acc"] == 1.0
    assert last["lm_loss"] < 0.3
    assert metrics[(0, "valid")]["lm_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[(ITERS, "valid")]["margins"] > 1.0


def test_resumed_dpo_run_keeps_the_original_reference(tmp_path):
    settings = dpo_paths(preference_data(tmp_path / "data"))
    full = run(tmp_path, "full", settings)
    save = str(tmp_path / "first" / "ckpt")
    first = run(tmp_path, "first", dict(settings, save=save, exit_interval=ITERS // 2))
    assert (Path(save) / "reference_model.safetensors").is_file()
    second = run(tmp_path, "second", dict(settings, save=save, load=save))
    resumed = {**first, **second}
    for key in full:
        if key[1] == "train":
            for name in ("lm_loss", "margins", "ref_chosen_logp"):
                assert resumed[key][name] == pytest.approx(full[key][name], rel=1e-5), key


def test_kto_run_starts_at_half_and_separates_desirable_from_undesirable(tmp_path):
    data = preference_data(tmp_path / "data")
    # Every prompt twice: with its 'y' reply (desirable) and its 'n' reply (undesirable).
    pos = [d.tolist() for d in _read(data["pos"])]
    neg = [d.tolist() for d in _read(data["neg"])]
    text = write_dataset(tmp_path / "data" / "kto_text", pos + neg, dtype=np.int32)
    reward = write_dataset(
        tmp_path / "data" / "kto_reward", [[1]] * len(pos) + [[-1]] * len(neg), dtype=np.int32
    )
    splits = {
        f"{split}_{kind}_paths": [path]
        for split in ("train", "valid", "test")
        for kind, path in (("data", text), ("reward_data", reward))
    }
    metrics = run(tmp_path, "kto", dict(train_impl="kto", kto_beta=0.5, **splits))
    first, last = metrics[(1, "train")], metrics[(ITERS, "train")]
    # Policy == reference: every sample's loss is weight * (1 - sigmoid(0)) = 0.5.
    assert first["lm_loss"] == pytest.approx(0.5, abs=1e-5)
    assert last["desirable_rewards"] > 0.5
    assert last["undesirable_rewards"] < -0.5
    assert last["lm_loss"] < first["lm_loss"] - 0.1
    assert (ITERS, "test") in metrics


def _read(prefix: str):
    from megatron.data.indexed_dataset import MMapIndexedDataset

    data = MMapIndexedDataset(prefix)
    return [data[i] for i in range(len(data))]


# -- config rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(train_impl="dpo"), "train_impl dpo and dataset_impl pairwise go together"),
        (dict(train_impl="rm"), "train_impl='rm' (from dict) is not supported yet"),
        (
            dict(dataset_impl="pairwise", train_impl="dpo", pos_train_data_paths=["x"]),
            "pos_train_data_paths and neg_train_data_paths go together",
        ),
        (
            dict(train_impl="kto", train_micro_batch_size_per_gpu=1),
            "train_micro_batch_size_per_gpu >= 2",
        ),
        (dict(train_impl="kto"), "kto: train_data_paths needs train_reward_data_paths"),
        (dict(train_reward_data_paths=["r"]), "is only read with train_impl kto"),
        (dict(pos_train_data_paths=["p"]), "is only read with dataset_impl pairwise"),
        (dict(dpo_beta=0.0), "dpo_beta must be > 0"),
        (
            dict(train_impl="kto", pack_impl="pack_until_overflow"),
            "pack_until_overflow is not supported",
        ),
    ],
)
def test_config_errors_name_the_rule(values, message):
    config = small_config(
        train_data_paths=["t"], valid_data_paths=["t"], test_data_paths=["t"], **values
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NeoXArgs.from_dict(config, check_files=False)
