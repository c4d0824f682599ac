"""ConfigError, in a module of its own so that modules below engine/config.py (the models, whose config the schema
holds, and the tasks, whose config sections the schema is made of) can raise it without importing the schema."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the dotted key at fault."""
