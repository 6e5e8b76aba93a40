"""The checkpoint package in one process: pieces map to the right boxes of the full tensors,
checkpoints of format version 1 still load, asynchronous saves publish only finished
checkpoints, a crash or a full disk while writing leaves the previous `latest` loadable, and a
changed file fails the load (sha256)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron.checkpoint import CheckpointError, read_metadata, resolve_checkpoint
from megatron.checkpoint.boxes import (
    TensorParallelSlice,
    fragment_boxes,
    parse_piece_key,
    piece_key,
)
from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.reader import open_checkpoint
from megatron.checkpoint.save import CheckpointSaver
from megatron.learning_rates import build_lr_scheduler
from megatron.model import GPTModel, ModelConfig
from megatron.mpu.layers import split_partition

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
FORMAT_1 = REPO / "tests" / "data" / "checkpoint_v1"


def test_fragments_map_to_the_full_tensors_boxes():
    """Any flat range of any rank's tensor-parallel slice (strided, reordered, any dim) is
    the union of the boxes fragment_boxes names, with the full tensor's values there."""
    rng = random.Random(0)
    for _ in range(300):
        dims = rng.choice([1, 2, 3])
        world, stride, dim = rng.choice([1, 2, 4]), rng.choice([1, 2, 3]), rng.randrange(dims)
        shape = [rng.randint(1, 5) for _ in range(dims)]
        shape[dim] = world * stride * rng.randint(1, 3)
        full = torch.arange(torch.Size(shape).numel()).reshape(shape)
        order = torch.randperm(shape[dim]) if rng.random() < 0.3 else None
        rank = rng.randrange(world)
        local = split_partition(full, dim, world, rank, stride, order).reshape(-1)
        layout = TensorParallelSlice.of_rank(tuple(shape), dim, world, rank, stride, order)
        start = rng.randint(0, local.numel())
        end = rng.randint(start, local.numel())
        fragment = local[start:end].clone()
        placements = fragment_boxes(layout, start, end)
        assert sum(p.box.numel for p in placements) == end - start
        for placement in placements:
            box = placement.box
            index = tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))
            assert torch.equal(placement.view(fragment), full[index])
            assert parse_piece_key(piece_key("w", box, tuple(shape)), box.lengths) == ("w", box)


def build(config_file: Path):
    """The model, AdamW and schedule a checkpoint's saved config describes."""
    from megatron.conversion.strata_io import model_args

    args = model_args([config_file])
    args.train_iters, args.lr = 10, 0.001
    model = GPTModel(ModelConfig.from_neox(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return args, model, optimizer, build_lr_scheduler(args, optimizer)


def test_a_format_1_checkpoint_loads():
    """tests/data/checkpoint_v1 was written by format 1 (one file per kind, one writer):
    weights, Adam moments, step and schedule come back as saved."""
    folder = FORMAT_1 / "global_step3"
    assert read_metadata(folder)["format_version"] == 1
    args, model, optimizer, scheduler = build(folder / "configs" / "model.yml")
    args.load = str(FORMAT_1)
    metadata = load_checkpoint(args, model, optimizer, scheduler)
    assert metadata["iteration"] == 3
    weights = load_file(folder / "model.safetensors")
    moments = load_file(folder / "optimizer.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], moments[f"{name}.{key}"]), name
        assert int(optimizer.state[p]["step"]) == 3
    assert scheduler.num_iters == 3


def trained(tmp_path: Path, asynchronous: bool):
    args, model, optimizer, scheduler = build(FORMAT_1 / "global_step3" / "configs" / "model.yml")
    args.save = str(tmp_path)
    args.async_save = asynchronous
    args.config_files = {}
    for _ in range(2):
        loss = model(torch.randint(0, 256, (2, 16))).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return args, model, optimizer, scheduler


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path):
    torch.manual_seed(0)
    args, model, optimizer, scheduler = trained(tmp_path / "async", asynchronous=True)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    saver = CheckpointSaver(args)
    saver.save(2, model, optimizer, scheduler, {"iteration": 2})
    with torch.no_grad():  # training goes on: the snapshot must not follow
        for p in model.parameters():
            p.add_(1.0)
    saver.wait()
    assert resolve_checkpoint(args.save).name == "global_step2"
    assert not list(Path(args.save).glob(".*.tmp"))
    written = open_checkpoint(args.save).model
    for name, value in saved.items():
        assert torch.equal(written.get(name), value), name


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint_format import trained
    from pathlib import Path
    from megatron import safetensors_stream
    from megatron.checkpoint.save import CheckpointSaver

    torch.manual_seed(0)
    args, model, optimizer, scheduler = trained(Path({save!r}), asynchronous=True)
    saver = CheckpointSaver(args)
    saver.save(1, model, optimizer, scheduler, {{"iteration": 1}})
    saver.wait()
    write = safetensors_stream.StreamingSafetensorsWriter.write

    def write_then_die(self, name, tensor):
        write(self, name, tensor)
        os.kill(os.getpid(), signal.SIGKILL)  # the writer thread dies mid-file, as on a crash

    safetensors_stream.StreamingSafetensorsWriter.write = write_then_die
    saver.save(2, model, optimizer, scheduler, {{"iteration": 2}})
    saver.wait()
    """
)


def test_a_crash_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    script = CRASH.format(tests=str(REPO / "tests"), save=str(save))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert (save / "latest").read_text() == "global_step1"
    assert (save / ".global_step2.tmp").is_dir() and not (save / "global_step2").exists()
    args, model, optimizer, scheduler = build(FORMAT_1 / "global_step3" / "configs" / "model.yml")
    args.load = str(save)
    assert load_checkpoint(args, model, optimizer, scheduler)["iteration"] == 1
    # The next save clears what the crash left behind.
    args.save, args.config_files = str(save), {}
    CheckpointSaver(args).save(3, model, optimizer, scheduler, {"iteration": 3})
    assert sorted(p.name for p in save.iterdir()) == ["global_step1", "global_step3", "latest"]


SAVE_TWICE = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint_format import trained
    from pathlib import Path
    from megatron import safetensors_stream
    from megatron.checkpoint import save as save_module

    torch.manual_seed(0)
    args, model, optimizer, scheduler = trained(Path({save!r}), asynchronous={asynchronous})
    saver = save_module.CheckpointSaver(args)
    saver.save(1, model, optimizer, scheduler, {{"iteration": 1}})
    saver.wait()
    events = 0

    def counted(function):  # every file-system step of a save is an event
        def call(*args, **kwargs):
            global events
            events += 1
            if events == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return call

    writer = safetensors_stream.StreamingSafetensorsWriter
    writer.write, writer.close = counted(writer.write), counted(writer.close)
    for name in ("_write_bytes", "atomic_write_json", "atomic_write_text"):
        setattr(save_module, name, counted(getattr(save_module, name)))
    os.replace = counted(os.replace)
    if {file_size_limit}:
        resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))
    saver.save(2, model, optimizer, scheduler, {{"iteration": 2}})
    saver.wait()
    print(json.dumps({{"events": events}}))
    """
)


def save_twice(save: Path, kill_at: int = 0, file_size_limit: int = 0, asynchronous=False):
    """A process that saves checkpoints 1 and 2, killed before file-system step `kill_at` of
    the second save, or with files limited to `file_size_limit` bytes during it."""
    script = SAVE_TWICE.format(
        tests=str(REPO / "tests"),
        save=str(save),
        asynchronous=asynchronous,
        kill_at=kill_at,
        file_size_limit=file_size_limit,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)


def loaded_iteration(save: Path) -> int:
    """Load `latest` (sha256 checked) into a fresh model."""
    args, model, optimizer, scheduler = build(FORMAT_1 / "global_step3" / "configs" / "model.yml")
    args.load = str(save)
    return load_checkpoint(args, model, optimizer, scheduler)["iteration"]


def test_latest_always_loads_wherever_a_save_is_killed(tmp_path):
    """SIGKILL before each of 20+ file-system steps spread over a save (tensor writes, file
    closes, RNG file, metadata, the rename, `latest`): `latest` always names a checkpoint that
    loads (sha256 checked): the previous one, until `latest` itself is written."""
    probe = save_twice(tmp_path / "probe")
    assert probe.returncode == 0, probe.stderr[-2000:]
    events = json.loads(probe.stdout.splitlines()[-1])["events"]
    positions = sorted({1 + round(i * (events - 1) / 21) for i in range(22)})
    assert len(positions) >= 20

    def killed(position: int) -> int:
        save = tmp_path / f"killed{position}"
        result = save_twice(save, kill_at=position)
        assert result.returncode == -9, result.stderr[-2000:]
        return loaded_iteration(save)

    with ThreadPoolExecutor(2) as pool:
        iterations = list(pool.map(killed, positions))
    assert iterations == [1] * len(positions)
    # The last step is `latest` itself: the new checkpoint was complete, renamed into place.
    assert (tmp_path / f"killed{events}" / "global_step2" / "metadata.json").is_file()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, asynchronous):
    """Files capped below the optimizer file's size (as a full disk would stop them): a clear
    error naming what failed, no partial folder, `latest` still the previous checkpoint."""
    save = tmp_path / "ckpt"
    limit = (FORMAT_1 / "global_step3" / "optimizer.safetensors").stat().st_size // 2
    result = save_twice(save, file_size_limit=limit, asynchronous=asynchronous)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "save: could not write global_step2" in result.stderr
    assert "File too large" in result.stderr and "still names global_step1" in result.stderr
    assert sorted(p.name for p in save.iterdir()) == ["global_step1", "latest"]
    assert loaded_iteration(save) == 1


def test_a_changed_file_fails_the_load(tmp_path):
    torch.manual_seed(0)
    args, model, optimizer, scheduler = trained(tmp_path / "ckpt", asynchronous=False)
    CheckpointSaver(args).save(2, model, optimizer, scheduler, {"iteration": 2})
    recorded = read_metadata(tmp_path / "ckpt" / "global_step2")["sha256"]
    assert {"model.safetensors", "optimizer.safetensors", "rng/rank0.pt"} <= recorded.keys()
    optimizer_file = tmp_path / "ckpt" / "global_step2" / "optimizer.safetensors"
    data = bytearray(optimizer_file.read_bytes())
    data[-1] ^= 1  # one bit of the last moment
    optimizer_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not have the sha256"):
        loaded_iteration(tmp_path / "ckpt")


def test_no_save_optim_no_save_rng_and_iteration(tmp_path):
    """NeoX's keys: a checkpoint saved without optimizer state and RNG holds neither and says
    how to load it; `iteration` loads that step instead of `latest`'s."""
    torch.manual_seed(0)
    args, model, optimizer, scheduler = trained(tmp_path / "ckpt", asynchronous=False)
    args.no_save_optim = args.no_save_rng = True
    CheckpointSaver(args).save(1, model, optimizer, scheduler, {"iteration": 1})
    args.no_save_optim = args.no_save_rng = False
    CheckpointSaver(args).save(2, model, optimizer, scheduler, {"iteration": 2})
    first = tmp_path / "ckpt" / "global_step1"
    names = sorted(p.name for p in first.iterdir())
    assert names == ["configs", "metadata.json", "model.safetensors", "rng"]
    assert not any((first / "rng").iterdir())

    args, model, optimizer, scheduler = build(FORMAT_1 / "global_step3" / "configs" / "model.yml")
    args.load, args.iteration = str(tmp_path / "ckpt"), 1
    with pytest.raises(CheckpointError, match="no optimizer state .* no_load_optim: true"):
        load_checkpoint(args, model, optimizer, scheduler)
    assert (
        load_checkpoint(args, model, optimizer, scheduler, load_optimizer=False)["iteration"] == 1
    )
    args.iteration = 2
    assert load_checkpoint(args, model, optimizer, scheduler)["iteration"] == 2
    args.iteration = 7
    with pytest.raises(
        CheckpointError,
        match=r"no checkpoint of iteration 7 \(complete ones: global_step1, global_step2\)",
    ):
        load_checkpoint(args, model, optimizer, scheduler)
