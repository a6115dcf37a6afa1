"""mlops: the CLI, settings and error base shared by serving, monitoring and retraining."""

__version__ = "0.1.0"
