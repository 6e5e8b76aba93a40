"""Text generation: sampling filters, KV-cached and batched decoding, and generate.py's modes
through the real launcher on a tiny trained checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _config_fixtures import small_config, write_config
from _model_fixtures import make_args
from conftest import REPO, run_tool

from megatron.model import GPTModel, ModelConfig
from megatron.text_generation import filter_logits, generate_batch, sample_next_token

pytestmark = pytest.mark.timeout(600)

VOCAB = 100  # sampled vocabulary; the model's padded vocabulary is 128
PROMPTS = [[5, 17, 3, 99, 42, 8, 61], [12], [7, 7, 30, 2]]


def tiny_model(**overrides) -> GPTModel:
    """A random model whose greedy continuations vary (untied head, wide init)."""
    settings = dict(no_weight_tying=True, init_method_std=0.3, seq_length=32)
    args = make_args(**{**settings, **overrides})
    torch.manual_seed(0)
    return GPTModel(ModelConfig.from_neox(args)).eval()


def greedy(model: GPTModel, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    results = generate_batch(model, prompts, 12, 32, VOCAB, **kwargs)
    return [r.tokens for r in results]


# --- sampling parameters on fixed logits ---


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, False, True]]
    assert torch.isfinite(filter_logits(logits, top_k=0)).all()


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.4, [True, False, False, False]),
        (0.7, [True, True, False, False]),
        (0.9, [True, True, True, False]),
        (0.0, [True, True, True, True]),
        (1.0, [True, True, True, True]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus_past_the_threshold(top_p, expected):
    # Probabilities 0.5, 0.3, 0.15, 0.05, listed out of order to exercise the sort.
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=top_p))[0]
    order = [1, 3, 0, 2]  # most to least likely
    assert kept[order].tolist() == expected


def test_top_k_and_top_p_combine():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_k=3, top_p=0.9))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_k=1, top_p=0.9))
    assert kept.tolist() == [[True, False, False, False]]


def test_greedy_is_argmax_of_the_unpadded_vocabulary():
    logits = torch.tensor([[0.0, 2.0, 1.0, 9.0], [3.0, 0.0, 1.0, 9.0]])  # column 3 is padding
    assert sample_next_token(logits, 0.0, 0, 0.0, vocab_size=3).tolist() == [1, 0]


def test_sampling_draws_only_from_the_filtered_set():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.9, 3.8, -1.0, 50.0]]).repeat(2000, 1)  # last entry = padding
    drawn = sample_next_token(logits, 1.0, 2, 0.0, vocab_size=4, generator=gen)
    counts = torch.bincount(drawn, minlength=5).tolist()
    assert counts[2:] == [0, 0, 0] and min(counts[:2]) > 800


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)

    def share_of_first(temperature: float) -> float:
        gen = torch.Generator().manual_seed(1)
        drawn = sample_next_token(logits, temperature, 0, 0.0, 2, generator=gen)
        return (drawn == 0).float().mean().item()

    expected_at_1 = 1 / (1 + math.exp(-1))  # 0.73
    assert abs(share_of_first(1.0) - expected_at_1) < 0.03
    assert share_of_first(0.2) > 0.98
    assert abs(share_of_first(100.0) - 0.5) < 0.04


# --- decoding on a tiny random model ---


def naive_greedy(model: GPTModel, prompt: list[int], steps: int) -> list[int]:
    """The reference: recompute the whole context, take the argmax, append."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))[0, -1, :VOCAB]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 2}, {"pos_emb": "learned"}],
    ids=["mha", "gqa", "learned-positions"],
)
def test_cached_generation_equals_recomputed(overrides):
    model = tiny_model(**overrides)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _, inputs: calls.append(inputs[0].shape[1]))
    cached = greedy(model, PROMPTS, use_cache=True)
    assert calls == [7] + [1] * 11  # prefill the longest prompt, then one token per step
    assert cached == greedy(model, PROMPTS, use_cache=False)
    with torch.no_grad():
        assert cached == [naive_greedy(model, p, 12) for p in PROMPTS]
    assert len({tuple(t) for t in cached}) == len(PROMPTS)  # the continuations differ


def test_logits_to_keep_returns_the_last_positions():
    model = tiny_model()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=2), model(ids)[:, -2:])


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
def test_batch_equals_one_by_one(use_cache):
    model = tiny_model()
    batched = greedy(model, PROMPTS, use_cache=use_cache)
    alone = [greedy(model, [p], use_cache=use_cache)[0] for p in PROMPTS]
    assert batched == alone
    # Order in the batch does not matter either.
    assert greedy(model, PROMPTS[::-1], use_cache=use_cache) == batched[::-1]


def test_stops_at_a_stop_token():
    model = tiny_model()
    free = generate_batch(model, PROMPTS, 12, 32, VOCAB)
    assert all(len(r.tokens) == 12 and not r.finished for r in free)
    stop = free[0].tokens[4]
    first = free[0].tokens.index(stop)
    stopped = generate_batch(model, PROMPTS, 12, 32, VOCAB, stop_tokens=(stop,))
    assert stopped[0].finished and stopped[0].tokens == free[0].tokens[:first]
    for before, after in zip(free[1:], stopped[1:]):  # other rows run on unaffected
        cut = before.tokens.index(stop) if stop in before.tokens else len(before.tokens)
        assert after.tokens == before.tokens[:cut]
        assert after.finished == (stop in before.tokens)


@pytest.mark.parametrize("pos_emb", ["rotary", "learned"])
def test_generation_ends_at_seq_length(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    prompts = [[1] * 28, [2] * 3]
    results = generate_batch(model, prompts, 12, 32, VOCAB)
    assert [len(r.tokens) for r in results] == [4, 12]
    assert [r.tokens for r in results] == [greedy(model, [p])[0] for p in prompts]
    with pytest.raises(ValueError, match="prompt 0 has 32 tokens"):
        generate_batch(model, [[1] * 32], 12, 32, VOCAB)


def test_seeded_sampling_is_reproducible():
    model = tiny_model()

    def sample(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        results = generate_batch(
            model, PROMPTS, 12, 32, VOCAB, temperature=1.0, top_p=0.9, generator=gen
        )
        return [r.tokens for r in results]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_return_logits_gives_one_row_per_token():
    model = tiny_model()
    (result,) = generate_batch(model, [PROMPTS[0]], 5, 32, VOCAB, return_logits=True)
    assert len(result.logits) == 5 and all(len(row) == VOCAB for row in result.logits)
    assert [max(range(VOCAB), key=row.__getitem__) for row in result.logits] == result.tokens


# --- generate.py ---


def generate_entry():
    """generate.py as a module (it is a script at the repository root)."""
    spec = importlib.util.spec_from_file_location("generate_entry", REPO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_batches_prompts_and_cuts_long_ones():
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("bytes")
    model = tiny_model(padded_vocab_size=384)
    settings = dict(seq_length=32, maximum_tokens=8, temperature=0.0, top_k=0, top_p=0.0)
    args = SimpleNamespace(
        **settings, train_micro_batch_size_per_gpu=2, recompute=False, return_logits=True, seed=1
    )
    args.stop_tokens, args.apply_chat_template = None, False
    records = generate_entry().Sampler(args, model, tokenizer).complete(["x" * 40, "hi", ""])
    assert [r["context"] for r in records] == ["x" * 40, "hi", ""]
    assert (
        records[0]["message"] == "context has 40 tokens, seq_length is 32: kept its last 24 tokens"
    )
    assert [r["message"] for r in records[1:]] == [None, None]
    contexts = [[ord("x")] * 24, list(b"hi"), [tokenizer.eod]]
    for record, context in zip(records, contexts):
        (expected,) = generate_batch(model, [context], 8, 32, 257, stop_tokens=(256,))
        assert record["text"] == tokenizer.detokenize(expected.tokens)
        assert record["length"] == len(expected.tokens) == len(record["logits"])
    # The first two rows shared a batch and so its duration.
    assert records[0]["duration_seconds"] == records[1]["duration_seconds"]


def test_sampler_draws_are_seeded():
    from megatron.tokenizer import build_tokenizer

    model = tiny_model(padded_vocab_size=384)
    keys = dict(seq_length=32, maximum_tokens=8, temperature=1.0, top_k=0, top_p=0.0)
    keys.update(train_micro_batch_size_per_gpu=4, recompute=False, return_logits=False)
    keys.update(stop_tokens=None, apply_chat_template=False)

    def texts(seed: int) -> list[str]:
        args = SimpleNamespace(**keys, seed=seed)
        sampler = generate_entry().Sampler(args, model, build_tokenizer("bytes"))
        return [r["text"] for r in sampler.complete(["ab", "cd", "ab"])]

    assert texts(5) == texts(5)
    assert texts(5) != texts(6)


def test_stop_tokens_are_ids_or_strings():
    from megatron.neox_arguments import ConfigError
    from megatron.tokenizer import build_tokenizer

    split_stops = generate_entry().split_stops
    tokenizer = build_tokenizer("bytes")
    # an id, a one-token string (an id too) and a longer string (matched in the text)
    assert split_stops([65, "B", "xyz"], tokenizer) == ({256, 65, 66}, ["xyz"])
    for bad, message in ((300, "token id 300 is outside"), ("", "non-empty strings")):
        with pytest.raises(ConfigError, match=message):
            split_stops([bad], tokenizer)


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_hf, tmp_path_factory) -> Path:
    from tools.ckpts.convert_hf_to_neox import convert_hf_to_neox

    return convert_hf_to_neox(smollm2_hf, tmp_path_factory.mktemp("smollm2") / "ckpt")


def smollm2_generate(ckpt: Path, folder: Path, prompt: str, *overrides: str) -> dict:
    """generate.py on the converted model's own config, with no training keys added."""
    (folder / "prompt.txt").write_text(prompt + "\n")
    out = folder / "out.jsonl"
    run_tool(
        "generate.py",
        str(ckpt / "config.yml"),
        f"load={ckpt}",
        "text_gen_type=input-file",
        f"sample_input_file={folder / 'prompt.txt'}",
        f"sample_output_file={out}",
        "maximum_tokens=24",
        *overrides,
    )
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    return record


def test_smollm2_stops_at_a_stop_string_and_at_end_of_turn(smollm2_ckpt, tmp_path):
    # Greedy: " Paris.\n\nThe answer is: ..." without a stop string.
    record = smollm2_generate(
        smollm2_ckpt, tmp_path, "The capital of France is", "stop_tokens=[' answer is']"
    )
    assert record["finished"] and record["text"] == " Paris.\n\nThe"
    # As a chat turn the instruct model answers and ends its turn with <|im_end|>.
    record = smollm2_generate(
        smollm2_ckpt, tmp_path, "What is the capital of France?", "apply_chat_template=true"
    )
    assert record["finished"] and "Paris" in record["text"]
    assert "<|im_end|>" not in record["text"]


# --- generate.py through deepy.py ---

GEN_KEYS = dict(maximum_tokens=16, train_micro_batch_size_per_gpu=2, seed=11)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_dataset) -> Path:
    """A tiny byte-level model trained for a few steps; returns a config file that loads it.

    One key/value head (shared by tensor-parallel ranks); a vocabulary padded alike at TP 1 and 2.
    """
    run = tmp_path_factory.mktemp("gen")
    values = small_config(
        text_dataset,
        seq_length=64,
        max_position_embeddings=64,
        num_kv_heads=1,
        make_vocab_size_divisible_by=256,
        train_iters=8,
        save=str(run / "ckpt"),
        log_dir=str(run / "logs"),
        split="100,0,0",
    )
    run_tool("deepy.py", "train.py", write_config(run / "train.yml", values))
    return Path(write_config(run / "generate.yml", {**values, "load": str(run / "ckpt")}))


def test_input_file_writes_a_record_per_prompt(trained, tmp_path):
    from megatron.checkpoint.load import load_checkpoint
    from megatron.neox_arguments import NeoXArgs
    from megatron.tokenizer import build_tokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\n\nimport os\n   class Foo:  \n")
    out = tmp_path / "out" / "samples.jsonl"
    overrides = [f"{k}={v}" for k, v in GEN_KEYS.items()]
    result = run_tool(
        "deepy.py",
        "generate.py",
        str(trained),
        *overrides,
        "text_gen_type=input-file",
        f"sample_input_file={prompts}",
        f"sample_output_file={out}",
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["context"] for r in records] == ["def main(", "import os", "class Foo:"]
    for record in records:
        assert set(record) == {
            "context",
            "text",
            "length",
            "finished",
            "message",
            "duration_seconds",
        }
        assert record["length"] == 16 or record["finished"]
        assert record["duration_seconds"] > 0
    assert f"wrote 3 samples to {out}" in result.stdout

    # The file holds what the loaded checkpoint generates greedily, prompt by prompt.
    args = NeoXArgs.from_ymls([str(trained)], overrides)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    load_checkpoint(args, model, None, None, load_rng=False)
    tokenizer = build_tokenizer("bytes")
    for record in records:
        (expected,) = generate_batch(
            model,
            [tokenizer.tokenize(record["context"])],
            16,
            64,
            tokenizer.vocab_size,
            stop_tokens=(tokenizer.eod,),
        )
        assert record["text"] == tokenizer.detokenize(expected.tokens)
        assert record["finished"] == expected.finished


def test_tensor_parallel_sampling_matches_one_process(trained, tmp_path):
    """Two tensor-parallel ranks, each holding half of the one key/value head's channels, sample
    with a KV cache exactly what one process samples from the same seed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\n")
    texts = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.jsonl"
        run_tool(
            "deepy.py",
            "generate.py",
            str(trained),
            *[f"{k}={v}" for k, v in GEN_KEYS.items()],
            f"model_parallel_size={tp}",
            f"num_gpus={tp}",
            "text_gen_type=input-file",
            "temperature=1.0",
            f"sample_input_file={prompts}",
            f"sample_output_file={out}",
        )
        texts[tp] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts[2] == texts[1]
    assert all(len(set(text)) > 4 for text in texts[1])  # sampled, not one repeated byte


def test_interactive_reads_prompts_until_an_empty_line(trained, tmp_path):
    result = run_tool(
        "deepy.py",
        "generate.py",
        str(trained),
        "text_gen_type=interactive",
        "maximum_tokens=8",
        input="import os\nclass A:\n\nnever read\n",
    )
    assert result.stdout.count("--- ") == 2, result.stdout
    assert "tokens, " in result.stdout


def test_unconditional_writes_num_samples(trained, tmp_path):
    out = tmp_path / "uncond.jsonl"
    overrides = ["num_samples=3", "temperature=1.0", "top_k=20", f"sample_output_file={out}"]
    # A direct single-process run (no launcher) reads the config files itself.
    run_tool("generate.py", str(trained), "maximum_tokens=8", *overrides)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["context"] == "" for r in records)
    assert all(0 <= r["length"] <= 8 for r in records)


@pytest.mark.parametrize(
    "override, message",
    [
        ("temperature=-0.5", "temperature must be >= 0"),
        ("top_p=1.5", "top_p must be in [0.0, 1.0]"),
        ("top_k=-1", "top_k must be >= 0"),
        ("maximum_tokens=0", "maximum_tokens must be >= 1"),
        ("num_samples=0", "num_samples must be >= 1"),
        ("prompt_end=''", "prompt_end must be a non-empty separator"),
    ],
)
def test_bad_sampling_parameters_exit_without_writing(tmp_path, override, message):
    out = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "config.yml", small_config(load=str(tmp_path)))
    result = run_tool(
        "deepy.py", "generate.py", config, override, f"sample_output_file={out}", check=False
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "config.yml"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["load={run}/missing"], "error: load: checkpoint directory {run}/missing does not exist"),
        (["text_gen_type=input-file"], "error: text_gen_type='input-file' needs sample_input_file"),
        (["sample_input_file={run}/none.txt"], "error: sample_input_file: cannot read"),
        (["text_gen_type=precompute"], "error: text_gen_type='precompute' is not supported yet"),
        (
            ["iteration=3"],
            "error: load: {run}/ckpt has no checkpoint of iteration 3 (complete ones: "
            "global_step8)",
        ),
    ],
)
def test_missing_inputs_are_clear_errors(trained, capsys, overrides, message):
    """Checked before any model work, so the entry point runs in this process."""
    from megatron.entry import run_entry_point

    run = trained.parent
    argv = [str(trained), *(o.format(run=run) for o in overrides)]
    assert run_entry_point(generate_entry().main, argv) == 1
    assert message.format(run=run) in capsys.readouterr().err


def test_missing_load_exits_non_zero(trained):
    result = run_tool("generate.py", str(trained), "load=null", check=False)
    assert result.returncode == 1
    assert "error: load: generate.py needs a checkpoint directory (load=DIR)" in result.stderr
