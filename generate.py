"""Sample text from a checkpoint: `python deepy.py generate.py CONFIG.yml load=DIR`."""

import sys

from megatron.checkpointing import load_checkpoint
from megatron.entry import run_entry_point
from megatron.initialize import device, initialize_megatron
from megatron.model import GPTModel
from megatron.text_generation import generate_tokens
from megatron.tokenizer import build_tokenizer


def main(args) -> None:
    if not args.load:
        raise FileNotFoundError("load: generate.py needs a checkpoint directory (load=DIR)")
    if args.text_gen_type not in (None, "unconditional"):
        raise NotImplementedError(
            f"text_gen_type {args.text_gen_type!r}: only unconditional for now"
        )
    initialize_megatron(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)
    model = GPTModel(args).to(device()).eval()
    load_checkpoint(args, model, None, None)
    for i in range(args.num_samples or 1):
        ids = generate_tokens(
            model,
            [tokenizer.eod],
            args.maximum_tokens,
            args.seq_length,
            tokenizer.vocab_size,
            tokenizer.eod,
            args.temperature,
            args.top_k,
            args.top_p,
        )
        print(f"--- sample {i} ({len(ids)} tokens) ---\n{tokenizer.detokenize(ids)}", flush=True)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
