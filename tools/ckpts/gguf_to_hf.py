"""Turn a GGUF model file into a plain Hugging Face directory (config, safetensors, tokenizer).

transformers dequantises GGUF weights on load (and undoes llama.cpp's rotary row order); this
copies them into a freshly built model of the same class so the result is an ordinary
`save_pretrained` folder that Strata's converters read.

    python tools/ckpts/gguf_to_hf.py --input model.gguf --output HF_DIR [--dtype fp32|bf16] \
        [--trust-remote-code]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.cli import exit_status
from megatron.utils import staged_folder

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def gguf_to_hf(
    gguf_file: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> Path:
    """Write the HF directory `output` (atomically: built next to it, then renamed); Python code
    in the GGUF file's folder runs only with `trust_remote_code`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, output = Path(gguf_file), Path(output)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    if output.exists():
        raise FileExistsError(f"output already exists: {output}")
    torch_dtype = getattr(torch, DTYPES[dtype])
    folder, name = str(gguf_file.parent), gguf_file.name
    trust = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    config = AutoConfig.from_pretrained(folder, gguf_file=name, **trust)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch_dtype, **trust
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **trust)
    # A fresh model of the same class holds plain tensors: no GGUF-specific state survives.
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no tensor of its own in the state dict; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{gguf_file}: state dict mismatch: missing {missing}, unexpected {unexpected}"
        )
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    with staged_folder(output) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the .gguf file")
    parser.add_argument("--output", required=True, help="the HF directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run Python code from the input's folder (off by default)",
    )
    args = parser.parse_args(argv)

    def work() -> int | None:
        out = gguf_to_hf(args.input, args.output, args.dtype, args.trust_remote_code)
        print(f"wrote {out}")
        return 0

    return exit_status(work, (FileNotFoundError, FileExistsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
