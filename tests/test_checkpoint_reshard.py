"""Through the real launcher: a checkpoint saved at one layout (tensor, pipeline and
data-parallel sizes, ZeRO stage) resumes at another and continues the uninterrupted run's
losses; damaged checkpoints are clear errors before any training step."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _config_fixtures import layout_config, small_config
from safetensors import safe_open
from test_training import failing_run, losses, train

from megatron.checkpoint.reader import open_checkpoint
from megatron.safetensors_stream import StreamingSafetensorsWriter

pytestmark = pytest.mark.timeout(900)

# fp32, no dropout: every layout computes the same losses (up to reduction order). NeoX pads
# the vocabulary to a multiple of make_vocab_size_divisible_by x model_parallel_size: 256 gives
# tensor-parallel sizes 1 and 2 the same model.
COMMON = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    eval_interval=6,
    train_iters=12,
    make_vocab_size_divisible_by=256,
)
REL = 1e-4


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    zero: int = 0
    pp: int = 1

    def __str__(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}-zero{self.zero}"

    def config(self) -> dict:
        """Config keys for this layout with the global batch of one process x 2 steps."""
        return layout_config(self.tp, self.pp, self.dp, self.zero, accumulation=2 // self.dp)


SAVED_AT = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_dataset) -> tuple[dict, Path]:
    """12 uninterrupted steps in one process, saving at step 6."""
    tmp = tmp_path_factory.mktemp("reference")
    return train(
        tmp, "full", text_dataset, checkpoint_factor=SAVED_AT, **COMMON, **Layout().config()
    )


def checkpoint_at(ckpt: Path, step: int, target: Path) -> Path:
    """A load folder whose `latest` is `ckpt`'s global_step{step} (linked, not copied)."""
    target.mkdir(parents=True)
    (target / f"global_step{step}").symlink_to(ckpt / f"global_step{step}")
    (target / "latest").write_text(f"global_step{step}")
    return target


@pytest.fixture(scope="module")
def saved(tmp_path_factory, text_dataset, reference):
    """saved(layout) -> (metrics of its first 6 steps, load folder of its step-6 checkpoint).

    Each layout trains once for the whole module; one process's is the reference run's own."""
    cache: dict[Layout, tuple[dict, Path]] = {}

    def get(layout: Layout) -> tuple[dict, Path]:
        if layout not in cache:
            tmp = tmp_path_factory.mktemp(f"saved-{layout}")
            if layout == Layout():
                full, run = reference
                first = {key: value for key, value in full.items() if key[0] <= SAVED_AT}
                cache[layout] = first, checkpoint_at(run / "ckpt", SAVED_AT, tmp / "ckpt")
            else:
                first, run = train(
                    tmp,
                    "first",
                    text_dataset,
                    exit_interval=SAVED_AT,
                    checkpoint_factor=0,
                    **COMMON,
                    **layout.config(),
                )
                assert max(i for i, _ in first) == SAVED_AT
                cache[layout] = first, run / "ckpt"
        return cache[layout]

    return get


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() <= want.keys()
    worst = max(abs(value - want[key]) / abs(want[key]) for key, value in got.items())
    print(f"\nmax rel loss diff vs the uninterrupted run: {worst:.2e}")  # pytest -s shows it
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=REL), key


THREE_D = Layout(tp=2, pp=2, dp=2, zero=1)


@pytest.mark.parametrize(
    ("saved_at", "resumed_at"),
    [
        (Layout(dp=2, zero=1), Layout()),
        (Layout(), Layout(dp=2, zero=2)),
        (Layout(dp=2, zero=3), Layout()),
        (Layout(dp=2, zero=2), Layout(dp=2, zero=3)),
        (Layout(tp=2, zero=1), Layout()),
        (Layout(tp=2, zero=1), Layout(dp=2, zero=2)),
        (Layout(pp=2), Layout()),
        (Layout(), Layout(pp=2)),
        (THREE_D, Layout()),
        (THREE_D, Layout(dp=2, zero=2)),
        (THREE_D, Layout(tp=2)),
    ],
    ids=str,
)
def test_resume_at_another_layout(tmp_path, text_dataset, reference, saved, saved_at, resumed_at):
    """Checkpoints hold full tensors under canonical names: any (tp, pp, dp, ZeRO) loads them."""
    full, _ = reference
    first, ckpt = saved(saved_at)
    metadata = json.loads((ckpt / f"global_step{SAVED_AT}" / "metadata.json").read_text())
    layout = metadata["layout"]
    assert (layout["tensor_parallel_size"], layout["pipe_parallel_size"]) == (
        saved_at.tp,
        saved_at.pp,
    )
    assert (layout["data_parallel_size"], layout["zero_stage"]) == (saved_at.dp, saved_at.zero)
    second, _ = train(
        tmp_path,
        "second",
        text_dataset,
        load=str(ckpt),
        checkpoint_factor=0,
        **COMMON,
        **resumed_at.config(),
    )
    assert min(i for i, split in second if split == "train") == SAVED_AT + 1
    assert_close(losses({**first, **second}), losses(full))


def test_shared_key_value_heads_match_and_resume_on_one_process(tmp_path, text_dataset):
    """One key/value head shared by two tensor-parallel ranks (each holds half its channels):
    the losses of one process, and its checkpoint resumes on one process."""
    gqa = dict(COMMON, num_kv_heads=1, checkpoint_factor=0)
    full, _ = train(tmp_path, "full", text_dataset, **gqa, **Layout().config())
    first, run = train(
        tmp_path, "first", text_dataset, exit_interval=6, **gqa, **Layout(tp=2).config()
    )
    second, _ = train(
        tmp_path, "second", text_dataset, load=str(run / "ckpt"), **gqa, **Layout().config()
    )
    assert min(i for i, split in second if split == "train") == SAVED_AT + 1
    assert_close(losses({**first, **second}), losses(full))


BF16_REL = 1e-3  # measured: 2e-5 (bf16 weights, fp32 master and moments)


def test_bf16_resume_from_zero3_on_one_process(tmp_path, text_dataset):
    """bf16 with ZeRO-3's partitioned fp32 master and moments, resumed by one process."""
    bf16 = dict(COMMON, precision="bf16", checkpoint_factor=0)
    full, _ = train(tmp_path, "full", text_dataset, **bf16, **Layout(zero=1).config())
    first, run = train(
        tmp_path, "first", text_dataset, exit_interval=6, **bf16, **Layout(dp=2, zero=3).config()
    )
    master = open_checkpoint(run / "ckpt").optimizer.get("final_norm.norm.weight.master")
    assert master.dtype == torch.float32 and master.shape == (64,)
    second, _ = train(
        tmp_path, "second", text_dataset, load=str(run / "ckpt"), **bf16, **Layout(zero=1).config()
    )
    resumed = losses({**first, **second})
    for key, value in losses(full).items():
        assert resumed[key] == pytest.approx(value, rel=BF16_REL), key


def test_checkpoints_hold_full_tensors_whatever_the_layout(reference, saved):
    """ZeRO-3 partitions every weight; the saved tensors are the full ones, equal to one
    process's after the same steps."""
    _, ckpt = saved(Layout(dp=2, zero=3))
    _, full_run = reference
    got = open_checkpoint(ckpt / "global_step6")
    want = open_checkpoint(full_run / "ckpt" / "global_step6")
    for kind in ("model", "optimizer"):
        got_files, want_files = getattr(got, kind), getattr(want, kind)
        assert set(got_files.keys()) == set(want_files.keys())
        for name in want_files.keys():
            expected = want_files.get(name)
            assert got_files.get(name).shape == expected.shape, name
            torch.testing.assert_close(
                got_files.get(name), expected, rtol=1e-3, atol=1e-5, msg=name
            )


@pytest.mark.parametrize("layout", [Layout(dp=2, zero=3), THREE_D], ids=str)
def test_every_process_writes_its_own_pieces_once(saved, layout):
    """No funnel through rank 0: each process writes a file per kind, each holding a share
    of the values, and together they hold every value exactly once."""
    _, ckpt = saved(layout)
    checkpoint = open_checkpoint(ckpt)
    world = layout.tp * layout.pp * layout.dp
    for kind in ("model", "optimizer"):
        files = getattr(checkpoint, kind)
        assert len(files.paths) == world
        per_file = {path.name: 0 for path in files.paths}
        for name, pieces in files.pieces.items():
            assert sum(box.numel for _, _, box in pieces) == torch.Size(files.shapes[name]).numel()
            for path, _, box in pieces:
                per_file[path.name] += box.numel
        total = sum(per_file.values())
        print(f"\n{layout} {kind}: values per file {sorted(per_file.values())} of {total}")
        assert all(count > 0 for count in per_file.values())
        assert per_file[files.paths[0].name] <= 1.5 * total / world


def damaged_copy(tmp_path: Path, reference: tuple[dict, Path]) -> Path:
    _, run = reference
    target = tmp_path / "ckpt"
    shutil.copytree(run / "ckpt", target)
    (target / "latest").write_text("global_step6")
    return target


def fail_to_load(tmp_path: Path, data: str, ckpt: Path) -> str:
    """stderr of a run (the reference's model) that must fail to load `ckpt`."""
    vocab = COMMON["make_vocab_size_divisible_by"]
    return failing_run(
        tmp_path, data, load=str(ckpt), save=None, make_vocab_size_divisible_by=vocab
    )


def test_missing_optimizer_file_is_an_error(tmp_path, text_dataset, reference):
    ckpt = damaged_copy(tmp_path, reference)
    (ckpt / "global_step6" / "optimizer.safetensors").unlink()
    stderr = fail_to_load(tmp_path, text_dataset, ckpt)
    assert "global_step6/optimizer.safetensors is missing" in stderr


def test_truncated_model_file_is_an_error(tmp_path, text_dataset, reference):
    ckpt = damaged_copy(tmp_path, reference)
    model = ckpt / "global_step6" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    stderr = fail_to_load(tmp_path, text_dataset, ckpt)
    assert "cannot read" in stderr and "model.safetensors" in stderr


def test_missing_rng_states_are_an_error(tmp_path, text_dataset, reference):
    ckpt = damaged_copy(tmp_path, reference)
    shutil.rmtree(ckpt / "global_step6" / "rng")
    stderr = fail_to_load(tmp_path, text_dataset, ckpt)
    assert "rng/rank0.pt is missing" in stderr


def test_streaming_writer_output_reads_back(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(
        path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    )
    for name, value in tensors.items():
        writer.write(name, value)
    assert not path.exists()  # only renamed into place when complete
    writer.close()
    with safe_open(path, "pt") as handle:
        for name, value in tensors.items():
            assert torch.equal(handle.get_tensor(name), value)


def test_streaming_writer_rejects_unexpected_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    writer = StreamingSafetensorsWriter(
        path, [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    )
    with pytest.raises(ValueError, match=r"entry 0 should be a torch.float32 \[2\], got a .*\[4\]"):
        writer.write("a", torch.zeros(4))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("key", ["model_parallel_size", "pipe_parallel_size"])
def test_zero_2_and_3_with_model_parallelism_are_config_errors(stage, key):
    from megatron.neox_arguments import NeoXArgs
    from megatron.neox_arguments.errors import ConfigError

    values = small_config(None, num_gpus=2, zero_optimization={"stage": stage}, **{key: 2})
    with pytest.raises(ConfigError, match=rf"zero_optimization.stage={stage} .*{key}=2"):
        NeoXArgs.from_dict(values)


def test_vocabulary_padding_mismatch_names_the_setting(tmp_path):
    """TP 1 -> 2 with make_vocab_size_divisible_by 128 pads 257 ids to 384, then 512 rows."""
    from megatron.checkpoint.load import CheckpointError, check_shapes

    with pytest.raises(CheckpointError, match=r"(?s)\[512, 64\].*\[384, 64\].*pads to 512 rows"):
        check_shapes(
            {"lm_head.weight": (384, 64), "final_norm.norm.weight": (64,)},
            {"lm_head.weight": (512, 64), "final_norm.norm.weight": (64,)},
            tmp_path / "model.safetensors",
        )


def gpt2_tokenizer(assets: Path) -> dict:
    folder = assets / "tokenizers"
    return {
        "tokenizer_type": "GPT2BPETokenizer",
        "vocab_file": str(folder / "gpt2-vocab.json"),
        "merge_file": str(folder / "gpt2-merges.txt"),
    }


def fake_checkpoint(load: Path, metadata: dict) -> Path:
    """A checkpoint folder as far as the config reads it: `latest`, metadata and a model file."""
    folder = load / "global_step2"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "metadata.json").write_text(json.dumps({"format_version": 1, **metadata}))
    (load / "latest").write_text("global_step2")
    return folder


@pytest.mark.parametrize(
    "metadata",
    [{"padded_vocab_size": 50432}, {"shapes": {"embedding.word_embeddings.weight": [50432, 64]}}],
    ids=["recorded", "older-checkpoint"],
)
def test_the_config_adopts_the_checkpoints_padded_vocabulary(tmp_path, assets, metadata):
    """GPT-2's 50257 tokens pad to 50304 rows at TP 1 and 50432 at TP 2: loading a TP=2
    checkpoint on one process keeps its 50432 rows, and says so."""
    from megatron.neox_arguments import ConfigError, NeoXArgs

    folder = fake_checkpoint(tmp_path / "ckpt", metadata)
    values = small_config(None, load=str(tmp_path / "ckpt"), **gpt2_tokenizer(assets))
    args = NeoXArgs.from_dict(values)
    assert args.padded_vocab_size == 50432
    assert any("50432 rows, as in" in w and str(folder) in w for w in args.warnings)
    assert NeoXArgs.from_dict({**values, "load": None}).padded_vocab_size == 50304
    # A checkpoint of fewer rows than the tokenizer has tokens belongs to another vocabulary.
    fake_checkpoint(tmp_path / "other", {"padded_vocab_size": 50000})
    with pytest.raises(ConfigError, match=r"50000 rows, .* smaller than the tokenizer's 50257"):
        NeoXArgs.from_dict({**values, "load": str(tmp_path / "other")})


def test_a_tp2_gpt2_run_resumes_on_one_process_with_no_key_changed(tmp_path, text_dataset, assets):
    gpt2 = gpt2_tokenizer(assets)
    common = dict(train_iters=4, eval_interval=2, checkpoint_factor=2, **gpt2)
    _, run = train(tmp_path, "tp2", text_dataset, exit_interval=2, **common, **layout_config(2))
    saved = json.loads((run / "ckpt" / "global_step2" / "metadata.json").read_text())
    assert saved["padded_vocab_size"] == 50432
    resumed, again = train(
        tmp_path, "tp1", text_dataset, load=str(run / "ckpt"), **common, **layout_config()
    )
    assert min(i for i, split in resumed if split == "train") == 3
    final = json.loads((again / "ckpt" / "global_step4" / "metadata.json").read_text())
    assert final["padded_vocab_size"] == 50432
