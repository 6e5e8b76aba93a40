"""`NeoXArgs` with every config rule registered: build configs after importing this module.

The config package (megatron/neox_arguments/) imports nothing from the layers above it; the
model, optimizers, schedules, losses and data code register with it, when imported, the names
a key may take, the checks that need their code and the readers of data-dependent values
(megatron/neox_arguments/rules.py). This module imports all of them, so that every rule runs.
"""

import megatron.data.data_utils  # noqa: F401  (train_epochs -> train_iters)
import megatron.learning_rates  # noqa: F401  (lr_decay_style)
import megatron.losses  # noqa: F401  (train_impl)
import megatron.model  # noqa: F401  (norm, activation, init_method, pos_emb, attention_backend)
import megatron.optimizers  # noqa: F401  (optimizer.type, muP)
import megatron.run_naming  # noqa: F401  (wandb_run_name)
from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.rules import all_registered

all_registered()

__all__ = ["ConfigError", "NeoXArgs"]
