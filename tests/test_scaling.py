"""tools/scaling: the Chinchilla fit recovers known laws, sweeps write and run their grid, and
sweep -> collect -> fit runs end to end on tiny models."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _config_fixtures import small_config, write_config
from _slurm import local_slurm, missing_commands, wait_for_job
from conftest import REPO, run_tool

from tools.scaling import law as laws
from tools.scaling import lr_sweep, sweep

# Besiroglu et al. (2024)'s re-fit of Chinchilla (approach 3) on points read off its figure.
EPOCH_AI = laws.Law(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def noisy_runs(law: laws.Law, params, tokens, noise: float, seed: int = 0):
    """Every (N, D) pair of the grids, with the law's loss times log-normal noise."""
    grid_n, grid_d = np.meshgrid(params, tokens)
    n, d = grid_n.ravel(), grid_d.ravel()
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return n, d, loss


def assert_close_law(fitted: laws.Law, true: laws.Law, rel_ae: float, rel_ab: float, exp: float):
    assert fitted.E == pytest.approx(true.E, rel=rel_ae)
    assert fitted.A == pytest.approx(true.A, rel=rel_ab)
    assert fitted.B == pytest.approx(true.B, rel=rel_ab)
    assert fitted.alpha == pytest.approx(true.alpha, abs=exp)
    assert fitted.beta == pytest.approx(true.beta, abs=exp)


def test_the_epoch_ai_chinchilla_parameters_are_fitted_back() -> None:
    # Their data file is not available offline: runs generated from exactly their parameters on
    # a Chinchilla-like grid (44M-16B parameters, 1B-500B tokens) with 0.1% noise.
    n, d, loss = noisy_runs(
        EPOCH_AI, np.geomspace(44e6, 16e9, 9), np.geomspace(1e9, 500e9, 9), 0.001
    )
    fitted = laws.fit(n, d, loss)
    assert_close_law(fitted, EPOCH_AI, rel_ae=0.01, rel_ab=0.1, exp=0.01)
    # Chinchilla's budget: the compute-optimal allocation within 10%.
    for key in ("params", "tokens", "loss"):
        assert fitted.optimal(5.76e23)[key] == pytest.approx(
            EPOCH_AI.optimal(5.76e23)[key], rel=0.1
        )


def test_the_optimum_is_the_minimum_on_the_iso_flop_line() -> None:
    budget = 1e21
    best = EPOCH_AI.optimal(budget)
    n = np.geomspace(best["params"] / 10, best["params"] * 10, 20001)
    losses = EPOCH_AI.loss(n, budget / (6 * n))
    assert n[np.argmin(losses)] == pytest.approx(best["params"], rel=1e-3)
    assert losses.min() == pytest.approx(best["loss"], rel=1e-9)


def write_runs(path: Path, n, d, loss) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["params", "tokens", "loss"])
        writer.writerows(zip(n, d, loss))
    return path


def test_fit_py_recovers_a_synthetic_law_with_intervals_and_plots(tmp_path: Path) -> None:
    true = laws.Law(E=1.7, A=300.0, B=900.0, alpha=0.32, beta=0.28)
    n, d, loss = noisy_runs(true, np.geomspace(1e7, 3e9, 8), np.geomspace(2e8, 2e11, 8), 0.003)
    runs = write_runs(tmp_path / "runs.csv", n, d, loss)
    out = tmp_path / "fit.json"
    run_tool(
        "tools/scaling/fit.py",
        *("--input", str(runs), "--compute", "1e20", "1e22", "--json", str(out)),
        *("--bootstrap", "20", "--plot", str(tmp_path / "law")),
    )
    result = json.loads(out.read_text())
    fitted = laws.Law(**{key: result[key] for key in ("E", "A", "B", "alpha", "beta")})
    assert_close_law(fitted, true, rel_ae=0.02, rel_ab=0.25, exp=0.02)
    for key in ("E", "alpha", "beta"):
        low, high = result["intervals"][key]
        assert low <= result[key] <= high
    assert [o["compute"] for o in result["optimal"]] == [1e20, 1e22]
    for entry in result["optimal"]:
        expected = true.optimal(entry["compute"])
        assert entry["params"] * entry["tokens"] * 6 == pytest.approx(entry["compute"])
        assert entry["loss"] == pytest.approx(expected["loss"], rel=0.01)
        assert entry["params"] == pytest.approx(expected["params"], rel=0.3)
    assert (tmp_path / "law-contours.png").stat().st_size > 10_000
    assert (tmp_path / "law-compute.png").stat().st_size > 10_000


def test_iso_flop_minima_follow_the_law() -> None:
    rows = []
    for budget in (1e18, 1e19, 1e20):
        n = np.geomspace(2e7, 3e9, 9)
        rows += [(x, budget / (6 * x), float(EPOCH_AI.loss(x, budget / (6 * x)))) for x in n]
    n, d, loss = map(np.array, zip(*rows))
    result = laws.isoflop_minima(n, d, loss)
    assert len(result["minima"]) == 3
    for minimum in result["minima"]:
        assert minimum["params"] == pytest.approx(
            EPOCH_AI.optimal(minimum["compute"])["params"], rel=0.15
        )
    exponent = EPOCH_AI.beta / (EPOCH_AI.alpha + EPOCH_AI.beta)
    assert result["params"]["exponent"] == pytest.approx(exponent, abs=0.03)
    # One size per budget: nothing to find the minimum from.
    assert laws.isoflop_minima([1e8, 1e9], [1e10, 1e11], [3.0, 2.5]) is None


def test_fit_py_names_the_bad_column_and_row(tmp_path: Path) -> None:
    bad = tmp_path / "runs.csv"
    bad.write_text("params,tokens\n1e8,1e9\n")
    result = run_tool("tools/scaling/fit.py", "--input", str(bad), check=False)
    assert result.returncode == 2
    assert "expected the columns params, tokens, loss; missing ['loss']" in result.stderr
    bad.write_text("params,tokens,loss\n1e8,1e9,3.1\n1e9,1e10,\n")
    result = run_tool("tools/scaling/fit.py", "--input", str(bad), check=False)
    assert result.returncode == 2
    assert "row 3, column 'loss': expected a positive number, got ''" in result.stderr


def test_sweep_names_and_shapes_each_grid_point() -> None:
    base = small_config(use_mup=True, num_kv_heads=2, lr_decay_fraction=0.8)
    point = {"width": 128, "lr": 0.002, "tokens": 5000.0, "seed": 3}
    assert sweep.run_name(point) == "w128-lr0.002-t5000-s3"
    config = sweep.point_config(base, point)
    # Head size 16 kept, kv heads in proportion, muP's base width the base's width.
    assert (config["hidden_size"], config["num_attention_heads"], config["num_kv_heads"]) == (
        128,
        8,
        4,
    )
    assert config["mup_base_width"] == 64
    assert (
        config["optimizer"]["params"]["lr"] == 0.002 and base["optimizer"]["params"]["lr"] == 1e-3
    )
    assert config["train_iters"] == 40  # ceil(5000 / (4 x 32)) tokens per step
    # An iso-FLOP point: tokens = C / 6N.
    config = sweep.point_config(small_config(), {"flops": 6e9})
    assert config["train_iters"] > 1
    with pytest.raises(ValueError, match="sets lr_decay_iters, but the token budget"):
        sweep.point_config(small_config(lr_decay_iters=10), {"tokens": 1e4})
    with pytest.raises(ValueError, match="--width 100: not a multiple of the base's head size 16"):
        sweep.point_config(small_config(), {"width": 100})


def test_the_lr_parabola_finds_the_optimum_between_points() -> None:
    lrs = np.geomspace(1e-4, 1e-1, 7)
    losses = 3 + 0.05 * (np.log(lrs) - np.log(2e-3)) ** 2
    losses[-1] = 9.0  # a diverged run beyond the neighbours is ignored
    optimum = lr_sweep.parabola_optimum(lrs, losses)
    assert optimum["lr"] == pytest.approx(2e-3, rel=1e-6)
    assert optimum["loss"] == pytest.approx(3.0)
    # The best at the edge of the range: no minimum to report.
    assert lr_sweep.parabola_optimum(lrs, np.linspace(3, 4, 7)) is None


def test_lr_sweep_analyses_a_folder_of_runs(tmp_path: Path) -> None:
    for lr, loss in [(1e-3, 3.4), (3e-3, 3.1), (1e-2, 3.2), (3e-2, float("nan"))]:
        folder = tmp_path / "lr" / "runs" / f"lr{lr:g}"
        config = small_config(log_dir=str(folder / "logs"))
        config["optimizer"]["params"]["lr"] = lr
        write_config(folder / "run.yml", config)
        records = [
            {"iteration": 20, "split": "train", "lm_loss": loss, "consumed_tokens": 2560},
            {"iteration": 20, "split": "valid", "lm_loss": loss, "consumed_tokens": 2560},
        ]
        (folder / "logs").mkdir()
        (folder / "logs" / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    out, plot = tmp_path / "lr.json", tmp_path / "lr.png"
    args = ("analyse", str(tmp_path / "lr"), "--json", str(out), "--plot", str(plot))
    result = run_tool("tools/scaling/lr_sweep.py", *args)
    assert "lr0.03: no finite validation loss; left out" in result.stderr
    found = json.loads(out.read_text())
    assert found["best"] == {"lr": 3e-3, "loss": 3.1}
    assert 1e-3 < found["optimum"]["lr"] < 1e-2 and found["optimum"]["loss"] < 3.1
    assert plot.stat().st_size > 5_000


def test_lr_sweep_run_writes_log_spaced_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "base.yml", small_config())
    out = tmp_path / "lr"
    args = ("--out", str(out), "--lr-min", "1e-4", "--lr-max", "1e-2", "--points", "3")
    result = run_tool("tools/scaling/lr_sweep.py", "run", config, *args, "--seed", "1", "2")
    assert "6 runs in" in result.stdout and "sbatch" in result.stdout
    names = [Path(p).name for p in (out / "runs.txt").read_text().split()]
    assert names == [f"lr{lr}-s{seed}" for lr in ("0.0001", "0.001", "0.01") for seed in (1, 2)]
    assert "#SBATCH --array=0-5" in (out / "sweep.sbatch").read_text()


@pytest.mark.timeout(900)
def test_sweep_collect_fit_end_to_end(tmp_path: Path, text_dataset: str) -> None:
    config = write_config(tmp_path / "base.yml", tiny_base(text_dataset, lr_decay_style="wsd"))
    out = tmp_path / "sweep"
    grid = ("--width", "32", "64", "--tokens", "640", "1280")
    result = run_tool(
        "tools/scaling/sweep.py", config, "seed=5", "--out", str(out), *grid, "--local"
    )
    names = ["w32-t640", "w32-t1280", "w64-t640", "w64-t1280"]
    assert [Path(p).name for p in (out / "runs.txt").read_text().split()] == names
    assert result.stdout.count(": ok,") == 4
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "deepy.py train.py" in script
    run = yaml.safe_load((out / "runs" / "w64-t1280" / "run.yml").read_text())
    assert (run["hidden_size"], run["num_attention_heads"], run["train_iters"], run["seed"]) == (
        64,
        4,
        10,
        5,
    )

    runs = tmp_path / "runs.csv"
    run_tool("tools/scaling/collect.py", str(out), "--output", str(runs))
    rows = {r["name"]: r for r in csv.DictReader(runs.open())}
    assert sorted(rows) == sorted(names)
    row = rows["w64-t1280"]
    assert (int(row["tokens"]), int(row["width"]), int(row["depth"])) == (1280, 64, 1)
    assert int(row["flops"]) == 6 * int(row["params"]) * 1280
    # The run's own count adds attention and logits to the dense 6ND.
    assert float(row["train_flops"]) > 6 * int(row["params_non_embedding"]) * 1280
    assert (row["optimizer"], row["schedule"], row["lr"], row["seed"]) == (
        "Adam",
        "wsd",
        "0.001",
        "5",
    )
    assert float(row["min_train_loss"]) <= float(row["last_train_loss"])
    assert float(rows["w64-t1280"]["loss"]) < float(rows["w32-t640"]["loss"])

    fitted = tmp_path / "fit.json"
    result = run_tool(
        "tools/scaling/fit.py",
        *("--input", str(runs), "--compute", "1e10", "--json", str(fitted), "--bootstrap", "3"),
    )
    assert "4 runs for 5 parameters: the law is underdetermined" in result.stderr
    law = json.loads(fitted.read_text())
    assert law["runs"] == 4 and all(np.isfinite(law[k]) for k in ("E", "A", "B", "alpha", "beta"))
    assert law["optimal"][0]["compute"] == 1e10


def tiny_base(data: str, **overrides) -> dict:
    """A one-layer model validated once, at the end of its few iterations."""
    return small_config(
        data,
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        eval_interval=1000,
        eval_iters=2,
        log_interval=1,
        split="90,10,0",
        **overrides,
    )


@pytest.mark.timeout(900)
def test_the_array_script_runs_under_slurm(tmp_path: Path, text_dataset: str) -> None:
    missing = missing_commands()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs it)")
    config = write_config(tmp_path / "base.yml", tiny_base(text_dataset))
    out = tmp_path / "sweep"
    run_tool("tools/scaling/sweep.py", config, "--out", str(out), "--lr", "1e-3", "3e-3")
    with local_slurm(tmp_path / "slurm") as slurm:
        env = {**os.environ, **slurm, "STRATA_PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
        env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        submitted = subprocess.run(
            ["sbatch", "--parsable", str(out / "sweep.sbatch")],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        job = submitted.stdout.strip().split(";")[0]
        assert [wait_for_job(f"{job}_{index}", slurm) for index in (0, 1)] == ["COMPLETED"] * 2
    for name in ("lr0.001", "lr0.003"):
        records = (out / "runs" / name / "logs" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(records[-1])["split"] == "valid"
    assert len(list((out / "logs").glob("strata-sweep-sweep-*_*.out"))) == 2
