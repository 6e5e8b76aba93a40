"""Publish a run's checkpoints to the Hugging Face Hub, one branch per checkpoint.

    python tools/ckpts/upload_to_hf.py --run SAVE_DIR --repo org/name \
        [--steps all|latest|N,M,...] [--format hf|strata|both] [--private] [--dry-run] \
        [--log-dir DIR] [--max-retries N] [--min-wait S] [--max-wait S] [--delay S]

Each global_stepN becomes the branch `global_stepN`; the run's newest checkpoint also goes to
`main`. A revision whose files are already on its branch (same sizes and hashes) is skipped, so
re-running after an interruption continues where it stopped. 429 and 5xx answers and dropped
connections are retried with exponential backoff and jitter, or after the server's
Retry-After. Each revision gets a model card (README.md) from the checkpoint's metadata, the
run's metrics.jsonl and eval.py's results. The token comes from HF_TOKEN or `hf auth login`
and is never printed or written. HF_ENDPOINT selects another Hub.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from megatron.checkpoint.format import CheckpointError, tag_for
from megatron.cli import exit_status
from megatron.conversion import ConversionError
from megatron.hub.card import RunRecords, config_of, model_card
from megatron.hub.client import HubError, check_repo_id, hub_api, require_token
from megatron.hub.retry import GaveUp, RetryPolicy
from megatron.hub.revisions import (
    FORMATS,
    LocalFile,
    find_checkpoints,
    human_size,
    revision_files,
    select_steps,
    total_size,
)
from megatron.hub.upload import RevisionUploader


def convert(run: Path, configs: list[Path], out: Path, step: int) -> Path:
    from tools.ckpts.convert_neox_to_hf import convert_neox_to_hf

    return convert_neox_to_hf(run, configs, out, iteration=step)[0]


def run_records(run: Path, newest: Path, log_dir: str | None) -> RunRecords:
    """The run's metrics (--log-dir, else the config's log_dir) and eval results (beside the
    save directory, or in the log directory)."""
    if log_dir is None:
        log_dir = config_of(newest)[0].get("log_dir")
    logs = [Path(log_dir)] if log_dir else []
    return RunRecords.read(logs, [run, run.parent, *logs])


def revision(run: Path, step: int, args: argparse.Namespace, records, staging: Path):
    """The files of checkpoint `step`'s revision, its model card included."""
    files = revision_files(run, step, args.format, staging, convert)
    hf_config = next((f.source for f in files if f.repo_path == "config.json"), None)
    architecture = json.loads(hf_config.read_text())["architectures"][0] if hf_config else None
    card = model_card(args.repo, run / tag_for(step), args.format, records, architecture)
    return [*files, LocalFile.from_bytes("README.md", card.encode())]


def print_plan(tag: str, branches: list[str], repo: str, files: list[LocalFile]) -> None:
    size = human_size(total_size(files))
    print(f"{tag} -> {repo} branch {' and '.join(branches)}: {len(files)} files, {size}")
    for f in files:
        print(f"  {f.repo_path} ({human_size(f.size)})")


def upload(args: argparse.Namespace) -> int:
    check_repo_id(args.repo)
    run = Path(args.run)
    checkpoints = find_checkpoints(run)
    steps = select_steps(checkpoints, args.steps)
    newest = max(checkpoints)
    if not args.dry_run:
        require_token()
    records = run_records(run, checkpoints[newest], args.log_dir)
    uploader = None
    if not args.dry_run:
        policy = RetryPolicy(args.max_retries, args.min_wait, args.max_wait)
        uploader = RevisionUploader(hub_api(), args.repo, policy)
        uploader.create_repo(args.private)
    committed = False
    for step in steps:
        tag = tag_for(step)
        branches = [tag, "main"] if step == newest else [tag]
        # One revision's converted folder at a time: a run's worth would fill the disk.
        with tempfile.TemporaryDirectory(prefix="strata-upload-") as staging:
            files = revision(run, step, args, records, Path(staging))
            if uploader is None:
                print_plan(tag, branches, args.repo, files)
                continue
            for branch in branches:
                if committed and args.delay:
                    print(f"waiting {args.delay:.1f} s before the next commit (--delay)")
                    time.sleep(args.delay)
                committed = uploader.upload(branch, files, f"{tag} ({args.format} format)")
    if uploader is not None:
        print(f"done: {args.repo}, {len(steps)} revision(s), {human_size(uploader.sent)} sent")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run's save directory (global_stepN/)")
    parser.add_argument("--repo", required=True, help="Hub repo id, namespace/name")
    parser.add_argument("--steps", default="all", help="all, latest or N,M,... (default: all)")
    parser.add_argument("--format", choices=FORMATS, default="both", help="default: both")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="print what would go where")
    parser.add_argument("--log-dir", help="where metrics.jsonl is (default: the config's log_dir)")
    parser.add_argument("--max-retries", type=int, default=8, help="retries per call (default 8)")
    parser.add_argument("--min-wait", type=float, default=1.0, help="first backoff, s (default 1)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest backoff, s")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds between commits (the Hub's commit rate)"
    )
    args = parser.parse_args(argv)
    if args.max_retries < 0 or args.min_wait < 0 or args.max_wait < args.min_wait:
        parser.error("expected --max-retries >= 0 and 0 <= --min-wait <= --max-wait")
    return exit_status(
        lambda: upload(args), (HubError, GaveUp, CheckpointError, ConversionError, HfHubHTTPError)
    )


if __name__ == "__main__":
    sys.exit(main())
