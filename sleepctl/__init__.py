"""sleepctl: a sleep cycle for LLM agents. Record memories by day; at night consolidate them into LoRA adapters.

The CLI is a thin layer over these functions, which an agent can call directly.
"""

__version__ = "0.1.0"

from .memories import add_probe, list_memories, record, show_memory  # noqa: E402

__all__ = ["__version__", "record", "add_probe", "list_memories", "show_memory"]
