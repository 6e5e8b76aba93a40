"""Forward-only pipeline stages (eval.py and generate.py at pipe_parallel_size >= 2): every
rank gets the whole model's logits, equal to GPTModel's, in fp32 and bf16, for plain and
left-padded batches, KV-cache sampling and the harness adapter's scores."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _model_fixtures import make_args, run_on_ranks

from megatron.inference.pipeline import stage_layers
from megatron.model import GPTModel, ModelConfig

STAGES = 2
SEQ = 16


def _outputs(model: torch.nn.Module) -> dict[str, object]:
    """What eval.py and generate.py ask of a model, on fixed inputs."""
    from megatron.evaluation.adapter import StrataLM
    from megatron.text_generation import generate_batch, left_pad, prefill_mask

    torch.manual_seed(1)
    tokens = torch.randint(0, 100, (3, SEQ))
    padded, real = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 0, torch.device("cpu"))
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(tokens)
        kept = model(padded, positions, prefill_mask(real), logits_to_keep=2)
    completions = generate_batch(model, [[1, 2, 3], [4, 5]], 6, SEQ, 100)
    lm = StrataLM(model, SimpleNamespace(eod=0), seq_length=SEQ, batch_size=2)
    pairs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10]), (list(range(20, 40)), [41])]
    return {
        "plain": plain,
        "kept": kept,
        "generated": [c.tokens for c in completions],
        "scores": lm._score_pairs(pairs),
    }


def _stage_outputs(rank: int) -> dict:
    from megatron.inference.pipeline import PipelinedGPT

    results = {}
    for tied in (True, False):
        config = ModelConfig.from_neox(
            make_args(num_layers=3, seq_length=SEQ, no_weight_tying=not tied)
        )
        torch.manual_seed(0)
        whole = GPTModel(config).eval()
        stage = PipelinedGPT.build(config).eval()
        held = stage.state_dict().keys()
        stage.load_state_dict({k: v for k, v in whole.state_dict().items() if k in held})
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{'tied' if tied else 'untied'}-{str(dtype).split('.')[-1]}"
            results[key] = {
                "names": sorted(held),
                "stage": _outputs(stage.to(dtype)),
                "whole": _outputs(whole.to(dtype)),
            }
    return results


@pytest.fixture(scope="module")
def stage_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("pp") / "results.pt"
    return run_on_ranks(_stage_outputs, STAGES, out, pp=STAGES)


def test_stage_layers_split_the_blocks_contiguously():
    assert [list(stage_layers(3, 2, s)) for s in range(2)] == [[0], [1, 2]]
    assert [len(stage_layers(10, 4, s)) for s in range(4)] == [2, 3, 2, 3]


def test_stages_hold_their_layers_under_the_whole_models_names(stage_results):
    first, last = (stage_results[s]["tied-float32"]["names"] for s in range(STAGES))
    assert {n.split(".")[0] for n in first} == {"embedding", "layers"}
    assert {n.split(".")[1] for n in first if n.startswith("layers.")} == {"0"}
    assert {n.split(".")[1] for n in last if n.startswith("layers.")} == {"1", "2"}
    # Tied: the last stage holds its own copy of the word embeddings for the head.
    assert {"embedding.word_embeddings.weight", "final_norm.norm.weight"} <= set(last)
    untied_last = stage_results[1]["untied-float32"]["names"]
    assert "lm_head.weight" in untied_last
    assert not any(n.startswith("embedding.") for n in untied_last)


@pytest.mark.parametrize("case", ["tied-float32", "untied-float32", "tied-bfloat16"])
def test_every_stage_returns_the_whole_models_outputs(stage_results, case):
    for rank, results in enumerate(stage_results):
        stage, whole = results[case]["stage"], results[case]["whole"]
        for key in ("plain", "kept"):
            assert torch.equal(stage[key], whole[key]), (rank, key)
        assert stage["generated"] == whole["generated"], rank
        assert stage["scores"] == whole["scores"], rank
