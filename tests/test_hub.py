"""The Hub round trip against a local server speaking the Hub's API (tests/_hub_server.py):
a 3-checkpoint run published as three branches plus main, re-runs that upload nothing, an
interrupted upload that resumes, rate limits waited out, the model card, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _config_fixtures import small_config, write_config, write_dataset
from _hub_server import HubServer
from conftest import REPO, run_tool

pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.timeout(900)

TOKEN = "hf_TestTokenNeverWritten0123456789"
STEPS = (2, 4, 6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained 6 steps with a checkpoint every 2, its metrics and an eval result."""
    root = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 255, (300,), generator=gen).tolist() for _ in range(16)]
    data = write_dataset(root / "data" / "tokens", docs)
    values = small_config(
        data,
        hidden_size=32,
        train_iters=6,
        checkpoint_factor=2,
        eval_interval=3,
        eval_iters=1,
        split="90,10,0",
        seq_length=16,
        max_position_embeddings=16,
        save=str(root / "ckpt"),
        log_dir=str(root / "logs"),
    )
    run_tool("deepy.py", "train.py", write_config(root / "config.yml", values))
    results = {"results": {"toy_task": {"acc,none": 0.375, "acc_stderr,none": 0.1}}}
    results["strata"] = {"iteration": 6}
    (root / "toy_eval_results_2026.json").write_text(json.dumps(results))
    return root / "ckpt"


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


def hub_env(hub: HubServer, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def upload(hub, home: Path, *argv: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/ckpts/upload_to_hf.py", *argv],
        cwd=REPO,
        env=hub_env(hub, home, token),
        capture_output=True,
        text=True,
        timeout=600,
    )


def quick(*argv: str) -> list[str]:
    """Retry settings that keep waits short in tests."""
    return [*argv, "--min-wait", "0.01", "--max-wait", "0.05"]


def puts(requests: list) -> list[str]:
    return [path.rsplit(":", 1)[1] for method, path, _ in requests if method == "PUT"]


def local_bytes(run_dir: Path, step: int) -> dict[str, bytes]:
    folder = run_dir / f"global_step{step}"
    return {
        f"strata/global_step{step}/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def published(hub, run_dir, tmp_path_factory):
    """The run uploaded in both formats to org/full: (result, the requests it made)."""
    home = tmp_path_factory.mktemp("hf-home")
    before = len(hub.requests)
    result = upload(hub, home, *quick("--run", str(run_dir), "--repo", "org/full"))
    assert result.returncode == 0, result.stdout + result.stderr
    return result, hub.requests[before:]


def test_three_checkpoints_become_three_branches_and_main(hub, run_dir, published):
    refs = hub.repos[("models", "org/full")].branches
    assert sorted(refs) == sorted(["main", *(f"global_step{s}" for s in STEPS)])
    for step in STEPS:
        files = hub.files("org/full", f"global_step{step}")
        for path, data in local_bytes(run_dir, step).items():
            assert files[path] == data, path
        assert files["strata/latest"] == f"global_step{step}".encode()
        assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    main = hub.files("org/full", "main")
    assert main == hub.files("org/full", "global_step6")
    # Same bytes on two branches go up once: main's LFS objects were all sent for global_step6.
    sent = puts(published[1])
    assert len(sent) == len(set(sent))


def test_a_model_pulled_back_matches_what_was_pushed(hub, run_dir, published, tmp_path):
    transformers = pytest.importorskip("transformers")
    env = hub_env(hub, tmp_path / "home")
    script = (
        "import sys; from huggingface_hub import snapshot_download; "
        "print(snapshot_download('org/full', revision='global_step4'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    for path, data in local_bytes(run_dir, 4).items():
        assert (snapshot / path).read_bytes() == data
    model = transformers.AutoModelForCausalLM.from_pretrained(snapshot)
    from megatron.checkpoint.reader import read_model_tensors

    strata = read_model_tensors(snapshot / "strata" / "global_step4")
    embedding = model.get_input_embeddings().weight
    rows = embedding.shape[0]
    torch.testing.assert_close(embedding, strata["embedding.word_embeddings.weight"][:rows])


def test_a_rerun_uploads_nothing(hub, run_dir, published, tmp_path):
    before = len(hub.requests)
    result = upload(hub, tmp_path, *quick("--run", str(run_dir), "--repo", "org/full"))
    assert result.returncode == 0, result.stderr
    made = hub.requests[before:]
    assert not puts(made)
    assert not [r for r in made if r[0] == "POST" and "/commit/" in r[1]]
    assert result.stdout.count("complete on the Hub") == len(STEPS) + 1


def test_the_card_holds_the_figures_and_no_token(hub, run_dir, published):
    card = hub.files("org/full", "global_step6")["README.md"].decode()
    metadata = json.loads((run_dir / "global_step6" / "metadata.json").read_text())
    parameters = sum(torch.Size(s).numel() for s in metadata["shapes"].values())
    samples = metadata["train_state"]["consumed_train_samples"]
    assert f"| parameters | {parameters:,}" in card
    assert "| architecture | GPTNeoXForCausalLM |" in card
    assert f"| tokens seen | {samples * 16:,}" in card
    metrics = [json.loads(line) for line in (run_dir.parent / "logs" / "metrics.jsonl").open()]
    last_train = [m for m in metrics if m["split"] == "train" and m["iteration"] <= 6][-1]
    assert f"| train | {last_train['iteration']} | {last_train['lm_loss']:.4f} |" in card
    assert "| toy_task | acc | 0.3750 |" in card
    assert "toy_task" not in hub.files("org/full", "global_step4")["README.md"].decode()
    assert "data_path" in card and "```yaml" in card
    assert f"Bearer {TOKEN}" in hub.authorizations  # it was used...
    result, _ = published
    assert TOKEN not in result.stdout + result.stderr  # ...and never shown or stored
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            assert all(TOKEN.encode() not in (e.data or b"") for e in commit.values())
        assert all(TOKEN.encode() not in blob for blob in repo.lfs.values())
    for path in run_dir.parent.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_an_interrupted_upload_completes_the_rest(hub, run_dir, tmp_path):
    hub.inject("POST", r"org/resume/commit/global_step4", status=None, times=100)
    before = len(hub.requests)
    args = quick("--run", str(run_dir), "--repo", "org/resume", "--format", "strata")
    first = upload(hub, tmp_path, *args, "--max-retries", "2")
    hub.clear_faults()
    assert first.returncode == 1
    assert "still failing after 2 retries" in first.stderr
    branches = hub.repos[("models", "org/resume")].branches
    assert "strata/global_step2/metadata.json" in hub.files("org/resume", "global_step2")
    assert "strata/global_step4/metadata.json" not in hub.files("org/resume", "global_step4")
    middle = len(hub.requests)
    second = upload(hub, tmp_path, *args)
    assert second.returncode == 0, second.stderr
    assert "global_step2: complete on the Hub" in second.stdout
    assert sorted(branches) == sorted(["main", *(f"global_step{s}" for s in STEPS)])
    # global_step4's objects went up before its commit failed: they are not sent again.
    assert not set(puts(hub.requests[before:middle])) & set(puts(hub.requests[middle:]))
    for step in STEPS:
        files = hub.files("org/resume", f"global_step{step}")
        assert all(files[p] == d for p, d in local_bytes(run_dir, step).items())


def test_rate_limits_and_server_errors_are_waited_out(hub, run_dir, tmp_path):
    hub.inject("POST", r"org/limited/commit/", status=429, retry_after=0, times=2)
    hub.inject("POST", r"org/limited/preupload/", status=429, times=1)
    hub.inject("GET", r"org/limited/tree/", status=500, times=1)
    hub.inject("PUT", r"org/limited", status=None, times=1)
    args = quick("--run", str(run_dir), "--repo", "org/limited", "--format", "strata")
    result = upload(hub, tmp_path, *args, "--steps", "2,6", "--delay", "0.01")
    assert result.returncode == 0, result.stdout + result.stderr
    waits = [line for line in result.stdout.splitlines() if "waiting" in line and "retry" in line]
    assert len(waits) == 5, result.stdout
    assert sum("HTTP 429; waiting 0.0 s (Retry-After)" in w for w in waits) == 2
    assert sum("HTTP 429; waiting" in w and "(backoff)" in w for w in waits) == 1
    assert sum("HTTP 500" in w for w in waits) == 1
    assert sum("connection error" in w for w in waits) == 1
    assert "(--delay)" in result.stdout
    assert sorted(hub.repos[("models", "org/limited")].branches) == [
        "global_step2",
        "global_step6",
        "main",
    ]


def test_dry_run_prints_the_plan_and_sends_nothing(hub, run_dir, tmp_path):
    before = len(hub.requests)
    args = ["--run", str(run_dir), "--repo", "org/dry", "--steps", "latest", "--dry-run"]
    result = upload(hub, tmp_path, *args, "--format", "strata", token=None)
    assert result.returncode == 0, result.stderr
    assert len(hub.requests) == before
    assert "global_step6 -> org/dry branch global_step6 and main" in result.stdout
    assert "strata/global_step6/model.safetensors" in result.stdout


@pytest.mark.parametrize(
    "problem, expected",
    [
        (["--repo", "no-namespace"], "expected a repo id namespace/name"),
        (["--steps", "3,4"], "no checkpoint for step(s) 3 (the run has 2, 4, 6)"),
        (["--steps", "two"], "expected all, latest or steps"),
        (["--run", "EMPTY"], "no checkpoints (expected global_stepN folders"),
        (["--token", "none"], "no Hugging Face token: set the HF_TOKEN environment variable"),
    ],
)
def test_bad_input_is_a_clear_error_and_uploads_nothing(hub, run_dir, tmp_path, problem, expected):
    args = {"--run": str(run_dir), "--repo": "org/bad"}
    token = TOKEN
    if problem[0] == "--token":
        token = None
    elif problem == ["--run", "EMPTY"]:
        (tmp_path / "empty").mkdir()
        args["--run"] = str(tmp_path / "empty")
    else:
        args[problem[0]] = problem[1]
    before = len(hub.requests)
    result = upload(hub, tmp_path / "home", *[x for kv in args.items() for x in kv], token=token)
    assert result.returncode == 1
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(hub.requests) == before
    assert ("models", "org/bad") not in hub.repos


def test_backoff_doubles_with_jitter_up_to_the_cap():
    import random

    from megatron.hub.retry import RetryPolicy

    policy, rng = RetryPolicy(max_retries=8, min_wait=1.0, max_wait=10.0), random.Random(0)
    for retry, ceiling in enumerate([1, 2, 4, 8, 10, 10], start=1):
        waits = [policy.backoff(retry, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) == 50  # jittered: clients hitting one limit spread out


def test_git_blob_ids_match_the_server(tmp_path):
    from _hub_server import git_sha1

    from megatron.hub.revisions import LocalFile

    path = tmp_path / "f"
    path.write_bytes(b"abc\n")
    assert LocalFile.from_path("f", path).git_sha1() == git_sha1(b"abc\n")
    assert LocalFile.from_bytes("f", b"abc\n").sha256 == hashlib.sha256(b"abc\n").hexdigest()
    assert re.fullmatch("[0-9a-f]{40}", git_sha1(b""))


def convert_from_hub(hub, home: Path, output: Path, *argv: str, offline: bool = False):
    env = hub_env(hub, home, token=None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "tools/ckpts/convert_hf_to_neox.py", *argv, "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_convert_hf_to_neox_pulls_a_revision_from_the_hub(hub, run_dir, published, tmp_path):
    pytest.importorskip("transformers")
    from megatron.checkpoint.reader import read_model_tensors

    home = tmp_path / "home"
    args = ["--hf-model", "org/full", "--revision", "global_step4"]
    result = convert_from_hub(hub, home, tmp_path / "online", *args)
    assert result.returncode == 0, result.stderr
    commit = hub.repos[("models", "org/full")].branches["global_step4"]
    assert commit in result.stdout
    # A second conversion needs no network: the revision is in huggingface_hub's cache.
    before = len(hub.requests)
    offline = convert_from_hub(hub, home, tmp_path / "offline", *args, offline=True)
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == before
    trained = read_model_tensors(run_dir / "global_step4")
    for folder in (tmp_path / "online", tmp_path / "offline"):
        metadata = json.loads((folder / "global_step0" / "metadata.json").read_text())
        assert metadata["source"] == {
            "hf_model": "org/full",
            "revision": "global_step4",
            "commit": commit,
        }
        assert f"org/full@global_step4 (commit {commit})" in (folder / "config.yml").read_text()
        converted = read_model_tensors(folder)
        for name, tensor in converted.items():
            rows = tuple(slice(0, n) for n in tensor.shape)
            torch.testing.assert_close(tensor, trained[name][rows], rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--hf-model", "org/full", "--revision", "global_step5"],
            "has no revision 'global_step5'",
        ),
        (["--hf-model", "org/missing"], "no such repo on the Hub"),
        (["--hf-model", "not a repo"], "expected a repo id namespace/name"),
    ],
)
def test_convert_from_the_hub_bad_input(hub, published, tmp_path, argv, expected):
    result = convert_from_hub(hub, tmp_path / "home", tmp_path / "out", *argv)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_chat_template_tokenizer_by_hub_id(hub, smollm2_hf, tmp_path, monkeypatch):
    """--tokenizer-path org/name fetches the tokenizer files and tokenizes as the local folder."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # not served locally

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("org/chat-tokenizer", exist_ok=True)
    api.upload_folder(
        repo_id="org/chat-tokenizer",
        folder_path=smollm2_hf,
        allow_patterns=["tokenizer*", "special_tokens_map.json", "*.jinja"],
    )
    records = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        }
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = {}
    for name, tokenizer in (("local", str(smollm2_hf)), ("hub", "org/chat-tokenizer@main")):
        prefix = tmp_path / name / "chat"
        result = subprocess.run(
            [
                sys.executable,
                "tools/datasets/preprocess_data_with_chat_template.py",
                *("--input", str(source), "--output-prefix", str(prefix)),
                *("--tokenizer-path", tokenizer),
            ],
            cwd=REPO,
            env=hub_env(hub, tmp_path / "home", token=None),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        outputs[name] = [
            (prefix.parent / f"chat_{kind}_document.bin").read_bytes()
            for kind in ("messages", "messages_label")
        ]
    assert outputs["hub"] == outputs["local"]
