"""The one `Registry` type: duplicates refused, lookups that suggest, case-insensitive names, and
config validation that accepts whatever is registered in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_dataset

from megatron.learning_rates import DECAY_STYLES, AnnealingLR, register_decay_style
from megatron.losses import register_train_impl
from megatron.model import NORMS, register_norm
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.optimizers import OPTIMIZERS
from megatron.registry import NotRegistered, Registry
from megatron.tokenizer import TOKENIZERS

pytestmark = pytest.mark.timeout(60)


def _identity(x: float) -> float:
    return x


def test_both_registration_forms_and_the_mapping_view() -> None:
    styles: Registry = Registry("decay style")

    @styles.register("cosine", "cos")
    def cosine(progress: float) -> float:
        return progress

    assert styles.register("linear", _identity) is _identity
    assert styles["cos"] is cosine and styles.get("linear") is _identity
    assert list(styles) == ["cosine", "cos", "linear"]
    assert styles.names() == ["cos", "cosine", "linear"]
    assert "cosine" in styles and "Cosine" not in styles and 3 not in styles
    del styles["cos"]
    assert "cos" not in styles and len(styles) == 2


def test_a_taken_name_is_refused_and_nothing_is_added() -> None:
    styles: Registry = Registry("decay style")
    styles.register("linear", _identity)
    with pytest.raises(ValueError, match="decay style 'linear' is already registered"):
        styles.register("linear", abs)
    with pytest.raises(ValueError, match="decay style 'linear' is already registered"):
        styles.register("new", "linear")(abs)  # an alias collides: "new" is not added either
    with pytest.raises(ValueError, match="'twice' is already registered"):
        styles.register("twice", "twice")(abs)
    assert styles.names() == ["linear"] and styles["linear"] is _identity


def test_public_register_functions_refuse_taken_names() -> None:
    with pytest.raises(ValueError, match="norm 'rmsnorm' is already registered"):
        register_norm("rmsnorm", lambda config, width: torch.nn.Identity())
    with pytest.raises(ValueError, match="decay style 'cosine' is already registered"):
        register_decay_style("cosine")(_identity)
    with pytest.raises(ValueError, match="train_impl 'dpo' is already registered"):
        register_train_impl("dpo")(lambda model, batch, ctx: None)


def test_a_failed_lookup_lists_the_names_and_suggests_the_closest() -> None:
    with pytest.raises(NotRegistered) as info:
        DECAY_STYLES.get("cosin", key="lr_decay_style")
    message = str(info.value)
    assert message.startswith("lr_decay_style: unknown decay style 'cosin'; expected one of ")
    assert "'constant', 'cosine', 'exponential', 'inv_sqrt', 'linear', 'wsd'" in message
    assert "(did you mean 'cosine'?)" in message
    assert message.endswith("add one with megatron.learning_rates.register_decay_style")
    # Dict-style callers catch KeyError, config-style callers ValueError.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="unknown norm 'zzz'; expected one of 'layernorm'"):
        NORMS["zzz"]
    assert "did you mean" not in NORMS.unknown("zzz")  # nothing close: no suggestion


def test_case_insensitive_registries_keep_the_written_names() -> None:
    optimizers: Registry = Registry("optimizer", ignore_case=True)
    optimizers.register("Adam", _identity)
    assert "adam" in optimizers and optimizers["ADAM"] is _identity
    assert optimizers.names() == ["Adam"]
    with pytest.raises(ValueError, match="optimizer 'ADAM' is already registered"):
        optimizers.register("ADAM", abs)
    with pytest.raises(NotRegistered, match=r"did you mean 'Adam'\?"):
        optimizers.get("adma")
    # The real ones: NeoX's spellings work in any case.
    assert OPTIMIZERS.get("AdamW") is OPTIMIZERS.get("adamw")
    assert "gpt2bpetokenizer" in TOKENIZERS and "GPT2BPETokenizer" in TOKENIZERS.names()


# --------------------------------------------------------------------------- config validation


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return write_dataset(tmp_path / "data" / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])


@pytest.fixture
def user_entries() -> Iterator[None]:
    """A norm and a decay style registered in-process, as a user's ablation does."""
    register_norm("test_unit_norm", lambda config, width: torch.nn.LayerNorm(width))
    register_decay_style("test_half_then_zero")(
        lambda at: at.between(0.5 if at.progress < 1 else 0.0)
    )
    yield
    del NORMS["test_unit_norm"]
    del DECAY_STYLES["test_half_then_zero"]


def test_the_config_accepts_names_registered_in_process(dataset: str, user_entries: None) -> None:
    config = small_config(dataset, norm="test_unit_norm", lr_decay_style="TEST_HALF_THEN_ZERO")
    args = NeoXArgs.from_dict(config)
    assert args.norm == "test_unit_norm"
    assert args.lr_decay_style == "test_half_then_zero"  # any case, stored as registered
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = AnnealingLR(optimizer, 1.0, 0, 10, args.lr_decay_style)
    assert schedule.get_lr(5) == 0.5


def test_misspelt_names_fail_at_config_time_with_a_suggestion(
    dataset: str, user_entries: None
) -> None:
    config = small_config(dataset, norm="test_unit_nrom", lr_decay_style="step")
    with pytest.raises(ConfigError) as info:
        NeoXArgs.from_dict(config)
    message = str(info.value)
    assert "key 'norm' (from dict): expected one of 'layernorm'" in message
    assert "'test_unit_norm'" in message and "(did you mean 'test_unit_norm'?)" in message
    # A name nobody registered: rejected, with the registered ones.
    assert "key 'lr_decay_style' (from dict): expected one of 'constant', 'cosine'" in message
    assert "got str 'step'" in message
    assert "'test_half_then_zero'" in message

    config = small_config(dataset)
    config["optimizer"]["type"] = "Adamm"
    with pytest.raises(ConfigError) as info:
        NeoXArgs.from_dict(config)
    assert "optimizer.type (from dict): unknown optimizer 'Adamm'" in str(info.value)
    assert "(did you mean 'adam'?)" in str(info.value)
