"""Errors that the entrypoints report as one line on stderr (the full traceback with HYDRA_FULL_ERROR=1)."""

# What fewshot-eval's errors suggest for its checkpoint (not set, or not there)
CHECKPOINT_HINT = "outputs/<run>/checkpoints/best.pt"


class FewshotError(RuntimeError):
    """A problem with the user's input, data or environment; the message says what to change."""


class ConfigError(FewshotError):
    """A setting is out of range or inconsistent."""
