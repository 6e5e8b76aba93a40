"""Train a model: `python deepy.py train.py CONFIG.yml [...]` (or `python train.py CONFIG.yml`)."""

import sys

from megatron.entry import run_entry_point
from megatron.training import pretrain

if __name__ == "__main__":
    sys.exit(run_entry_point(pretrain))
