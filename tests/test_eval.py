"""eval.py and the lm-evaluation-harness adapter: log-likelihoods equal a direct forward pass,
rolling windows, generation stopping at stop strings, the SmolLM2 reference scores, data
parallelism, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_config
from _model_fixtures import make_args
from conftest import run_tool

from megatron.checkpoint.save import save_weights_checkpoint
from megatron.model import GPTModel, ModelConfig

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from megatron.evaluation.adapter import StrataLM, share_contexts  # noqa: E402
from megatron.text_generation import truncate_at_stop  # noqa: E402
from megatron.tokenizer.base import Tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(900)

SEQ = 32


class PrintableTokenizer(Tokenizer):
    """Ids 0-94 are the printable ASCII characters, 95 ends a document: whatever a random
    model generates decodes to text."""

    name, vocab_size, eod, pad = "printable", 96, 95, 95

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in token_ids if i != self.eod)


def tiny_lm(batch_size: int = 3) -> StrataLM:
    """A random model (padded vocabulary 128) over PrintableTokenizer."""
    args = make_args(seq_length=SEQ, no_weight_tying=True, init_method_std=0.3)
    torch.manual_seed(0)
    model = GPTModel(ModelConfig.from_neox(args)).eval()
    return StrataLM(model, PrintableTokenizer(), SEQ, batch_size)


def ids(text: str) -> list[int]:
    return PrintableTokenizer().tokenize(text)


def direct_logprob(model: GPTModel, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded forward pass over the last seq_length
    + 1 tokens (longer requests lose the start of their context, as in the harness)."""
    tokens = torch.tensor([(context + continuation)[-(SEQ + 1) :]])
    with torch.no_grad():
        logprobs = model(tokens[:, :-1])[0].float().log_softmax(-1)
    n = len(continuation)
    return float(logprobs[-n:].gather(-1, torch.tensor(continuation)[:, None]).sum())


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def test_loglikelihood_equals_a_direct_forward_pass_in_request_order():
    """Choices of one question share a row (the context once); a row is cut where the next
    choice would pass seq_length, and requests too long for any row lose their context's start."""
    lm = tiny_lm(batch_size=3)
    question = "Q: what?"
    pairs = [
        ("The cat", " sat"),
        ("A much longer context than the others here", " and its end"),
        (question, " nothing at all"),
        ("x", "y"),
        (question, " a"),
        ("short", " one"),
        (question, " something else, longer"),
        (question, " b"),
    ]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        expected = direct_logprob(lm.model, ids(context), ids(continuation))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert isinstance(greedy, bool)
    rows = share_contexts([(ids(c), ids(x)) for c, x in pairs], SEQ)
    shared = [row.owners for row in rows if len(row.owners) > 1]
    assert shared == [[2, 4], [6, 7]]  # the third choice would pass 32 tokens
    # The greedy flag: a continuation made of the model's own argmax tokens is greedy.
    context = ids("The cat")
    with torch.no_grad():
        best = int(lm.model(torch.tensor([context]))[0, -1].argmax())
    pairs = [(context, [best]), (context, [(best + 1) % 95])]
    (_, greedy), (_, not_greedy) = lm._score_pairs(pairs)
    assert greedy and not not_greedy


def test_rolling_windows_cover_a_document_longer_than_seq_length():
    lm = tiny_lm(batch_size=2)
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2 * SEQ + 5))
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    tokens, eod = ids(text), lm.eot_token_id
    # The harness's windows: the first conditioned on EOD, each full one on the token before
    # it, the last (partial) one on the seq_length tokens before its end.
    expected = direct_logprob(lm.model, [eod], tokens[:SEQ])
    expected += direct_logprob(lm.model, tokens[SEQ - 1 : SEQ], tokens[SEQ : 2 * SEQ])
    end = len(tokens)
    expected += direct_logprob(lm.model, tokens[end - SEQ - 1 : 2 * SEQ], tokens[2 * SEQ :])
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_a_stop_string():
    lm = tiny_lm()
    prompts = ["Once upon a time", "The answer is"]
    free = lm.generate_until(
        [request("generate_until", p, {"until": [], "max_gen_toks": 12}) for p in prompts]
    )
    assert all(len(text) >= 6 for text in free)
    stops = [text[3:5] for text in free]
    stopped = lm.generate_until(
        [
            request("generate_until", p, {"until": [s], "max_gen_toks": 12})
            for p, s in zip(prompts, stops)
        ]
    )
    for text, stop, cut in zip(free, stops, stopped):
        assert cut == text[: text.find(stop)]


def test_truncate_at_the_first_stop_string():
    assert truncate_at_stop("abc\n\nQ: d", ["Q:", "\n\n"]) == "abc"
    assert truncate_at_stop("abc", ["", "z"]) == "abc"


def test_bf16_scores_follow_fp32():
    """A bf16 model scores through the same path (the log-softmax in fp32): its sums stay
    within bf16's rounding of the fp32 model's."""
    fp32 = tiny_lm()
    bf16 = StrataLM(copy.deepcopy(fp32.model).to(torch.bfloat16), PrintableTokenizer(), SEQ, 3)
    pairs = [(ids("The cat"), ids(" sat")), (ids("x" * 40), ids(" y")), (ids("Q"), ids(" abc"))]
    for (want, _), (got, _) in zip(fp32._score_pairs(pairs), bf16._score_pairs(pairs)):
        assert got == pytest.approx(want, rel=0.03, abs=0.05)


# ---------------------------------------------------------------- eval.py on checkpoints


def eval_run(*overrides: str, check: bool = True, launcher: bool = False):
    script = ("deepy.py", "eval.py") if launcher else ("eval.py",)
    return run_tool(*script, *overrides, check=check, timeout=1200)


def read_results(prefix: Path) -> dict:
    (path,) = prefix.parent.glob(f"{prefix.name}_eval_results_*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smollm2_ckpt(smollm2_hf, tmp_path_factory) -> Path:
    from tools.ckpts.convert_hf_to_neox import convert_hf_to_neox

    return convert_hf_to_neox(smollm2_hf, tmp_path_factory.mktemp("smollm2") / "ckpt")


@pytest.mark.slow
def test_smollm2_reference_scores(smollm2_ckpt, tmp_path):
    """lm-evaluation-harness 0.4.13's HF backend on the same fp32 weights: ARC-Easy (all 570)
    acc 0.5228, acc_norm 0.4298; HellaSwag's first 2,000 give acc 0.3480, acc_norm 0.4220
    (scored in full once, see README; here its first 100, on which `lm_eval --model hf
    --limit 100` gives acc 0.42, acc_norm 0.45)."""
    prefix, logs = tmp_path / "smol", tmp_path / "logs"
    eval_run(
        str(smollm2_ckpt / "config.yml"),
        f"load={smollm2_ckpt}",
        "eval_tasks=[arc_easy_local]",
        f"eval_results_prefix={prefix}",
        f"log_dir={logs}",
    )
    results = read_results(prefix)
    arc = results["results"]["arc_easy_local"]
    assert results["n-samples"]["arc_easy_local"]["effective"] == 570
    assert arc["acc,none"] == pytest.approx(0.5228, abs=0.005)
    assert arc["acc_norm,none"] == pytest.approx(0.4298, abs=0.005)
    assert results["strata"]["iteration"] == 0
    assert results["strata"]["checkpoint"].endswith("global_step0")
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert {(r["task"], r["metric"]) for r in records} == {
        ("arc_easy_local", "acc"),
        ("arc_easy_local", "acc_norm"),
    }
    eval_run(
        str(smollm2_ckpt / "config.yml"),
        f"load={smollm2_ckpt}",
        "eval_tasks=[hellaswag_local]",
        "eval_limit=100",
        f"eval_results_prefix={tmp_path / 'hellaswag'}",
    )
    hellaswag = read_results(tmp_path / "hellaswag")["results"]["hellaswag_local"]
    assert hellaswag["acc,none"] == pytest.approx(0.42, abs=0.005)
    assert hellaswag["acc_norm,none"] == pytest.approx(0.45, abs=0.005)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """(config with no training keys, weights-only checkpoint) of a random bytes-tokenizer
    model with 4 heads, so it splits over 2 tensor-parallel ranks."""
    from megatron.config import NeoXArgs

    root = tmp_path_factory.mktemp("tiny")
    values = small_config(None, seq_length=64, max_position_embeddings=64)
    for key in ("optimizer", "min_lr", "train_micro_batch_size_per_gpu", "train_iters"):
        values.pop(key)
    config = Path(write_config(root / "model.yml", values))
    args = NeoXArgs.from_ymls([config], [], user_script="eval.py")
    torch.manual_seed(0)
    model = GPTModel(ModelConfig.from_neox(args))
    save_weights_checkpoint(root / "ckpt", model.state_dict(), iteration=5)
    return config, root / "ckpt"


def test_data_and_tensor_parallel_equal_one_process(tiny_ckpt, tmp_path):
    """One launch per layout: DP=2 splits the documents, TP=2 splits the model's tensors,
    PP=2 its layers (forward-only stages)."""
    config, ckpt = tiny_ckpt
    common = [str(config), f"load={ckpt}", "eval_tasks=[arc_easy_local]", "eval_limit=30"]
    scores = {}
    for name, layout in (
        ("single", []),
        ("dp2", ["num_gpus=2"]),
        ("tp2", ["num_gpus=2", "model_parallel_size=2"]),
        ("pp2", ["num_gpus=2", "pipe_parallel_size=2"]),
    ):
        prefix = tmp_path / name
        eval_run(*common, *layout, f"eval_results_prefix={prefix}", launcher=True)
        results = read_results(prefix)
        assert results["strata"]["iteration"] == 5
        scores[name] = results["results"]["arc_easy_local"]
    for layout in ("dp2", "tp2", "pp2"):
        assert scores[layout].keys() == scores["single"].keys()
        for metric, value in scores["single"].items():
            # Gathered from two ranks, the standard errors are summed in another order.
            assert scores[layout][metric] == pytest.approx(value, rel=1e-12), (layout, metric)


BAD_INPUTS = {
    "unknown task": (["eval_tasks=[arc_easy_locl]"], "closest: arc_easy_local"),
    "missing data file": (["eval_tasks=[arc_missing]"], "/nonexistent/arc.jsonl does not exist"),
    "missing load": (["load=/nonexistent/ckpt"], "checkpoint directory /nonexistent/ckpt"),
    "missing iteration": (["iteration=7"], "has no checkpoint of iteration 7"),
    "limit not positive": (["eval_limit=0"], "eval_limit must be >= 1"),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_ckpt, tmp_path, problem):
    config, ckpt = tiny_ckpt
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    arc = (Path(__file__).parents[1] / "configs/eval_tasks/arc_easy_local.yaml").read_text()
    arc = arc.replace("task: arc_easy_local", "task: arc_missing").replace(
        "${STRATA_ASSETS}/eval/arc_easy_validation.jsonl", "/nonexistent/arc.jsonl"
    )
    (tasks / "arc_missing.yaml").write_text(arc)
    (tasks / "strata_local.py").write_text(
        (Path(__file__).parents[1] / "configs/eval_tasks/strata_local.py").read_text()
    )
    overrides, message = BAD_INPUTS[problem]
    defaults = [f"load={ckpt}", "eval_tasks=[arc_easy_local]", f"eval_include_path=[{tasks}]"]
    keys = {o.split("=")[0] for o in overrides}
    defaults = [d for d in defaults if d.split("=")[0] not in keys]
    prefix = tmp_path / "out"
    result = eval_run(
        str(config), *defaults, *overrides, f"eval_results_prefix={prefix}", check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("out*"))


def test_generation_tasks_need_a_tokenizer_that_decodes():
    from megatron.evaluation.harness import check_decoding
    from megatron.neox_arguments import ConfigError

    class EncodeOnly(PrintableTokenizer):
        def detokenize(self, token_ids):
            raise NotImplementedError("encode-only")

    check_decoding(EncodeOnly(), [])  # scoring tasks never decode
    with pytest.raises(ConfigError, match="gsm8k generate text.*cannot decode"):
        check_decoding(EncodeOnly(), ["gsm8k"])


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory, text_dataset) -> dict[str, dict]:
    """Three 5-iteration trainings: without harness tasks, with them every 3 iterations, and
    with them on a 2-stage pipeline; each scores 3 iterations of its test split at the end, and
    the plain and pipeline runs save their weights. {name: {"config", "save", "records"}}."""
    root = tmp_path_factory.mktemp("trained")
    tasks = {"eval_tasks": ["arc_easy_local"], "eval_limit": 4, "eval_tasks_interval": 3}
    runs = {}
    for name, extra in (
        ("plain", {"save": str(root / "plain-ckpt")}),
        ("tasks", tasks),
        (
            "pipeline",
            {**tasks, "save": str(root / "pipe-ckpt"), "pipe_parallel_size": 2, "num_gpus": 2},
        ),
    ):
        values = small_config(
            text_dataset,
            train_iters=5,
            log_interval=1,
            eval_interval=100,
            eval_iters=3,
            split="80,10,10",
            hidden_dropout=0.1,
            log_dir=str(root / name),
            **extra,
        )
        config = write_config(root / f"{name}.yml", values)
        run_tool("deepy.py", "train.py", config)
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = {
            "config": config,
            "save": extra.get("save"),
            "records": [json.loads(line) for line in lines],
        }
    return runs


def test_eval_tasks_during_training_leave_training_unchanged(training_runs):
    """Every eval_tasks_interval iterations and at the end, logged with the iteration; the
    losses equal a run without them (dropout on: the harness leaves the RNGs alone)."""
    train_losses = {
        name: [
            (r["iteration"], r["lm_loss"])
            for r in training_runs[name]["records"]
            if r["split"] == "train"
        ]
        for name in ("plain", "tasks")
    }
    assert train_losses["tasks"] == train_losses["plain"]
    records = training_runs["tasks"]["records"]
    evals = [(r["iteration"], r["metric"]) for r in records if r["split"] == "eval"]
    assert evals == [(3, "acc"), (3, "acc_norm"), (5, "acc"), (5, "acc_norm")]


def test_eval_tasks_during_pipeline_training_equal_eval_py_on_its_checkpoint(
    training_runs, tmp_path
):
    """The live stages, run forward-only in place, score what eval.py gives on the weights
    the run saves after that evaluation."""
    run = training_runs["pipeline"]
    live = {
        (r["iteration"], r["metric"]): r["value"] for r in run["records"] if r["split"] == "eval"
    }
    assert sorted(live) == [(3, "acc"), (3, "acc_norm"), (5, "acc"), (5, "acc_norm")]
    prefix = tmp_path / "saved"
    eval_run(
        run["config"],
        f"load={run['save']}",
        "pipe_parallel_size=1",
        "num_gpus=1",
        f"eval_results_prefix={prefix}",
    )
    saved = read_results(prefix)["results"]["arc_easy_local"]
    assert saved["acc,none"] == live[(5, "acc")]
    assert saved["acc_norm,none"] == live[(5, "acc_norm")]


def test_perplexity_without_tasks_equals_the_training_test_loss(training_runs, tmp_path):
    """eval.py with no eval_tasks, at DP=2, scores the same 3 iterations of 4 samples of the
    test split that training scored at its end; then the whole split with eval_iters=-1."""
    run = training_runs["plain"]
    (trained,) = [r["lm_loss"] for r in run["records"] if r["split"] == "test"]
    prefix, logs = tmp_path / "ppl", tmp_path / "logs"
    common = [run["config"], f"load={run['save']}"]
    eval_run(
        *common,
        "num_gpus=2",
        "train_micro_batch_size_per_gpu=2",
        f"eval_results_prefix={prefix}",
        f"log_dir={logs}",
        launcher=True,
    )
    results = read_results(prefix)
    assert results["strata"]["iteration"] == 5
    test = results["results"]["test"]
    assert test["lm_loss"] == pytest.approx(trained, rel=1e-5)
    assert test["lm_loss_ppl"] == pytest.approx(math.exp(trained), rel=1e-5)
    assert (test["samples"], test["tokens"]) == (12, 12 * 32)
    assert results["results"].keys() == {"valid", "test"}
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in records] == [("valid", 5), ("test", 5)]
    assert records[1]["lm_loss_ppl"] == test["lm_loss_ppl"]

    eval_run(*common, "eval_iters=-1", f"eval_results_prefix={tmp_path / 'whole'}")
    whole = read_results(tmp_path / "whole")["results"]
    split_tokens = split_token_counts(run["config"])
    for split, figures in whole.items():
        # One epoch of packed samples: every token of the split's documents but the last
        # few that do not fill a sample is predicted once.
        assert figures["samples"] == (split_tokens[split] - 1) // 32, split
        assert figures["tokens"] == figures["samples"] * 32
        assert math.isfinite(figures["lm_loss"]) and figures["lm_loss"] > 0


def split_token_counts(config: str) -> dict[str, int]:
    """Tokens in the documents `split` gives the valid and test data."""
    import yaml

    from megatron.data.data_utils import get_train_valid_test_split
    from megatron.data.indexed_dataset import MMapIndexedDataset

    values = yaml.safe_load(Path(config).read_text())
    data = MMapIndexedDataset(values["data_path"])
    bounds = get_train_valid_test_split(values["split"], len(data))
    return {
        split: int(data.sizes[bounds[i] : bounds[i + 1]].sum())
        for i, split in ((1, "valid"), (2, "test"))
    }


def test_perplexity_needs_valid_or_test_data(tiny_ckpt, tmp_path):
    config, ckpt = tiny_ckpt
    result = eval_run(
        str(config), f"load={ckpt}", f"eval_results_prefix={tmp_path / 'out'}", check=False
    )
    assert result.returncode != 0
    assert "scores the valid and test data, but the config gives none" in result.stderr
    assert not list(tmp_path.glob("out*"))


def test_whole_split_evaluation_is_for_eval_py(tmp_path):
    from megatron.config import NeoXArgs
    from megatron.neox_arguments import ConfigError

    config = write_config(tmp_path / "c.yml", small_config(None, eval_iters=-1))
    with pytest.raises(ConfigError, match=r"eval_iters=-1 .*is for eval.py"):
        NeoXArgs.from_ymls([config], [], user_script="train.py")
    assert NeoXArgs.from_ymls([config], [], user_script="eval.py").eval_iters == -1
    bad = write_config(tmp_path / "bad.yml", small_config(None, eval_iters=-2))
    with pytest.raises(ConfigError, match="eval_iters must be >= 0, or -1"):
        NeoXArgs.from_ymls([bad], [], user_script="eval.py")


def test_chat_template_of_a_hugging_face_tokenizer(smollm2_hf):
    from megatron.neox_arguments import ConfigError
    from megatron.tokenizer.chat import load_chat_template

    key = "eval_apply_chat_template"
    chat = load_chat_template(key, "HFTokenizer", str(smollm2_hf / "tokenizer.json"))
    lm = StrataLM(tiny_lm().model, PrintableTokenizer(), SEQ, 2, chat_template=chat)
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert lm.chat_template(True) == chat.source
    with pytest.raises(ConfigError, match="eval_apply_chat_template: chat templates come with"):
        load_chat_template(key, "bytes", None)


@pytest.mark.parametrize(
    "layout, refused",
    [
        ({"zero_optimization": {"stage": 3}}, True),
        ({"model_parallel_size": 2, "num_gpus": 2, "sequence_parallel": True}, True),
        ({"pipe_parallel_size": 2, "num_gpus": 2}, False),
    ],
)
def test_eval_tasks_interval_layouts(tmp_path, layout, refused):
    from megatron.config import NeoXArgs
    from megatron.neox_arguments import ConfigError

    values = small_config(None, eval_tasks=["arc_easy_local"], eval_tasks_interval=2, **layout)
    config = write_config(tmp_path / "c.yml", values)
    if refused:
        with pytest.raises(ConfigError, match="not ZeRO stage 3 or sequence_parallel"):
            NeoXArgs.from_ymls([config], [], user_script="train.py")
    else:
        assert NeoXArgs.from_ymls([config], [], user_script="train.py").eval_tasks_interval == 2
