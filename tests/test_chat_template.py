"""preprocess_data_with_chat_template.py on SmolLM2's real tokenizer and ChatML template: the
labels are exactly the assistant replies with their end-of-turn tokens."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _config_fixtures import small_config
from _model_fixtures import make_args
from conftest import run_tool

from megatron.data.data_utils import build_train_valid_test_datasets
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.losses import LossContext, get_train_impl
from megatron.model import GPTModel, ModelConfig
from megatron.neox_arguments import NeoXArgs
from tools.datasets.preprocess_data_with_chat_template import main

pytestmark = pytest.mark.timeout(300)

END = "<|im_end|>"
CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "1, 2, 3"},
        {"role": "user", "content": "And back?"},
        {"role": "assistant", "content": "3, 2, 1\nDone."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


def write_jsonl(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def preprocess(tmp: Path, tokenizer_dir, records: list, *flags: str) -> tuple[int, str]:
    """Run the tool in-process; returns (exit code, output prefix)."""
    source = write_jsonl(tmp / "input.jsonl", records)
    prefix = str(tmp / "out" / "chat")
    argv = ["--input", source, "--output-prefix", prefix, "--tokenizer-path", str(tokenizer_dir)]
    return main([*argv, *flags]), prefix


def read(prefix: str) -> list[np.ndarray]:
    data = MMapIndexedDataset(prefix)
    return [np.asarray(data[i]) for i in range(len(data))]


def labelled_runs(tokenizer, labels: np.ndarray) -> list[str]:
    """The decoded stretches of consecutive labelled tokens."""
    runs, current = [], []
    for label in list(labels) + [-100]:
        if label >= 0:
            current.append(int(label))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def template_ids(tokenizer, conversation) -> list[int]:
    encoded = tokenizer.apply_chat_template(conversation, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def replies(conversation) -> list[str]:
    return [m["content"] + END for m in conversation if m["role"] == "assistant"]


def test_labels_are_the_assistant_replies_and_tokens_match_the_template(
    tmp_path, smollm2_hf, tokenizer
):
    code, prefix = preprocess(tmp_path, smollm2_hf, [{"messages": c} for c in CONVERSATIONS])
    assert code == 0
    tokens, labels = read(f"{prefix}_messages_document"), read(f"{prefix}_messages_label_document")
    assert len(tokens) == len(labels) == len(CONVERSATIONS)
    for conversation, ids, label in zip(CONVERSATIONS, tokens, labels):
        assert ids.tolist() == template_ids(tokenizer, conversation)
        assert label.shape == ids.shape
        labelled = label >= 0
        assert (label[labelled] == ids[labelled]).all()
        assert labelled_runs(tokenizer, label) == replies(conversation)
        # The newline after each end-of-turn token is layout, not part of the reply.
        assert not labelled[-1] and tokenizer.decode([int(ids[-1])]) == "\n"


def test_only_last_turn_and_no_mask(tmp_path, smollm2_hf, tokenizer):
    records = [{"messages": c} for c in CONVERSATIONS]
    code, prefix = preprocess(tmp_path / "last", smollm2_hf, records, "--only-last-turn")
    assert code == 0
    for conversation, label in zip(CONVERSATIONS, read(f"{prefix}_messages_label_document")):
        assert labelled_runs(tokenizer, label) == replies(conversation)[-1:]
    code, prefix = preprocess(tmp_path / "all", smollm2_hf, records, "--no-mask")
    assert code == 0
    assert not Path(f"{prefix}_messages_label_document.idx").exists()
    tokens = read(f"{prefix}_messages_document")
    assert [t.tolist() for t in tokens] == [template_ids(tokenizer, c) for c in CONVERSATIONS]


def test_append_eod_adds_an_unlabelled_end_of_document(tmp_path, smollm2_hf, tokenizer):
    code, prefix = preprocess(
        tmp_path, smollm2_hf, [{"messages": CONVERSATIONS[1]}], "--append-eod"
    )
    assert code == 0
    (ids,), (label,) = (
        read(f"{prefix}_messages_document"),
        read(f"{prefix}_messages_label_document"),
    )
    # As Strata's HFTokenizer: the tokenizer's configured eos_token (tokenizer_config.json).
    assert ids[:-1].tolist() == template_ids(tokenizer, CONVERSATIONS[1])
    assert tokenizer.decode([int(ids[-1])]) == tokenizer.eos_token == "<|im_end|>"
    assert label[-1] == -100
    assert labelled_runs(tokenizer, label) == ["Paris" + END]


def test_pairwise_outputs_are_aligned_with_a_shared_prompt(tmp_path, smollm2_hf, tokenizer, capsys):
    records = [
        {
            "prompt": [{"role": "user", "content": f"Is {n} even?"}],
            "chosen": [{"role": "assistant", "content": "yes" if n % 2 == 0 else "no"}],
            "rejected": [{"role": "assistant", "content": "no" if n % 2 == 0 else "yes"}],
        }
        for n in range(5)
    ]
    code, prefix = preprocess(tmp_path, smollm2_hf, records, "--pairwise", "--prompt-key", "prompt")
    assert code == 0
    chosen, rejected = read(f"{prefix}_chosen_document"), read(f"{prefix}_rejected_document")
    chosen_labels = read(f"{prefix}_chosen_label_document")
    rejected_labels = read(f"{prefix}_rejected_label_document")
    assert len(chosen) == len(rejected) == len(chosen_labels) == len(rejected_labels) == 5
    for n, record in enumerate(records):
        for ids, label, key in (
            (chosen[n], chosen_labels[n], "chosen"),
            (rejected[n], rejected_labels[n], "rejected"),
        ):
            conversation = record["prompt"] + record[key]
            assert ids.tolist() == template_ids(tokenizer, conversation)
            assert labelled_runs(tokenizer, label) == replies(conversation)
    out = capsys.readouterr().out
    assert f"pos_train_data_paths: [{prefix}_chosen_document]" in out
    assert f"neg_train_label_data_paths: [{prefix}_rejected_label_document]" in out


def test_reward_key_writes_one_value_per_document(tmp_path, smollm2_hf):
    records = [{"messages": CONVERSATIONS[1], "label": v} for v in (True, False, 0.5)]
    code, prefix = preprocess(tmp_path, smollm2_hf, records, "--reward-key", "label")
    assert code == 0
    rewards = MMapIndexedDataset(f"{prefix}_messages_reward_document")
    assert rewards.dtype == np.float32
    assert [rewards[i].tolist() for i in range(3)] == [[1.0], [-1.0], [0.5]]


def test_workers_give_identical_output(tmp_path, smollm2_hf):
    records = [{"messages": c} for c in CONVERSATIONS * 20]
    outputs = []
    for workers in ("1", "2"):  # 2: spawned worker processes
        code, prefix = preprocess(tmp_path / workers, smollm2_hf, records, "--workers", workers)
        assert code == 0
        names = [
            f"{prefix}_messages{s}_document.{e}" for s in ("", "_label") for e in "bin idx".split()
        ]
        outputs.append([Path(name).read_bytes() for name in names])
    assert outputs[0] == outputs[1]


def rejecting_tokenizer(smollm2_hf: Path, folder: Path) -> Path:
    """SmolLM2's tokenizer with a template that accepts only user and assistant roles."""
    shutil.copytree(smollm2_hf, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(template)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "record,message",
    [
        ({"text": "hello"}, r"input.jsonl:2: missing key 'messages' \(has \['text'\]\)"),
        ({"messages": "hello"}, r"input.jsonl:2: key 'messages' must be a non-empty list"),
        ({"messages": [{"content": "x"}]}, r"input.jsonl:2: messages\[0\] must be an object"),
        (
            {"messages": [{"role": "user", "content": "only a question"}]},
            r"input.jsonl:2: no 'assistant' message",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}, *CONVERSATIONS[0][:2]]},
            r"input.jsonl:2: the chat template rejects this conversation: unsupported role tool",
        ),
    ],
)
def test_bad_records_are_errors_and_leave_no_output(tmp_path, smollm2_hf, capsys, record, message):
    tokenizer_dir = rejecting_tokenizer(smollm2_hf, tmp_path / "tok")
    good = {"messages": CONVERSATIONS[0]}
    code, prefix = preprocess(tmp_path / "run", tokenizer_dir, [good, record])
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"^error: .*" + message, err, re.MULTILINE), err
    assert not list((tmp_path / "run" / "out").iterdir())


def test_cli_errors_exit_non_zero(tmp_path, smollm2_hf):
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS[0], "label": "good"}])
    result = run_tool(
        "tools/datasets/preprocess_data_with_chat_template.py",
        "--input", source, "--output-prefix", str(tmp_path / "out" / "x"),
        "--tokenizer-path", str(smollm2_hf), "--reward-key", "label",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "in.jsonl:1: reward key 'label' must be true/false or a finite number" in result.stderr
    assert not list((tmp_path / "out").iterdir())


def test_a_tokenizer_without_chat_template_is_an_error(tmp_path, smollm2_hf, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(smollm2_hf, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    code, _ = preprocess(tmp_path / "p", folder, [{"messages": CONVERSATIONS[0]}])
    assert code == 1
    assert "the tokenizer has no chat template" in capsys.readouterr().err


def test_sft_loss_covers_only_the_assistant_tokens(tmp_path, smollm2_hf, tokenizer):
    """Tool output -> the config's datasets -> the `normal` loss: equal to a cross entropy over
    exactly the reply tokens (each reply and its <|im_end|>), padding and prompts excluded."""
    code, prefix = preprocess(tmp_path, smollm2_hf, [{"messages": c} for c in CONVERSATIONS])
    assert code == 0
    paths = {
        f"{split}_{kind}paths": [f"{prefix}_messages{suffix}_document"]
        for split in ("train", "valid", "test")
        for kind, suffix in (("data_", ""), ("label_data_", "_label"))
    }
    config = small_config(
        seq_length=128,
        max_position_embeddings=128,
        pack_impl="unpacked",
        tokenizer_type="HFTokenizer",
        vocab_file=str(smollm2_hf / "tokenizer.json"),
        **paths,
    )
    args = NeoXArgs.from_dict(config)
    train, _, _ = build_train_valid_test_datasets(args, (3, 1, 1))
    batch = torch.utils.data.default_collate([train[i] for i in range(3)])
    torch.manual_seed(0)
    model = GPTModel(
        ModelConfig.from_neox(make_args(padded_vocab_size=args.padded_vocab_size, seq_length=128))
    )
    loss, _ = get_train_impl("normal").loss(model, batch, LossContext(args, eod=0))

    targets = batch["label"][:, 1:]
    mask = targets >= 0
    reply_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"])
                       for c in CONVERSATIONS for r in replies(c))  # fmt: skip
    assert int(mask.sum()) == reply_tokens
    assert (targets[mask] == batch["text"][:, 1:][mask]).all()
    logits = model(batch["text"][:, :-1]).float()
    torch.testing.assert_close(loss, F.cross_entropy(logits[mask], targets[mask]))


def test_tokenizer_code_runs_only_with_trust_remote_code(tmp_path):
    """A tokenizer folder that ships Python (auto_map) is refused unless the user passes
    --trust-remote-code, and its code never runs."""
    from tools.datasets.preprocess_data_with_chat_template import PreprocessError, load_tokenizer

    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "mytok.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class MyTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": [None, "mytok.MyTokenizer"]}})
    )
    with pytest.raises(PreprocessError, match="trust_remote_code"):
        load_tokenizer(str(folder))
    assert not marker.exists()
