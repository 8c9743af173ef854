"""`python -m sleepctl`: the CLI where the `sleepctl` script is not on PATH (a source tree, a GPU box)."""

from .cli import main

main()
