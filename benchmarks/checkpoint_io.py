"""Checkpoint save and load time: Strata's streaming layout-free checkpoint against torch.save /
torch.load of the same model and optimizer state dicts, in the same process and the same run.

    .venv/bin/python benchmarks/checkpoint_io.py [--layers 14] [--hidden 768] [--repeats 3]

Builds a GPT model of about 100M parameters on the CPU (fp32, AdamW with its moments created),
then times save_checkpoint / load_checkpoint (model, optimizer moments, scheduler, RNG and
metadata) and torch.save / torch.load + load_state_dict of {model, optimizer}. Reports the
median seconds of --repeats rounds, the ratios Strata / torch, the bytes written and the growth
of the process's peak resident memory during Strata's first save (the streaming writer holds
about one parameter). Prints one JSON object; timings are reported, never checked.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron.checkpointing import load_checkpoint, save_checkpoint, tag_for
from megatron.config import NeoXArgs
from megatron.model import GPTModel, ModelConfig


def build(layers: int, hidden: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    args = NeoXArgs.from_dict(
        {
            "num_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": hidden // 64,
            "seq_length": 128,
            "max_position_embeddings": 128,
            "pos_emb": "rotary",
            "tokenizer_type": "bytes",
            "train_micro_batch_size_per_gpu": 1,
            "train_iters": 1,
        }
    )
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step creates the moments
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    model, optimizer = build(options.layers, options.hidden)
    params = sum(p.numel() for p in model.parameters())
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_args = SimpleNamespace(
            save=f"{tmp}/strata", load=f"{tmp}/strata", config_files={}, zero_stage=0
        )
        torch_file = Path(tmp) / "torch.pt"
        rss_before = peak_rss_mb()
        results: dict[str, list[float]] = {key: [] for key in ("strata", "torch")}
        loads: dict[str, list[float]] = {key: [] for key in ("strata", "torch")}
        rss_growth = None
        for _ in range(options.repeats):
            results["strata"].append(
                timed(lambda: save_checkpoint(ckpt_args, 1, model, optimizer, None, {}))
            )
            if rss_growth is None:
                rss_growth = peak_rss_mb() - rss_before
            results["torch"].append(
                timed(
                    lambda: torch.save(
                        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                        torch_file,
                    )
                )
            )
            loads["strata"].append(
                timed(lambda: load_checkpoint(ckpt_args, model, optimizer, None))
            )

            def torch_load() -> None:
                state = torch.load(torch_file, weights_only=True)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])

            loads["torch"].append(timed(torch_load))
        strata_bytes = folder_bytes(Path(tmp) / "strata" / tag_for(1))
        torch_bytes = torch_file.stat().st_size
    # The round trips leave the weights as they were.
    unchanged = all(torch.equal(p, reference[name]) for name, p in model.named_parameters())
    save = {key: statistics.median(values) for key, values in results.items()}
    load = {key: statistics.median(values) for key, values in loads.items()}
    print(
        json.dumps(
            {
                "parameters": params,
                "strata_save_s": round(save["strata"], 3),
                "torch_save_s": round(save["torch"], 3),
                "save_ratio_strata_over_torch": round(save["strata"] / save["torch"], 3),
                "strata_load_s": round(load["strata"], 3),
                "torch_load_s": round(load["torch"], 3),
                "load_ratio_strata_over_torch": round(load["strata"] / load["torch"], 3),
                "strata_bytes": strata_bytes,
                "torch_bytes": torch_bytes,
                "peak_rss_growth_first_strata_save_mb": round(rss_growth or 0.0, 1),
                "parameter_mb_largest": round(
                    max(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1
                ),
                "weights_unchanged_after_round_trips": unchanged,
                "repeats": options.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
