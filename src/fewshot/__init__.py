"""fewshot: a command-line experiment runner for few-shot meta-learning."""

__version__ = "0.1.0"
