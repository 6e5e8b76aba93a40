"""The NeoX-compatible config system: schema, merging, overrides, validation, derivation."""

from __future__ import annotations

import base64
import copy
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from _config_fixtures import FIXTURES, REPO, small_config, write_config, write_dataset

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments import derive as derive_module
from megatron.neox_arguments.batch import resolve_batch
from megatron.neox_arguments.fields import Support
from megatron.neox_arguments.schema import FIELDS
from megatron.neox_arguments.sizes import parameter_counts

pytestmark = pytest.mark.timeout(60)

MINIMUM_KEYS = """
num_layers hidden_size num_attention_heads num_kv_heads seq_length max_position_embeddings norm
layernorm_epsilon rms_norm_epsilon pos_emb rotary_pct rotary_emb_base no_weight_tying
gpt_j_residual gpt_j_tied activation intermediate_size mlp_multiple_of init_method
output_layer_init_method init_method_std hidden_dropout attention_dropout use_bias_in_norms
use_bias_in_attn_linear use_bias_in_mlp make_vocab_size_divisible_by attention_config precision
fp16 bf16 optimizer weight_decay gradient_clipping lr_decay_style lr_decay_iters
lr_decay_fraction warmup min_lr train_iters train_epochs train_batch_size
train_micro_batch_size_per_gpu gradient_accumulation_steps zero_optimization seed save load
checkpoint_factor keep_last_n_checkpoints finetune no_load_optim no_load_rng eval_interval
eval_iters log_interval log_dir tensorboard_dir use_wandb wandb_project wandb_group wandb_team
wandb_host wandb_init_all_ranks data_path train_data_paths valid_data_paths test_data_paths
label_data_paths split data_impl tokenizer_type vocab_file merge_file num_workers
model_parallel_size pipe_parallel_size num_gpus num_nodes hostfile include exclude launcher
master_port master_addr deepspeed_slurm deepspeed_mpi comment distributed_backend
checkpoint_activations checkpoint_num_layers partition_activations synchronize_each_layer
wall_clock_breakdown steps_per_print eod_mask_loss reset_position_ids reset_attention_mask
text_gen_type temperature top_p top_k maximum_tokens sample_input_file sample_output_file
num_samples recompute use_mup
""".split()


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return write_dataset(tmp_path / "data" / "tiny_text_document", [[1, 2, 3, 4], [5, 6, 7]])


def bytes_padded_vocab() -> int:
    from megatron.tokenizer import build_tokenizer, pad_vocab_size

    return pad_vocab_size(build_tokenizer("bytes").vocab_size, 128, 1)


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- schema


def test_schema_has_every_key_the_trainer_reads_with_docs() -> None:
    missing = [key for key in MINIMUM_KEYS if key not in FIELDS]
    assert missing == []
    assert all(f.metadata["doc"] for f in FIELDS.values())
    assert FIELDS["use_wandb"].default is False
    assert FIELDS["lr_decay_style"].default == "linear"
    assert FIELDS["layernorm_epsilon"].default == 1.0e-5
    assert FIELDS["make_vocab_size_divisible_by"].default == 128


# --------------------------------------------------------------------------- loading


def test_files_merge_and_keep_their_texts(tmp_path: Path, dataset: str) -> None:
    config = small_config(dataset)
    model = {k: v for k, v in config.items() if k in ("num_layers", "hidden_size")}
    rest = {k: v for k, v in config.items() if k not in model}
    first = write_config(tmp_path / "model.yml", model)
    second = write_config(tmp_path / "setup.yml", rest)
    args = NeoXArgs.from_ymls([first, second])
    assert (args.num_layers, args.hidden_size, args.seq_length) == (2, 64, 32)
    assert args.config_files == {
        "model.yml": Path(first).read_text(),
        "setup.yml": Path(second).read_text(),
    }


def test_key_in_two_files_names_both_files(tmp_path: Path, dataset: str) -> None:
    first = write_config(tmp_path / "a.yml", small_config(dataset))
    second = write_config(tmp_path / "b.yml", {"train-iters": 5})
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_ymls([first, second])
    message = errors_of(excinfo)
    assert "'train_iters'" in message and first in message and second in message


def test_dash_and_underscore_spellings_in_one_file_are_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "dup.yml"
    path.write_text('{"train-iters": 5, "train_iters": 6}')
    with pytest.raises(ConfigError, match="'train_iters' is set twice in .*dup.yml"):
        NeoXArgs.from_ymls([path])


def test_literal_duplicate_key_names_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"'seed' appears twice \(lines 1 and 2\)"):
        NeoXArgs.from_ymls([path])


def test_overrides_flat_dotted_and_typed_win_over_files(tmp_path: Path, dataset: str) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset, zero_optimization={"stage": 0}))
    args = NeoXArgs.from_ymls(
        [config],
        [
            "train-iters=40",
            "optimizer.params.lr=3e-4",
            "zero_optimization.stage=1",
            "checkpoint_activations=true",
            "optimizer.params.betas=[0.8, 0.9]",
            "fp16.enabled=false",
        ],
    )
    assert args.train_iters == 40 and isinstance(args.train_iters, int)
    assert args.lr == pytest.approx(3e-4)
    assert args.optimizer["params"]["lr"] == pytest.approx(3e-4)
    assert args.optimizer["params"]["betas"] == [0.8, 0.9]
    assert args.zero_optimization == {"stage": 1} and args.zero_stage == 1
    assert args.checkpoint_activations is True
    assert args.fp16 == {"enabled": False}


def test_override_into_a_non_dict_is_an_error(tmp_path: Path, dataset: str) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset))
    with pytest.raises(ConfigError, match="'seed' is a int, not a dict"):
        NeoXArgs.from_ymls([config], ["seed=3", "seed.x=1"])


def test_unknown_key_suggests_the_closest(tmp_path: Path, dataset: str) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset, **{"num_layer": 3}))
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_ymls([config], ["lr_decay_styl=cosine"])
    message = errors_of(excinfo)
    assert f"unknown key 'num_layer' in {config} (did you mean 'num_layers'?)" in message
    assert "'lr_decay_styl' in command line override" in message
    assert "did you mean 'lr_decay_style'?" in message


def test_wrong_type_names_key_source_and_expected_type(tmp_path: Path, dataset: str) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset, num_layers="two"))
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_ymls([config], ["checkpoint_activations=3", "norm=batchnorm"])
    message = errors_of(excinfo)
    assert f"key 'num_layers' (from {config}): expected int, got str 'two'" in message
    assert "key 'checkpoint_activations' (from command line): expected bool" in message
    assert "key 'norm' (from command line): expected one of 'layernorm'" in message


def test_numbers_written_as_neox_does_are_accepted(tmp_path: Path, dataset: str) -> None:
    values = small_config(dataset, min_lr="1e-5", warmup=0, init_method_std="2e-2")
    values["optimizer"]["params"]["lr"] = "3e-4"
    args = NeoXArgs.from_ymls([write_config(tmp_path / "c.yml", values)], ["lr_decay_iters=1.0e+1"])
    assert args.min_lr == pytest.approx(1e-5) and isinstance(args.min_lr, float)
    assert args.warmup == 0.0 and isinstance(args.warmup, float)
    assert args.lr == pytest.approx(3e-4)
    assert args.lr_decay_iters == 10 and isinstance(args.lr_decay_iters, int)


def test_literal_choices_are_case_insensitive(tmp_path: Path, dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, lr_decay_style="Cosine", norm="RMSNorm"))
    assert (args.lr_decay_style, args.norm) == ("cosine", "rmsnorm")


# --------------------------------------------------------------------------- GPT-NeoX files


def test_neox_style_files_load_unchanged(dataset: str) -> None:
    args = NeoXArgs.from_ymls(
        [FIXTURES / "neox_quirks_model.yml", FIXTURES / "neox_quirks_setup.yml"],
        [f"data_path={dataset}"],
    )
    assert args.num_layers == 2 and args.pos_emb == "rotary" and args.rotary_pct == 0.25
    assert args.bias_gelu_fusion is True  # a performance hint: accepted
    assert args.gradient_accumulation_steps == 1  # from the `gas` alias
    assert args.checkpoint_factor == 50  # from the old `save-interval` name
    assert args.lr == pytest.approx(3e-4) and args.min_lr == pytest.approx(3e-5)
    assert args.zero_optimization["allgather_bucket_size"] == 500_000_000
    assert args.precision == "fp16" and args.dynamic_loss_scale is True
    assert args.padded_vocab_size == bytes_padded_vocab()
    assert args.tokenizer_type == "bytes"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yml")))
def test_every_shipped_config_loads(name: str) -> None:
    paths = [REPO / "configs" / name]
    if name not in ("local_setup.yml", "quickstart.yml"):
        paths.append(REPO / "configs" / "local_setup.yml")
    overrides = [] if name == "quickstart.yml" else ["num_gpus=1"]
    if name == "local_setup.yml":
        paths.insert(0, REPO / "configs" / "125M.yml")
    if name == "20B.yml":
        paths.pop()  # 20B carries its own data, tokenizer and checkpoint settings
    args = NeoXArgs.from_ymls(paths, overrides, check_files=False)
    assert args.model_parallel_size == 1 and args.pipe_parallel_size in (0, 1)
    assert args.train_batch_size == args.train_micro_batch_size_per_gpu * (
        args.gradient_accumulation_steps
    )
    assert args.lr > args.min_lr >= 0


def test_quickstart_config_matches_its_spec() -> None:
    args = NeoXArgs.from_ymls([REPO / "configs" / "quickstart.yml"], check_files=False)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (4, 128, 4)
    assert (args.seq_length, args.train_batch_size, args.train_iters) == (128, 8, 300)
    assert args.precision == "fp32" and args.lr_decay_style == "cosine"
    assert args.tokens_per_step == 1024 and args.total_tokens == 307_200


# --------------------------------------------------------------------------- validation


def test_inconsistencies_show_the_arithmetic_and_are_reported_together(dataset: str) -> None:
    values = small_config(
        dataset,
        hidden_size=66,
        num_attention_heads=4,
        seq_length=64,
        warmup=1.5,
        eval_interval=0,
        train_batch_size=10,
        gradient_accumulation_steps=2,
    )
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_dict(values)
    message = errors_of(excinfo)
    assert "hidden_size (66) must be divisible by num_attention_heads (4): 66 / 4 = 16.5" in message
    assert "seq_length (64) must be <= max_position_embeddings (32)" in message
    assert (
        "train_batch_size (10) must equal train_micro_batch_size_per_gpu x "
        "gradient_accumulation_steps x data_parallel_size = 4 x 2 x 1 = 8" in message
    )
    assert "warmup must be in [0.0, 1.0], got 1.5" in message
    assert "eval_interval must be >= 1, got 0" in message
    assert len(excinfo.value.problems) == 5


def test_kv_heads_must_divide_attention_heads(dataset: str) -> None:
    with pytest.raises(
        ConfigError,
        match=r"num_attention_heads \(4\) must be a multiple of "
        r"num_kv_heads \(3\): 4 / 3 = 1.33333",
    ):
        NeoXArgs.from_dict(small_config(dataset, num_kv_heads=3))
    assert NeoXArgs.from_dict(small_config(dataset, num_kv_heads=2)).num_kv_heads == 2


def test_world_size_must_divide_by_tensor_times_pipe() -> None:
    args = SimpleNamespace(
        hosts=None, num_gpus=3, num_nodes=-1, global_num_gpus=None,
        model_parallel_size=2, pipe_parallel_size=1,
    )  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"global_num_gpus = 3\) must be divisible by "
        r"model_parallel_size x pipe_parallel_size = 2 x 1 = 2: 3 / 2 = 1.5",
    ):
        derive_module._world(args)


def test_missing_dataset_and_tokenizer_files_name_key_and_path(tmp_path: Path) -> None:
    prefix = str(tmp_path / "nowhere" / "corpus_text_document")
    vocab = str(tmp_path / "vocab.json")
    values = small_config(prefix, tokenizer_type="HFTokenizer", vocab_file=vocab)
    with pytest.raises(ConfigError) as excinfo:
        NeoXArgs.from_dict(values)
    message = errors_of(excinfo)
    assert f"data_path (from dict): dataset '{prefix}' not found" in message
    assert f"missing {prefix}.bin, {prefix}.idx" in message
    assert f"vocab_file (from dict): file not found: {vocab}" in message


def test_train_data_paths_are_checked_too(tmp_path: Path, dataset: str) -> None:
    missing = str(tmp_path / "gone")
    values = small_config(
        None,
        train_data_paths=[dataset, missing],
        valid_data_paths=[dataset],
        test_data_paths=[dataset],
    )
    with pytest.raises(ConfigError, match=f"train_data_paths .*'{missing}' not found"):
        NeoXArgs.from_dict(values)
    values["train_data_paths"] = [dataset, dataset]
    assert NeoXArgs.from_dict(values).train_data_weights == [1.0, 1.0]


def test_unbuildable_tokenizer_is_a_config_error(dataset: str) -> None:
    with pytest.raises(ConfigError, match="tokenizer_type 'NoSuchTokenizer' .*cannot build"):
        NeoXArgs.from_dict(small_config(dataset, tokenizer_type="NoSuchTokenizer"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("zero_optimization.stage=4", "zero_optimization.stage .*must be 0, 1, 2 or 3, got 4"),
        ("attention_config=[[[sparse_fixed], 2]]", r"\['sparse_fixed'\] are not supported yet"),
        ("use_mup=true", "use_mup=True .*needs mup_base_width"),
        ("moe_num_experts=8", "moe_num_experts=8 .*only NeoX's default 1 is accepted"),
        ("lr=0.1", "key 'lr' .*cannot be set: it is derived from optimizer.params.lr"),
        ("zero_optimization.offload_optimizer={device: cpu}", "ZeRO offload is not supported"),
    ],
)
def test_unimplemented_features_are_errors(
    tmp_path: Path, dataset: str, override: str, expected: str
) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset))
    with pytest.raises(ConfigError, match=expected):
        NeoXArgs.from_ymls([config], [override])


def test_neox_defaults_and_hints_of_unimplemented_features_are_accepted(dataset: str) -> None:
    values = small_config(
        dataset,
        pipe_parallel_size=0,
        use_mup=False,
        moe_num_experts=1,
        scaled_upper_triang_masked_softmax_fusion=True,
        rope_fusion=True,
        attention_config=[[["flash"], "all"]],
    )
    args = NeoXArgs.from_dict(values)
    assert args.attention_config == ["flash", "flash"]
    assert args.is_pipe_parallel is False
    hint_keys = [k for k, f in FIELDS.items() if f.metadata["support"] is Support.HINT]
    assert "bias_gelu_fusion" in hint_keys and "num_layers" not in hint_keys


# --------------------------------------------------------------------------- derivation


@pytest.mark.parametrize(
    ("dp", "given", "expected"),
    [
        (4, (64, 4, None), (64, 4, 4)),
        (4, (64, None, 2), (64, 8, 2)),
        (4, (None, 4, 2), (32, 4, 2)),
        (2, (16, None, None), (16, 8, 1)),
        (2, (None, 3, None), (6, 3, 1)),
        (2, (12, 3, 2), (12, 3, 2)),
    ],
)
def test_batch_triple_any_two_give_the_third(
    dp: int, given: tuple[int | None, ...], expected: tuple[int, int, int]
) -> None:
    assert resolve_batch(dp, *given) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ((12, 4, 2), r"train_batch_size \(12\) must equal .* = 4 x 2 x 2 = 16"),
        ((10, 4, None), r"train_batch_size \(10\) is not a positive multiple of .* = 4 x 2 = 8"),
        ((None, None, 2), "set train_micro_batch_size_per_gpu"),
    ],
)
def test_inconsistent_batch_triple_shows_numbers(
    given: tuple[int | None, ...], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        resolve_batch(2, *given)


def test_world_size_comes_from_num_gpus_times_nodes(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, num_gpus=4, num_nodes=2))
    assert (args.global_num_gpus, args.data_parallel_size, args.train_batch_size) == (8, 8, 32)
    cpu = NeoXArgs.from_dict(small_config(dataset, num_gpus=None))
    import torch

    assert cpu.global_num_gpus == (torch.cuda.device_count() or 1)


def test_world_size_from_hostfile_with_include(tmp_path: Path, dataset: str) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\nworker-0 slots=4\nworker-1 slots=4\n")
    args = NeoXArgs.from_dict(
        small_config(dataset, num_gpus=None, hostfile=str(hostfile), include="worker-1:0,2")
    )
    assert args.global_num_gpus == 2 and args.hosts == {"worker-1": [0, 2]}
    bad = small_config(dataset, hostfile=str(hostfile), include="worker-9")
    with pytest.raises(ConfigError, match="include: host 'worker-9' is not in the hostfile"):
        NeoXArgs.from_dict(bad)


def test_missing_hostfile_falls_back_to_local_with_a_warning(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, hostfile="/mock_path"))
    assert args.hosts is None and args.global_num_gpus == 1
    assert any("/mock_path not found" in w for w in args.warnings)


def test_derived_values(dataset: str) -> None:
    args = NeoXArgs.from_dict(
        small_config(dataset, train_iters=100, lr_decay_fraction=0.5, checkpoint_factor=30)
    )
    assert args.lr == pytest.approx(1e-3) and args.optimizer_type == "Adam"
    assert args.lr_decay_iters == 50
    assert args.save_iters == [30, 60, 90]
    assert args.tokens_per_step == 4 * 32 and args.total_tokens == 4 * 32 * 100
    assert args.padded_vocab_size == bytes_padded_vocab() and args.padded_vocab_size % 128 == 0
    assert args.num_parameters == parameter_counts(args)["total"]
    assert args.text_gen_type == "unconditional"
    assert args.attention_config == ["global", "global"]
    assert args.data_impl == "mmap"  # NeoX's "infer": Strata reads only mmap datasets
    assert NeoXArgs.from_dict(small_config(dataset)).lr_decay_iters == 20


def test_log_checkpoint_scale(dataset: str) -> None:
    args = NeoXArgs.from_dict(
        small_config(dataset, train_iters=100, checkpoint_factor=2, checkpoint_scale="log")
    )
    assert args.save_iters == [2, 4, 8, 16, 32, 64]


def test_parameter_count_matches_pythia_160m() -> None:
    """NeoX 125M config with GPT-2's padded vocabulary is Pythia-160M: 162,322,944 parameters."""
    args = NeoXArgs.from_ymls([REPO / "configs" / "125M.yml"], ["num_gpus=1"], check_files=False)
    args.padded_vocab_size = 50304
    counts = parameter_counts(args)
    assert counts["total"] == 162_322_944
    assert counts["output"] == counts["embedding"] == 50304 * 768


def test_padded_vocab_from_gpt2_files(assets: Path, dataset: str) -> None:
    args = NeoXArgs.from_dict(
        small_config(
            dataset,
            tokenizer_type="GPT2BPETokenizer",
            vocab_file=str(assets / "tokenizers" / "gpt2-vocab.json"),
            merge_file=str(assets / "tokenizers" / "gpt2-merges.txt"),
        )
    )
    assert args.padded_vocab_size == 50304


@pytest.mark.parametrize(
    ("values", "precision", "dtype"),
    [
        ({}, "fp32", "float32"),
        ({"precision": "bfloat16"}, "bf16", "bfloat16"),
        ({"bf16": {"enabled": True}}, "bf16", "bfloat16"),
        ({"fp16": {"enabled": True, "type": "bfloat16"}}, "bf16", "bfloat16"),
        ({"fp16": {"fp16": True, "enabled": True}}, "fp16", "float16"),
    ],
)
def test_precision(dataset: str, values: dict, precision: str, dtype: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, **values))
    assert args.precision == precision
    assert str(args.params_dtype) == f"torch.{dtype}"


def test_contradicting_precision_is_an_error(dataset: str) -> None:
    with pytest.raises(ConfigError, match="precision 'fp32' .*contradicts the bf16 dict"):
        NeoXArgs.from_dict(small_config(dataset, precision="fp32", bf16={"enabled": True}))


def test_derived_table_lists_the_arithmetic(dataset: str) -> None:
    table = NeoXArgs.from_dict(small_config(dataset, num_gpus=2)).derived_table()
    lines = dict(line.split("  ", 1) for line in table.splitlines())
    assert "8 = 4 (micro) x 1 (accumulation) x 2 (data parallel)" in table
    assert {"world size (global_num_gpus)", "parameters", "total tokens"} <= {
        k.strip() for k in lines
    }


# --------------------------------------------------------------------------- DeepSpeed config


def test_deepspeed_config_has_neox_semantics(dataset: str) -> None:
    args = NeoXArgs.from_ymls(
        [FIXTURES / "neox_quirks_model.yml", FIXTURES / "neox_quirks_setup.yml"],
        [f"data_path={dataset}", "wall_clock_breakdown=false", "fp32_allreduce=true"],
    )
    config = args.deepspeed_config
    assert "optimizer" not in config and "scheduler" not in config
    assert config["train_batch_size"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["zero_optimization"]["stage"] == 1
    assert config["zero_allow_untested_optimizer"] is True
    assert config["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 12,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert config["comms_logger"]["prof_all"] is True  # from deepspeed_extra_args
    assert config["fp32_allreduce"] is True
    assert (config["gradient_clipping"], config["steps_per_print"]) == (1.0, 10)
    # No device sync per step for DeepSpeed's own throughput timer, unless asked for.
    assert config["timers"] == {"throughput": {"enabled": False}}
    timed = copy.copy(args)
    timed.deepspeed_extra_args = {"timers": {"throughput": {"enabled": True}}}
    assert timed.deepspeed_config["timers"] == {"throughput": {"enabled": True}}

    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(config)
    assert parsed.train_batch_size == 4 and parsed.zero_optimization_stage == 1
    assert parsed.timers_config.enabled is False


def test_bf16_deepspeed_section(dataset: str) -> None:
    config = NeoXArgs.from_dict(small_config(dataset, precision="bf16")).deepspeed_config
    assert config["bf16"] == {"enabled": True} and "fp16" not in config


def test_extra_deepspeed_args_may_not_repeat_a_key(dataset: str) -> None:
    values = small_config(dataset, deepspeed_extra_args={"steps_per_print": 5})
    with pytest.raises(ConfigError, match="deepspeed_extra_args.steps_per_print is already set"):
        NeoXArgs.from_dict(values)


# --------------------------------------------------------------------------- launcher round trip


def test_json_round_trip(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, num_gpus=2, lr_decay_fraction=0.5))
    again = NeoXArgs.from_json(args.to_json())
    assert again.values() == args.values()
    assert again.deepspeed_config == args.deepspeed_config
    assert dataclasses.fields(again) == dataclasses.fields(args)


def test_consume_reads_megatron_config_and_ignores_launcher_flags(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, num_gpus=4))
    argv = ["--local_rank=3", "--megatron_config", args.encoded(), "--local-rank", "3"]
    consumed = NeoXArgs.consume_neox_args(argv)
    # The world size is the launcher-resolved one, even though this process sees one CPU.
    assert consumed.global_num_gpus == 4 and consumed.train_batch_size == 16
    assert consumed.values() == args.values()


def test_consume_reads_a_megatron_config_file(tmp_path: Path, dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset))
    path = tmp_path / "megatron_config.json"
    path.write_text(args.to_json())
    assert NeoXArgs.consume_neox_args([f"--megatron_config={path}"]).values() == args.values()


def test_consume_reads_yml_files_and_overrides(tmp_path: Path, dataset: str) -> None:
    config = write_config(tmp_path / "c.yml", small_config(dataset))
    args = NeoXArgs.consume_neox_args([config, "train_iters=7", "--local_rank=0"])
    assert args.train_iters == 7
    with pytest.raises(ConfigError, match="unknown command-line option '--bogus'"):
        NeoXArgs.consume_neox_args([config, "--bogus"])
    with pytest.raises(ConfigError, match="neither a file nor base64"):
        NeoXArgs.consume_neox_args(["--megatron_config", "!!!"])


def test_encoded_is_urlsafe_base64_of_json(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset))
    assert base64.urlsafe_b64decode(args.encoded()).decode() == args.to_json()


# --------------------------------------------------------------------------- the config is a leaf
def test_the_config_package_imports_no_layer_above_it() -> None:
    """megatron.neox_arguments imports no model, optimizer, schedule, loss or data code, and
    refuses to check a config before megatron.config has registered their rules."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import megatron.neox_arguments as config\n"
        "above = ('megatron.model', 'megatron.optimizers', 'megatron.losses',\n"
        "         'megatron.learning_rates', 'megatron.data')\n"
        "loaded = [m for m in sys.modules if m.startswith(above)]\n"
        "assert not loaded, loaded\n"
        "try:\n"
        "    config.NeoXArgs.from_dict({'num_layers': 2})\n"
        "except RuntimeError as err:\n"
        "    assert 'import megatron.config' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('built without the rules')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_a_rule_registered_by_a_module_is_applied(dataset: str) -> None:
    from megatron.neox_arguments.rules import RULES, register_rule

    @register_rule("test: even layers")
    def _even_layers(args, problems) -> None:
        if args.num_layers % 2:
            problems.add(
                f"num_layers must be even, got {args.num_layers}{args.where('num_layers')}"
            )

    try:
        NeoXArgs.from_dict(small_config(dataset, num_layers=2))
        with pytest.raises(ConfigError, match=r"num_layers must be even, got 3 \(from dict\)"):
            NeoXArgs.from_dict(small_config(dataset, num_layers=3))
    finally:
        del RULES["test: even layers"]


def test_credential_names_are_told_by_words_and_values_by_type() -> None:
    from megatron.neox_arguments.redact import REDACTED, is_credential_name, redact_values

    for name in ("wandb_api_key", "HF_TOKEN", "apiKey", "secret", "db-password", "api_keys"):
        assert is_credential_name(name), name
    for name in ("num_kv_heads", "tokenizer_type", "maximum_tokens", "special_tokens", "keyword"):
        assert not is_credential_name(name), name
    values = {"key_size": 64, "api_key": "abc", "x": [{"token": "t"}], "token_dropping": True}
    assert redact_values(values) == {
        "key_size": 64,
        "api_key": REDACTED,
        "x": [{"token": REDACTED}],
        "token_dropping": True,
    }


def test_config_texts_and_launch_json_redact_credentials(tmp_path: Path, dataset: str) -> None:
    """The stored file texts (checkpoint configs/) keep comments and layout; the JSON passed
    to every process carries no secret either."""
    from megatron.neox_arguments.redact import redacted_config_files

    path = tmp_path / "run.yml"
    path.write_text(
        write_config_text(small_config(dataset))
        + "comet_others:\n  api_key: s3cr3t-value  # mine\n  key_size: 64\n"
    )
    args = NeoXArgs.from_ymls([path])
    text = args.config_files["run.yml"]
    assert "s3cr3t-value" not in text
    assert "  api_key: <redacted>  # mine\n  key_size: 64\n" in text
    assert redacted_config_files(args) == args.config_files
    assert "s3cr3t-value" not in args.to_json()
    assert NeoXArgs.from_json(args.to_json()).comet_others["key_size"] == 64


def write_config_text(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


# --------------------------------------------------------------------------- no silent keys

# Keys read through names built at run time: the f-string as the source spells it, per split.
COMPUTED_NAMES = (
    "{split}_data_paths",
    "{split}_data_weights",
    "{split}_label_data_paths",
    "{split}_reward_data_paths",
    "pos_{split}_data_paths",
    "neg_{split}_data_paths",
    "pos_{split}_label_data_paths",
    "neg_{split}_label_data_paths",
)
# A value that switches each refused feature on (a gate is "key" or "key: value").
GATE_ON = {
    "moe_num_experts": 2,
    "use_comet": True,
    "log_gradient_noise_scale": True,
    "memory_profiling": True,
    "profile": True,
    "adlr_autoresume": True,
    "s3_path": "s3://bucket/run",
    "num_unique_layers": 1,
}


def _source_text() -> str:
    """Every module that may read a key: all but the schema's declarations."""
    files = [*REPO.glob("megatron/**/*.py"), *REPO.glob("tools/**/*.py"), *REPO.glob("*.py")]
    return "\n".join(p.read_text() for p in files if not p.name.startswith("groups_"))


def test_every_implemented_key_is_read_somewhere() -> None:
    """A key Strata accepts does something: it is read by name (or through one of the names
    built at run time); a performance hint, a refused feature's setting (gated) or a
    DEFAULT_ONLY key is the only kind that may go unread."""
    text = _source_text()
    computed = set()
    for template in COMPUTED_NAMES:
        assert f'f"{template}"' in text, f"no module builds the key name {template!r}"
        computed |= {template.format(split=split) for split in ("train", "valid", "test")}
    unread = [
        key
        for key, f in FIELDS.items()
        if f.metadata["support"] is Support.YES
        and key not in computed
        and not re.search(rf"\b{key}\b", text)
    ]
    assert unread == []


def _gates() -> set[str]:
    return {f.metadata["gate"] for f in FIELDS.values() if f.metadata["support"] is Support.GATED}


@pytest.mark.parametrize("gate", sorted(_gates()))
def test_a_gated_key_belongs_to_a_feature_the_config_refuses(dataset: str, gate: str) -> None:
    key, _, value = gate.partition(": ")
    if value:
        on = [[[value], "all"]] if key == "attention_config" else value
    else:
        assert FIELDS[key].metadata["support"] is Support.DEFAULT_ONLY, gate
        on = GATE_ON[key]
    with pytest.raises(ConfigError, match=key):
        NeoXArgs.from_dict(small_config(dataset, **{key: on}))


def test_gated_keys_take_any_value_while_their_feature_is_off(dataset: str) -> None:
    args = NeoXArgs.from_dict(small_config(dataset, comet_project="p", moe_top_k=2, dim_att=8))
    assert (args.comet_project, args.moe_top_k, args.dim_att) == ("p", 2, 8)
