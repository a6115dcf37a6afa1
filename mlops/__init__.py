"""mlops: the top of the house: the CLI, the embedded stack, the demo (below it: the domains, then common)."""

__version__ = "0.1.0"
