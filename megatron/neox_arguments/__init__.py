"""NeoX-compatible configuration: typed schema, YAML merging, validation, derived values."""

from megatron.neox_arguments.arguments import NeoXArgs
from megatron.neox_arguments.errors import ConfigError

__all__ = ["ConfigError", "NeoXArgs"]
