"""Hugging Face <-> Strata conversion: logits match transformers, round trips are exact, and
bad inputs are clear errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _config_fixtures import write_config, write_dataset
from conftest import run_tool
from safetensors.torch import load_file, save_file

from megatron.checkpoint import CheckpointError
from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.save import save_weights_checkpoint
from megatron.config import ConfigError, NeoXArgs
from megatron.conversion.strata_io import model_args, read_model
from megatron.model import GPTModel, ModelConfig
from tools.ckpts.convert_hf_to_neox import convert_hf_to_neox
from tools.ckpts.convert_hf_to_neox import main as hf_to_neox_main
from tools.ckpts.convert_neox_to_hf import convert_neox_to_hf
from tools.ckpts.convert_neox_to_hf import main as neox_to_hf_main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(900)

VOCAB = 100
SEQ = 24
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_LLAMA = dict(_SIZES, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
# A Llama 3.1-style frequency scaling whose original context is shorter than SEQ, so it matters.
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
CASES = {
    "gpt_neox_parallel": lambda: transformers.GPTNeoXConfig(
        **_SIZES, intermediate_size=128, rotary_pct=0.25, max_position_embeddings=64
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        **_SIZES,
        intermediate_size=128,
        rotary_pct=0.5,
        max_position_embeddings=64,
        use_parallel_residual=False,
        hidden_act="relu",
    ),
    "llama_gqa_untied": lambda: transformers.LlamaConfig(**_LLAMA),
    "llama_gqa_tied": lambda: transformers.LlamaConfig(**_LLAMA, tie_word_embeddings=True),
    "llama_biases_rope_scaling": lambda: transformers.LlamaConfig(
        **_LLAMA, attention_bias=True, mlp_bias=True, rope_parameters=_LLAMA3_ROPE
    ),
    "mistral_sliding_window": lambda: transformers.MistralConfig(**_LLAMA, sliding_window=6),
}


def write_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer.json with `size` tokens; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def make_hf(folder: Path, case: str, tokenizer_size: int = VOCAB):
    """A random tiny model saved with save_pretrained; every parameter perturbed (HF starts
    norms at 1 and biases at 0, which would hide a swapped or dropped tensor)."""
    config = CASES[case]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer.json", tokenizer_size)
    return model


def strata_model(ckpt: Path, config: Path | None = None) -> GPTModel:
    args = model_args([config or ckpt / "config.yml"])
    args.load = str(ckpt)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    load_checkpoint(args, model, None, None)
    return model


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(3))


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_matches_transformers(tmp_path, case):
    hf = make_hf(tmp_path / "hf", case)
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    with torch.no_grad():
        expected = hf(tokens()).logits
        got = strata_model(ckpt)(tokens())
    assert got.shape[-1] == VOCAB  # the chosen make_vocab_size_divisible_by adds no rows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    out, note = convert_neox_to_hf(ckpt, [ckpt / "config.yml"], tmp_path / "back")
    assert "tokenizer files written" in note
    original, exported = hf_weights(tmp_path / "hf"), hf_weights(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, expected, atol=1e-6, rtol=1e-6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w5 w7")["input_ids"] == [5, 7]


def test_sliding_window_matters_in_the_mistral_case(tmp_path):
    hf = make_hf(tmp_path / "hf", "mistral_sliding_window")
    with torch.no_grad():
        windowed = hf(tokens()).logits
        hf.config.sliding_window = None
        full = hf(tokens()).logits
    assert not torch.allclose(windowed[:, -1], full[:, -1], atol=1e-3)
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    assert yaml.safe_load((ckpt / "config.yml").read_text())["sliding_window_width"] == 6


def test_padded_vocabulary_rows_are_zeros_and_dropped_on_export(tmp_path):
    hf = make_hf(tmp_path / "hf", "llama_gqa_untied")
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt", make_vocab_size_divisible_by=64)
    weights = load_file(ckpt / "global_step0" / "model.safetensors")
    for name in ("embedding.word_embeddings.weight", "lm_head.weight"):
        assert weights[name].shape[0] == 128
        assert torch.count_nonzero(weights[name][VOCAB:]) == 0
    with torch.no_grad():
        got = strata_model(ckpt)(tokens())
        torch.testing.assert_close(got[..., :VOCAB], hf(tokens()).logits, atol=1e-5, rtol=1e-5)
    out, _ = convert_neox_to_hf(ckpt, [ckpt / "config.yml"], tmp_path / "back", dtype="bf16")
    exported, original = hf_weights(out), hf_weights(tmp_path / "hf")
    assert exported["lm_head.weight"].shape[0] == VOCAB
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _as_bin(hf: Path, shards: int) -> None:
    """Replace model.safetensors by PyTorch .bin weights (with an index when sharded)."""
    weights = hf_weights(hf)
    (hf / "model.safetensors").unlink()
    if shards == 1:
        torch.save(weights, hf / "pytorch_model.bin")
        return
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: weights[n] for n in names[i::shards]}
        torch.save(part, hf / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _as_sharded_safetensors(hf: Path, model) -> None:
    (hf / "model.safetensors").unlink()
    model.save_pretrained(hf, max_shard_size="100KB")


WEIGHT_FORMATS = {
    "sharded safetensors": _as_sharded_safetensors,
    "bin": lambda hf, model: _as_bin(hf, 1),
    "sharded bin": lambda hf, model: _as_bin(hf, 3),
}


@pytest.mark.parametrize("fmt", sorted(WEIGHT_FORMATS))
def test_weight_file_formats_and_sharded_export(tmp_path, fmt):
    model = make_hf(tmp_path / "hf", "llama_gqa_untied")
    reference = convert_hf_to_neox(tmp_path / "hf", tmp_path / "reference")
    original = hf_weights(tmp_path / "hf")
    WEIGHT_FORMATS[fmt](tmp_path / "hf", model)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    want = load_file(reference / "global_step0" / "model.safetensors")
    got = load_file(ckpt / "global_step0" / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)

    out, _ = convert_neox_to_hf(ckpt, [ckpt / "config.yml"], tmp_path / "back", max_shard_gb=1e-4)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in original.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_config_out_and_generated_keys(tmp_path):
    make_hf(tmp_path / "hf", "llama_gqa_tied")
    config_out = tmp_path / "model.yml"
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt", config_out=config_out)
    assert config_out.read_text() == (ckpt / "config.yml").read_text()
    values = yaml.safe_load(config_out.read_text())
    assert values["num_kv_heads"] == 2 and values["norm"] == "rmsnorm"
    assert values["activation"] == "swiglu" and values["no_weight_tying"] is False
    assert values["tokenizer_type"] == "HFTokenizer"
    assert values["vocab_file"] == str((tmp_path / "hf" / "tokenizer.json").resolve())
    args = model_args([config_out])
    assert args.padded_vocab_size == VOCAB and args.ffn_hidden_size == 96
    metadata = json.loads((ckpt / "global_step0" / "metadata.json").read_text())
    assert metadata["weights_only"] is True and (ckpt / "latest").read_text() == "global_step0"
    assert (ckpt / "global_step0" / "configs" / "config.yml").is_file()


def test_folder_without_tokenizer_converts_weights_and_config(tmp_path, capsys):
    """A training run's export (weights and config.json only): converted, tokenizer left to
    set, and a line says so."""
    make_hf(tmp_path / "hf", "llama_gqa_untied")
    reference = convert_hf_to_neox(tmp_path / "hf", tmp_path / "reference")
    (tmp_path / "tok").mkdir()
    tokenizer = (tmp_path / "hf" / "tokenizer.json").rename(tmp_path / "tok" / "tokenizer.json")
    capsys.readouterr()
    code = hf_to_neox_main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    assert code == 0 and "has no tokenizer.json" in out and "tokenizer is left to set" in out
    ckpt = tmp_path / "ckpt"
    text = (ckpt / "config.yml").read_text()
    values = yaml.safe_load(text)
    assert "tokenizer_type" not in values and "vocab_file" not in values
    assert "set tokenizer_type and vocab_file" in text
    want = load_file(reference / "global_step0" / "model.safetensors")
    got = load_file(ckpt / "global_step0" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    # With the tokenizer set, the checkpoint loads and gives transformers' logits.
    values.update(tokenizer_type="HFTokenizer", vocab_file=str(tokenizer))
    model = strata_model(ckpt, Path(write_config(tmp_path / "model.yml", values)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens())[..., :VOCAB], hf(tokens()).logits, atol=1e-5, rtol=1e-5
        )


def test_conversion_builds_the_model_from_its_keys_alone(tmp_path, monkeypatch):
    """Neither converter builds a training config (NeoXArgs): the model is a ModelConfig read
    from the model and tokenizer keys."""

    def refused(*args, **kwargs):
        raise AssertionError("a conversion built a NeoXArgs")

    monkeypatch.setattr(NeoXArgs, "_build", refused)
    make_hf(tmp_path / "hf", "llama_gqa_tied")
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    out, _ = convert_neox_to_hf(ckpt, [ckpt / "config.yml"], tmp_path / "back")
    assert sorted(hf_weights(out)) == sorted(hf_weights(tmp_path / "hf"))
    config = read_model([ckpt / "config.yml"]).config
    assert isinstance(config, ModelConfig)
    assert config.padded_vocab_size == VOCAB and config.ffn_hidden_size == 96
    assert config.num_kv_heads == 2 and config.attention_backends == ("sdpa", "sdpa")
    with pytest.raises(ConfigError, match="key 'num_layers' \\(from here\\): expected int"):
        ModelConfig.from_neox_keys({"num_layers": "two"}, VOCAB, "here")


def test_weights_only_checkpoint_loads_without_optimizer_state(tmp_path):
    make_hf(tmp_path / "hf", "gpt_neox_parallel")
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    args = model_args([ckpt / "config.yml"])
    args.load = str(ckpt)
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match="weights only.*finetune: true"):
        load_checkpoint(args, model, optimizer, None, load_optimizer=True)
    # no_load_optim (RNG requested but absent from a weights-only checkpoint) and finetune
    for load_rng in (True, False):
        metadata = load_checkpoint(args, model, optimizer, None, False, load_rng)
        assert metadata["iteration"] == 0
    weights = load_file(ckpt / "global_step0" / "model.safetensors")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name


def test_finetune_from_converted_checkpoint_through_the_launcher(tmp_path):
    make_hf(tmp_path / "hf", "llama_gqa_untied")
    ckpt = convert_hf_to_neox(tmp_path / "hf", tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, VOCAB, (200,), generator=gen).tolist() for _ in range(8)]
    data = write_dataset(tmp_path / "data" / "tokens", docs)
    setup = write_config(
        tmp_path / "setup.yml",
        {
            "data_path": data,
            # lr so small that one step leaves the weights equal to 1e-6
            "optimizer": {"type": "Adam", "params": {"lr": 1.0e-9}},
            "min_lr": 1.0e-10,
            "train_micro_batch_size_per_gpu": 2,
            "train_iters": 1,
            "num_gpus": 1,
            "seq_length": SEQ,
            "split": "100,0,0",
            "load": str(ckpt),
            "finetune": True,
            "save": str(tmp_path / "run"),
            "log_dir": str(tmp_path / "logs"),
        },
    )
    config = tmp_path / "model.yml"
    values = yaml.safe_load((ckpt / "config.yml").read_text())
    values.pop("seq_length")
    write_config(config, values)
    result = run_tool("deepy.py", "train.py", str(config), setup)
    assert "weights only: finetune" in result.stdout + result.stderr
    converted = load_file(ckpt / "global_step0" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "global_step1" / "model.safetensors")
    assert sorted(trained) == sorted(converted)
    for name, tensor in converted.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-6, rtol=0)


NATIVE = {  # a Strata config with no Hugging Face origin (Llama-style: exported as llama)
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "seq_length": 32,
    "max_position_embeddings": 32,
    "pos_emb": "rotary",
    "norm": "rmsnorm",
    "activation": "swiglu",
    "intermediate_size": 96,
    "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False,
    "no_weight_tying": True,
}


@pytest.mark.parametrize("tokenizer", ["bytes", "GPT2BPETokenizer"])
def test_strata_trained_model_exports(tmp_path, request, tokenizer):
    values = {**NATIVE, "tokenizer_type": tokenizer}
    if tokenizer == "GPT2BPETokenizer":
        assets = request.getfixturevalue("assets")
        values["vocab_file"] = str(assets / "tokenizers" / "gpt2-vocab.json")
        values["merge_file"] = str(assets / "tokenizers" / "gpt2-merges.txt")
    config = Path(write_config(tmp_path / "native.yml", values))
    args = model_args([config])
    torch.manual_seed(1)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_weights_checkpoint(tmp_path / "ckpt", dict(model.named_parameters()))

    out, note = convert_neox_to_hf(tmp_path / "ckpt", [config], tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    from megatron.tokenizer import build_tokenizer

    strata_tokenizer = build_tokenizer(tokenizer, args.vocab_file, args.merge_file)
    vocab = strata_tokenizer.vocab_size
    assert hf.config.vocab_size == vocab < args.padded_vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[..., :vocab], atol=1e-5, rtol=1e-5)
    if tokenizer == "bytes":
        assert "no tokenizer files were written" in note
        assert not (out / "tokenizer.json").exists()
    else:
        text = "Hello world, the capital of France"
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        assert hf_tokenizer(text)["input_ids"] == strata_tokenizer.tokenize(text)
        assert hf.generation_config.eos_token_id == strata_tokenizer.eod


def test_smollm2_logits_and_greedy_generation(tmp_path, smollm2_hf):
    ckpt = convert_hf_to_neox(smollm2_hf, tmp_path / "ckpt")
    model = strata_model(ckpt)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        for _ in range(2):  # greedy over the whole context
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokenizer.decode(ids[0, -2:]).startswith(" Paris")


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(Hugging Face folder, its converted checkpoint) for the error tests; never modified."""
    root = tmp_path_factory.mktemp("converted")
    make_hf(root / "hf", "llama_gqa_untied")
    return root / "hf", convert_hf_to_neox(root / "hf", root / "ckpt")


def _copy_hf(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _edit_weights(hf: Path, drop: str | None = None, **replace: torch.Tensor) -> None:
    weights = hf_weights(hf)
    if drop:
        del weights[drop]
    weights.update({name.replace("__", "."): t for name, t in replace.items()})
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})


HF_ERRORS = {
    "unsupported architecture": (
        lambda hf: _edit_config(hf, architectures=["GPT2LMHeadModel"]),
        "architecture 'GPT2LMHeadModel' is not supported",
    ),
    "missing tensor": (
        lambda hf: _edit_weights(hf, drop="model.layers.1.mlp.up_proj.weight"),
        "model.layers.1.mlp.up_proj.weight: missing",
    ),
    "unexpected tensor": (
        lambda hf: _edit_weights(hf, model__layers__0__self_attn__q_norm__weight=torch.ones(16)),
        "model.layers.0.self_attn.q_norm.weight: not part of a LlamaForCausalLM",
    ),
    "misshapen tensor": (
        lambda hf: _edit_weights(
            hf, model__layers__0__self_attn__o_proj__weight=torch.ones(64, 32)
        ),
        "o_proj.weight: gives [64, 32] for layers.0.attention.dense.weight",
    ),
    "tokenizer larger than the model": (
        lambda hf: write_tokenizer(hf / "tokenizer.json", VOCAB + 20),
        "has 120 tokens, more than the model's 100",
    ),
    "no weights": (
        lambda hf: (hf / "model.safetensors").unlink(),
        "no weights found",
    ),
}


@pytest.mark.parametrize("problem", sorted(HF_ERRORS))
def test_hf_to_neox_bad_input(tmp_path, converted, capsys, problem):
    edit, message = HF_ERRORS[problem]
    hf = _copy_hf(converted[0], tmp_path / "inputs" / "hf")
    edit(hf)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    code = hf_to_neox_main(["--input", str(hf), "--output", str(out_parent / "ckpt")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err, err
    assert folder_listing(out_parent) == []


def _neox_config(ckpt: Path, folder: Path, **changes) -> Path:
    values = yaml.safe_load((ckpt / "config.yml").read_text())
    values.update(changes)
    return Path(write_config(folder / "model.yml", values))


def _bigger_tokenizer(ckpt: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    write_tokenizer(folder / "tokenizer.json", VOCAB + 20)
    return _neox_config(ckpt, folder, vocab_file=str(folder / "tokenizer.json"))


NEOX_ERRORS = {
    "config shapes differ from the checkpoint": (
        lambda ckpt, folder: _neox_config(ckpt, folder, intermediate_size=3 * 128),
        [],
        "layers.0.mlp.dense_h_to_4h.weight: checkpoint has [192, 64], the config expects [256, 64]",
    ),
    "tokenizer larger than the model": (
        _bigger_tokenizer,
        [],
        "100 vocabulary rows, fewer than the tokenizer's 120 tokens",
    ),
    "architecture cannot express the config": (
        lambda ckpt, folder: _neox_config(ckpt, folder),
        ["--architecture", "gpt_neox"],
        "norm 'rmsnorm': gpt_neox uses layernorm",
    ),
    "bad config key": (
        lambda ckpt, folder: _neox_config(ckpt, folder, num_layerz=3),
        [],
        "unknown key 'num_layerz'",
    ),
}


@pytest.mark.parametrize("problem", sorted(NEOX_ERRORS))
def test_neox_to_hf_bad_input(tmp_path, converted, capsys, problem):
    make_config, extra, message = NEOX_ERRORS[problem]
    config = make_config(converted[1], tmp_path / "inputs")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    argv = ["--input", str(converted[1]), "--config", str(config), "--output"]
    code = neox_to_hf_main([*argv, str(out_parent / "hf"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and message in err, err
    assert folder_listing(out_parent) == []


def test_existing_outputs_are_never_overwritten(tmp_path, converted, capsys):
    hf, ckpt = converted
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert hf_to_neox_main(["--input", str(hf), "--output", str(tmp_path / "taken")]) == 1
    argv = ["--input", str(ckpt), "--config", str(ckpt / "config.yml")]
    assert neox_to_hf_main([*argv, "--output", str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.count("output already exists") == 2
    assert folder_listing(tmp_path / "taken") == ["keep.txt"]
    assert folder_listing(tmp_path) == ["taken"]


def test_command_line_tools_exit_1_with_an_error_line(tmp_path, converted):
    """As scripts: a bad input is one `error:` line on stderr and exit status 1 (the
    successful paths run in-process above)."""
    hf, ckpt = converted
    bad = _copy_hf(hf, tmp_path / "bad")
    _edit_config(bad, architectures=["BertModel"])
    result = run_tool(
        "tools/ckpts/convert_hf_to_neox.py",
        *("--input", str(bad), "--output", str(tmp_path / "x")),
        check=False,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    result = run_tool(
        "tools/ckpts/convert_neox_to_hf.py",
        *("--input", str(tmp_path / "nowhere"), "--config", str(ckpt / "config.yml")),
        *("--output", str(tmp_path / "y")),
        check=False,
    )
    assert result.returncode == 1 and "error: " in result.stderr, result.stderr
    assert "does not exist" in result.stderr
    assert folder_listing(tmp_path) == ["bad"]


def test_neox_to_hf_exports_the_chosen_iteration(tmp_path, converted, capsys):
    """`--iteration N` (or the config's NeoX `iteration` key) exports global_step{N} instead of
    the step `latest` names; a step that is not there is an error naming the ones that are."""
    hf, source = converted
    ckpt = tmp_path / "ckpt"
    step0 = load_file(source / "global_step0" / "model.safetensors")
    config_text = (source / "config.yml").read_text()
    save_weights_checkpoint(ckpt, step0, {"config.yml": config_text}, iteration=0)
    save_weights_checkpoint(ckpt, {n: t * 2 for n, t in step0.items()}, None, iteration=5)
    assert (ckpt / "latest").read_text().strip() == "global_step5"
    config = source / "config.yml"
    name = "model.layers.0.mlp.up_proj.weight"
    original = hf_weights(hf)[name]

    out, _ = convert_neox_to_hf(ckpt, [config], tmp_path / "latest")
    assert torch.equal(hf_weights(out)[name], original * 2)
    out, _ = convert_neox_to_hf(ckpt, [config], tmp_path / "flag", iteration=0)
    assert torch.equal(hf_weights(out)[name], original)
    with_key = write_config(tmp_path / "inputs" / "iteration.yml", {"iteration": 0})
    out, _ = convert_neox_to_hf(ckpt, [config, with_key], tmp_path / "key")
    assert torch.equal(hf_weights(out)[name], original)

    argv = ["--input", str(ckpt), "--config", str(config), "--output", str(tmp_path / "no")]
    assert neox_to_hf_main([*argv, "--iteration", "3"]) == 1
    err = capsys.readouterr().err
    assert "iteration 3" in err and "global_step0, global_step5" in err, err
    assert not (tmp_path / "no").exists()
