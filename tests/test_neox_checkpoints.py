"""GPT-NeoX-native checkpoints both ways: the exported files read by GPT-NeoX's conventions give
the original model, imports round-trip exactly and continue training like a Strata resume, and
bad inputs are clear errors that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _config_fixtures import write_config, write_dataset
from conftest import run_tool
from safetensors.torch import load_file, save_file
from test_hf_conversion import VOCAB, make_hf, strata_model, tokens

from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.reader import read_model_tensors
from megatron.checkpoint.save import save_weights_checkpoint
from megatron.conversion import ConversionError
from megatron.conversion.strata_io import model_args
from megatron.model import GPTModel, ModelConfig
from tools.ckpts.convert_hf_to_neox import convert_hf_to_neox
from tools.ckpts.export_neox import export_neox
from tools.ckpts.export_neox import main as export_main
from tools.ckpts.import_neox import import_neox
from tools.ckpts.import_neox import main as import_main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)

# NeoX-style: rotary_pct 0.25, parallel (GPT-J) residual, biases; Llama-style: GQA, SwiGLU, RMSNorm
CASES = ("gpt_neox_parallel", "llama_gqa_untied")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """case -> a folder holding `hf` (the original transformers model) and `ckpt` (Strata's)."""
    root = tmp_path_factory.mktemp("neox_sources")
    for case in CASES:
        make_hf(root / case / "hf", case)
        convert_hf_to_neox(root / case / "hf", root / case / "ckpt")
    return {case: root / case for case in CASES}


# ------------------------------------------------- an independent reading of the exported files


def _neox_layer(folder: Path, config: dict, index: int) -> list[dict[str, torch.Tensor]]:
    """One NeoX layer's state dict per tensor-parallel rank, as GPT-NeoX's converter reads it."""
    tp = config["model_parallel_size"]
    if config["pipe_parallel_size"] == 0:
        prefix = f"sequential.{index}."
        return [
            {
                key.removeprefix(prefix): value
                for key, value in torch.load(
                    folder / f"mp_rank_{r:02d}_model_states.pt", weights_only=True
                )["module"].items()
                if key.startswith(prefix)
            }
            for r in range(tp)
        ]
    return [
        torch.load(folder / f"layer_{index:02d}-model_{r:02d}-model_states.pt", weights_only=True)
        for r in range(tp)
    ]


def neox_as_hf(folder: Path, config: dict, case: str) -> dict[str, torch.Tensor]:
    """Hugging Face tensors from NeoX files by GPT-NeoX's conventions: column-parallel shards
    concatenated by rows, row-parallel by columns, row-parallel biases summed, norms averaged;
    Llama: per rank [q; k; v] blocks and [up; gate] halves."""
    layers, heads = config["num_layers"], config["num_attention_heads"]
    kv = config.get("num_kv_heads", heads)
    head_dim = config["hidden_size"] // heads

    def cat(shards, dim=0):
        return torch.cat(shards, dim=dim)

    def mean(shards):
        return sum(shards) / len(shards)

    embed = cat([s["word_embeddings.weight"] for s in _neox_layer(folder, config, 0)])
    final = _neox_layer(folder, config, layers + 3)
    head = cat([s["final_linear.weight"] for s in _neox_layer(folder, config, layers + 4)])
    out = {}
    for i in range(layers):
        s = _neox_layer(folder, config, i + 2)
        if case.startswith("gpt_neox"):
            p = f"gpt_neox.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for param in ("weight", "bias"):
                    out[p + f"{norm}.{param}"] = mean([x[f"{norm}.{param}"] for x in s])
            for param in ("weight", "bias"):
                qkv = f"attention.query_key_value.{param}"
                out[p + qkv] = cat([x[qkv] for x in s])
                out[p + f"mlp.dense_h_to_4h.{param}"] = cat([x[f"mlp.linear1.{param}"] for x in s])
            out[p + "attention.dense.weight"] = cat([x["attention.dense.weight"] for x in s], 1)
            out[p + "attention.dense.bias"] = sum(x["attention.dense.bias"] for x in s)
            out[p + "mlp.dense_4h_to_h.weight"] = cat([x["mlp.linear2.weight"] for x in s], 1)
            out[p + "mlp.dense_4h_to_h.bias"] = sum(x["mlp.linear2.bias"] for x in s)
        else:
            p, tp = f"model.layers.{i}.", len(s)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out[p + f"{norm}.weight"] = mean([x[f"{norm}.scale"] for x in s])
            blocks = [
                x["attention.query_key_value.weight"].split(
                    [heads * head_dim // tp, kv * head_dim // tp, kv * head_dim // tp]
                )
                for x in s
            ]
            for j, name in enumerate("qkv"):
                out[p + f"self_attn.{name}_proj.weight"] = cat([b[j] for b in blocks])
            out[p + "self_attn.o_proj.weight"] = cat([x["attention.dense.weight"] for x in s], 1)
            halves = [x["mlp.linear1.weight"].chunk(2) for x in s]
            out[p + "mlp.up_proj.weight"] = cat([h[0] for h in halves])
            out[p + "mlp.gate_proj.weight"] = cat([h[1] for h in halves])
            out[p + "mlp.down_proj.weight"] = cat([x["mlp.linear2.weight"] for x in s], 1)
    if case.startswith("gpt_neox"):
        out["gpt_neox.embed_in.weight"] = embed
        out["gpt_neox.final_layer_norm.weight"] = mean([x["norm.weight"] for x in final])
        out["gpt_neox.final_layer_norm.bias"] = mean([x["norm.bias"] for x in final])
        out["embed_out.weight"] = head
    else:
        out["model.embed_tokens.weight"] = embed
        out["model.norm.weight"] = mean([x["norm.scale"] for x in final])
        out["lm_head.weight"] = head
    return out


@pytest.mark.parametrize("layout", ["sequential", "pipeline"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_export_import_round_trip(tmp_path, sources, case, tp, layout):
    source = sources[case]
    step = export_neox(
        source / "ckpt", [source / "ckpt" / "config.yml"], tmp_path / "neox", tp, layout
    )
    assert step == tmp_path / "neox" / "global_step0"
    assert (tmp_path / "neox" / "latest").read_text() == "global_step0"
    config = yaml.safe_load((tmp_path / "neox" / "config.yml").read_text())
    assert config["model_parallel_size"] == tp
    assert config["pipe_parallel_size"] == (0 if layout == "sequential" else 1)
    names = sorted(p.name for p in step.iterdir())
    ranks = [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    if layout == "sequential":
        assert names == ranks
    else:  # embedding, the two blocks, final norm, head
        layers = [
            f"layer_{i:02d}-model_{r:02d}-model_states.pt"
            for i in (0, 2, 3, 5, 6)
            for r in range(tp)
        ]
        assert names == sorted(layers + ranks)

    # Read by GPT-NeoX's conventions, the files are the original model's tensors.
    original = load_file(source / "hf" / "model.safetensors")
    read = neox_as_hf(step, config, case)
    assert sorted(read) == sorted(original)
    for name, tensor in original.items():
        torch.testing.assert_close(read[name], tensor, atol=1e-6, rtol=0, msg=name)
    folder = tmp_path / "as_hf"
    folder.mkdir()
    shutil.copy(source / "hf" / "config.json", folder)
    save_file({k: v.contiguous() for k, v in read.items()}, folder / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = strata_model(source / "ckpt")(tokens())
        torch.testing.assert_close(hf(tokens()).logits, expected, atol=1e-5, rtol=1e-5)

    # Import: the same Strata model.
    ckpt, state = import_neox(
        tmp_path / "neox", [tmp_path / "neox" / "config.yml"], tmp_path / "back"
    )
    assert state == {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0}
    with torch.no_grad():
        torch.testing.assert_close(strata_model(ckpt)(tokens()), expected, atol=1e-5, rtol=1e-5)


def _rewrite_sequential(step: Path, llama: bool) -> None:
    for path in step.glob("mp_rank_*_model_states.pt"):
        state = torch.load(path, weights_only=True)
        state["module"] = _older_names(state["module"], llama)
        torch.save(state, path)


def _older_names(module: dict, llama: bool) -> dict:
    """Older GPT-NeoX names; for the Llama case (GQA: 4 heads, 2 key/value heads, one rank's
    share of each here) also its older attention rows: per query head, q then an equal share
    of the rank's k rows and of its v rows."""
    renamed = {}
    for key, value in module.items():
        if llama and key.endswith("attention.query_key_value.weight"):
            heads, hd, rest = 2, 16, value.shape[1:]  # per rank of TP 2: 2 heads, 1 kv head
            q, k, v = value.split([heads * hd, hd, hd])
            share = hd // heads
            parts = [q.reshape(heads, hd, *rest)] + [t.reshape(heads, share, *rest) for t in (k, v)]
            renamed[key] = torch.cat(parts, dim=1).reshape(-1, *rest)
        elif llama and key.endswith("mlp.linear1.weight"):
            up, gate = value.chunk(2)
            renamed[key.replace("linear1", "w1")] = gate
            renamed[key.replace("linear1", "w3")] = up
        elif llama:
            renamed[key.replace("mlp.linear2", "mlp.w2")] = value
        else:
            key = key.replace("mlp.linear1", "mlp.dense_h_to_4h")
            renamed[key.replace("mlp.linear2", "mlp.dense_4h_to_h")] = value
    return renamed


def test_import_reads_older_neox_mlp_names(tmp_path, sources):
    """Checkpoints of GPT-NeoX before its MLP rename: dense_h_to_4h / dense_4h_to_h, and the
    LLaMA MLP's w1 (gate), w3 (up), w2 (down)."""
    for case in CASES:
        source, out = sources[case], tmp_path / case
        step = export_neox(source / "ckpt", [source / "ckpt" / "config.yml"], out / "neox", tp=2)

        _rewrite_sequential(step, llama=case.startswith("llama"))
        ckpt, _ = import_neox(out / "neox", [out / "neox" / "config.yml"], out / "back")
        expected, got = read_model_tensors(source / "ckpt"), read_model_tensors(ckpt)
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), (case, name)


def test_imported_run_continues_like_a_strata_resume(tmp_path, sources):
    """A Strata checkpoint at iteration 3 (6 samples consumed) goes out to NeoX (TP 2,
    pipeline) and back; training from the import gives the losses of training from the
    original, at the same iterations and data."""
    source = sources["llama_gqa_untied"]
    config_text = (source / "ckpt" / "config.yml").read_text()
    train_state = {"iteration": 3, "consumed_train_samples": 6, "consumed_valid_samples": 0}
    save_weights_checkpoint(
        tmp_path / "strata",
        read_model_tensors(source / "ckpt"),
        {"config.yml": config_text},
        iteration=3,
        train_state=train_state,
    )
    config = tmp_path / "model.yml"
    values = yaml.safe_load(config_text)
    values.pop("seq_length")
    write_config(config, values)
    export_neox(tmp_path / "strata", [config], tmp_path / "neox", tp=2, layout="pipeline")
    client = torch.load(
        tmp_path / "neox" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=True
    )
    assert (client["iteration"], client["global_samples"], client["module"]) == (3, 6, None)
    ckpt, state = import_neox(
        tmp_path / "neox", [tmp_path / "neox" / "config.yml"], tmp_path / "imported"
    )
    assert state == train_state

    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, VOCAB, (200,), generator=gen).tolist() for _ in range(8)]
    data = write_dataset(tmp_path / "data" / "tokens", docs)
    setup = {
        "data_path": data,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}},
        "min_lr": 1.0e-4,
        "train_micro_batch_size_per_gpu": 2,
        "train_iters": 5,
        "num_gpus": 1,
        "seq_length": 24,
        "split": "100,0,0",
        "no_load_optim": True,
        "log_interval": 1,
    }
    losses = {}
    for name, load in (("strata", tmp_path / "strata"), ("imported", ckpt)):
        run_setup = write_config(
            tmp_path / f"{name}.yml",
            {**setup, "load": str(load), "log_dir": str(tmp_path / f"logs_{name}")},
        )
        result = run_tool("deepy.py", "train.py", str(config), run_setup)
        assert "at iteration 3" in result.stdout + result.stderr
        lines = (tmp_path / f"logs_{name}" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [
            (m["iteration"], m["lm_loss"])
            for m in map(json.loads, lines)
            if m.get("split") == "train"
        ]
    assert [it for it, _ in losses["strata"]] == [4, 5]
    assert losses["imported"] == pytest.approx(losses["strata"], rel=1e-6)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def exported(tmp_path, sources) -> Path:
    source = sources["gpt_neox_parallel"]
    export_neox(source / "ckpt", [source / "ckpt" / "config.yml"], tmp_path / "neox", tp=2)
    return tmp_path / "neox"


def _edited_config(exported: Path, **changes) -> Path:
    values = yaml.safe_load((exported / "config.yml").read_text())
    values.update(changes)
    return Path(write_config(exported.parent / "edited.yml", values))


def test_import_bad_input(tmp_path, exported):
    config = exported / "config.yml"
    (exported / "latest").write_text("global_step7")
    with pytest.raises(ConversionError, match=r"global_step7: not found .*global_step0"):
        import_neox(exported, [config], tmp_path / "out")
    (exported / "latest").write_text("global_step0")
    with pytest.raises(ConversionError, match=r"global_step9: not found"):
        import_neox(exported, [config], tmp_path / "out", iteration=9)
    with pytest.raises(ConversionError, match="neither a NeoX save directory"):
        import_neox(tmp_path, [config], tmp_path / "out")

    wrong = _edited_config(exported, hidden_size=32)
    with pytest.raises(
        ConversionError, match=r"attention.query_key_value.weight: gives \[192, 64\]"
    ):
        import_neox(exported, [wrong], tmp_path / "out")
    wrong = _edited_config(exported, num_layers=3)
    with pytest.raises(ConversionError, match=r"layer 4 input_layernorm.weight: missing"):
        import_neox(exported, [wrong], tmp_path / "out")
    wrong = _edited_config(exported, model_parallel_size=4)
    with pytest.raises(ConversionError, match="model_parallel_size 4.*holds 2"):
        import_neox(exported, [wrong], tmp_path / "out")

    (exported / "global_step0" / "mp_rank_01_model_states.pt").rename(tmp_path / "moved.pt")
    (exported / "global_step0" / "mp_rank_02_model_states.pt").symlink_to(tmp_path / "moved.pt")
    with pytest.raises(ConversionError, match=r"mp_rank_01_model_states.pt: missing"):
        import_neox(exported, [config], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_bad_input(tmp_path, sources):
    source = sources["gpt_neox_parallel"]
    config = source / "ckpt" / "config.yml"
    with pytest.raises(ConversionError, match=r"tensor-parallel size 3 does not divide"):
        export_neox(source / "ckpt", [config], tmp_path / "out", tp=3)
    values = yaml.safe_load(config.read_text())
    values["hidden_size"] = 32
    wrong = write_config(tmp_path / "wrong.yml", values)
    with pytest.raises(ConversionError, match=r"checkpoint has \[192, 64\], the config expects"):
        export_neox(source / "ckpt", [wrong], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_tools(tmp_path, sources, capsys):
    source = sources["gpt_neox_parallel"]
    args = ["--input", str(source / "ckpt"), "--config", str(source / "ckpt" / "config.yml")]
    assert export_main([*args, "--output", str(tmp_path / "neox"), "--tp", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert export_main([*args, "--output", str(tmp_path / "neox")]) == 1
    assert "error: output already exists" in capsys.readouterr().err
    neox = ["--input", str(tmp_path / "neox"), "--config", str(tmp_path / "neox" / "config.yml")]
    assert import_main([*neox, "--output", str(tmp_path / "back")]) == 0
    assert "iteration 0, 0 samples consumed" in capsys.readouterr().out
    assert import_main([*neox, "--output", str(tmp_path / "back2"), "--iteration", "5"]) == 1
    assert "error: " in capsys.readouterr().err


def test_import_with_optimizer_through_ds_to_universal(tmp_path, sources):
    """A real DeepSpeed ZeRO-1 checkpoint of a NeoX-named model after one Adam step on
    sum(p^2) (gradient 2p): the imported moments are 0.1 x 2w and 0.001 x (2w)^2 of the
    original weights w, and a Strata model with Adam loads them."""
    source = sources["gpt_neox_parallel"]
    step = export_neox(source / "ckpt", [source / "ckpt" / "config.yml"], tmp_path / "neox")
    model_file = step / "mp_rank_00_model_states.pt"
    run_tool("tests/_neox_zero.py", str(model_file), str(tmp_path / "zero"), "4")
    config = tmp_path / "neox" / "config.yml"
    ckpt, state = import_neox(tmp_path / "zero", [config], tmp_path / "back", with_optimizer=True)
    assert state == {"iteration": 4, "consumed_train_samples": 1, "consumed_valid_samples": 0}
    folder = ckpt / "global_step4"
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["optimizer_step"] == 1
    assert metadata["optimizer_state_keys"] == ["exp_avg", "exp_avg_sq"]
    original = read_model_tensors(source / "ckpt")
    optim = load_file(folder / "optimizer.safetensors")
    assert sorted(optim) == sorted(
        f"{n}.{k}" for n in original for k in ("exp_avg", "exp_avg_sq", "master")
    )
    for name, weight in original.items():
        grad = 2 * weight
        torch.testing.assert_close(optim[f"{name}.exp_avg"], 0.1 * grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            optim[f"{name}.exp_avg_sq"], 1e-3 * grad**2, atol=1e-7, rtol=1e-4
        )

    args = model_args([ckpt / "config.yml"])
    args.load = str(ckpt)
    model = GPTModel(ModelConfig.from_neox(args))
    adam = torch.optim.Adam(model.parameters())
    assert load_checkpoint(args, model, adam, None)["iteration"] == 4
    for name, param in model.named_parameters():
        held = adam.state[param]
        assert torch.equal(held["exp_avg"], optim[f"{name}.exp_avg"]), name
        assert int(held["step"]) == 1
    with pytest.raises(ConversionError, match="no ZeRO optimizer files"):
        import_neox(tmp_path / "neox", [config], tmp_path / "none", with_optimizer=True)
