"""Generation throughput: Strata's KV-cached decoding against transformers' `generate` on the
same weights, in the same process and the same run.

    .venv/bin/python benchmarks/generate.py [--hf-dir DIR | --random-shape pythia-410m]
        [--device cpu|cuda] [--new-tokens 64] [--batch-sizes 1 8] [--dtype fp32|bf16]
        [--repeats 5] [--threads N]

The real SmolLM2-135M-Instruct weights come from --hf-dir (a Hugging Face folder, e.g. the test
suite's cached one under .cache/test-assets/) or, by default, from the GGUF file in
$STRATA_ASSETS/models, turned into a Hugging Face folder with tools/ckpts/gguf_to_hf.py. Where
that file cannot go (a lent GPU gets 64 MiB of files), --random-shape builds a GPTNeoXForCausalLM
of a Pythia shape with random weights and the GPT-NeoX-20B tokenizer from $STRATA_ASSETS (decode
speed does not depend on the values). Batches above the 8 prompts repeat them. The
folder is converted to a Strata checkpoint with tools/ckpts/convert_hf_to_neox.py; both sides
then decode greedily from the same token ids (left-padded prompts of different lengths at batch
sizes above 1) for exactly --new-tokens tokens (no stop token). Before timing, the benchmark
checks that both produce the same greedy tokens at batch 1 (fp32 only: in bf16 near-ties may
flip an argmax, so the match is reported, not required). Rounds alternate which side
runs first; tokens/s is new tokens over the median wall time of a full generate call (prefill
included). Prints one JSON object; timings are reported, never checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint.load import load_checkpoint
from megatron.conversion.strata_io import model_args
from megatron.model import GPTModel, ModelConfig
from megatron.text_generation import generate_batch
from megatron.tokenizer import build_tokenizer
from tools.ckpts.convert_hf_to_neox import CONFIG_NAME, convert_hf_to_neox
from tools.ckpts.gguf_to_hf import gguf_to_hf

GGUF_NAME = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "A haiku about autumn:",
    "The most important rule of writing clean code is",
]

Decoder = Callable[[list[list[int]]], list[list[int]]]

# Pythia shapes (GPT-NeoX architecture) for --random-shape: layers, hidden, heads.
PYTHIA_SHAPES = {
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
}
NEOX_TOKENIZER = "tokenizers/gpt-neox-20b-pii-special.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, help="SmolLM2 Hugging Face folder")
    parser.add_argument(
        "--random-shape", choices=sorted(PYTHIA_SHAPES), help="random weights of a Pythia shape"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batch-sizes must be at least 1")
    if args.hf_dir and args.random_shape:
        parser.error("--hf-dir and --random-shape are alternatives")
    return args


def assets_dir() -> Path:
    assets = os.environ.get("STRATA_ASSETS")
    if not assets:
        raise SystemExit("error: set STRATA_ASSETS (the model and tokenizer files are there)")
    return Path(assets)


def smollm2_folder(hf_dir: Path | None, scratch: Path) -> Path:
    if hf_dir is not None:
        if not (hf_dir / "config.json").is_file():
            raise SystemExit(f"error: --hf-dir {hf_dir} has no config.json")
        return hf_dir
    return gguf_to_hf(assets_dir() / GGUF_NAME, scratch / "hf")


def random_pythia_folder(shape: str, scratch: Path) -> Path:
    """A Hugging Face folder: GPTNeoXForCausalLM of a Pythia shape with seeded random weights
    (bf16) and the GPT-NeoX-20B tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    layers, hidden, heads = PYTHIA_SHAPES[shape]
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = scratch / "hf"
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    shutil.copyfile(assets_dir() / NEOX_TOKENIZER, folder / "tokenizer.json")
    return folder


def load_strata(hf_dir: Path, scratch: Path, dtype: torch.dtype) -> tuple[GPTModel, Any]:
    """Convert the HF folder to a Strata checkpoint and load it as generate.py does."""
    ckpt = convert_hf_to_neox(hf_dir, scratch / "strata")
    args = model_args([ckpt / CONFIG_NAME], load=str(ckpt))
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    load_checkpoint(args, model, None, None, load_rng=False)
    return model.to(dtype), args


def load_hf(hf_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    # The folder is the one this benchmark exported: no code of its own to run.
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, trust_remote_code=False
    ).eval()
    model.generation_config.eos_token_id = None  # decode exactly --new-tokens, as Strata does
    return model


def strata_generator(model: GPTModel, seq_length: int, new_tokens: int, tokenizer: Any) -> Decoder:
    def run(prompts: list[list[int]]) -> list[list[int]]:
        results = generate_batch(
            model, prompts, new_tokens, seq_length, tokenizer.vocab_size, pad_id=tokenizer.pad
        )
        return [r.tokens for r in results]

    return run


def hf_generator(model: Any, new_tokens: int, pad: int) -> Decoder:
    @torch.no_grad()
    def run(prompts: list[list[int]]) -> list[list[int]]:
        longest = max(map(len, prompts))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor(
            [[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
        )
        if out.shape[1] != longest + new_tokens:
            raise SystemExit(f"error: transformers stopped after {out.shape[1] - longest} tokens")
        return out[:, longest:].tolist()

    return run


def timed(run: Decoder, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = run(prompts)
    return time.perf_counter() - start, tokens


def measure(
    sides: dict[str, Decoder], prompts: list[list[int]], repeats: int, new_tokens: int
) -> dict[str, Any]:
    """Median tokens/s of each side over `repeats` rounds (order alternating), after a warm-up."""
    outputs = {name: run(prompts) for name, run in sides.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            elapsed, outputs[name] = timed(sides[name], prompts)
            seconds[name].append(elapsed)
    generated = len(prompts) * new_tokens
    result: dict[str, Any] = {
        f"{name}_tokens_per_sec": round(generated / statistics.median(s), 2)
        for name, s in seconds.items()
    }
    result["ratio_strata_over_hf"] = round(
        result["strata_tokens_per_sec"] / result["hf_transformers_tokens_per_sec"], 3
    )
    same = sum(a == b for a, b in zip(outputs["strata"], outputs["hf_transformers"]))
    result["greedy_rows_identical"] = f"{same}/{len(prompts)}"
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="strata-genbench-") as tmp:
        scratch = Path(tmp)
        if args.random_shape:
            hf_dir = random_pythia_folder(args.random_shape, scratch)
        else:
            hf_dir = smollm2_folder(args.hf_dir, scratch)
        strata_model, strata_args = load_strata(hf_dir, scratch, dtype)
        hf_model = load_hf(hf_dir, dtype)
        tokenizer = build_tokenizer("HFTokenizer", str(strata_args.vocab_file))
    strata_model, hf_model = strata_model.to(args.device), hf_model.to(args.device)
    prompts = [tokenizer.tokenize(PROMPTS[i % len(PROMPTS)]) for i in range(max(args.batch_sizes))]
    sides = {
        "strata": strata_generator(
            strata_model, strata_args.seq_length, args.new_tokens, tokenizer
        ),
        "hf_transformers": hf_generator(hf_model, args.new_tokens, tokenizer.pad),
    }

    ours, theirs = (sides[name](prompts[:1])[0] for name in ("strata", "hf_transformers"))
    if args.dtype == "fp32" and ours != theirs:
        raise SystemExit(f"error: greedy tokens differ at batch 1:\nstrata {ours}\nhf     {theirs}")
    report: dict[str, Any] = {
        "model": f"{args.random_shape} (random weights)"
        if args.random_shape
        else "SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": threads,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "greedy_match_batch1": ours == theirs,
        "sample_batch1": tokenizer.detokenize(ours),
    }
    for batch in args.batch_sizes:
        report[f"batch{batch}"] = measure(sides, prompts[:batch], args.repeats, args.new_tokens)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
