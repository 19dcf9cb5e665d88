"""GainLoRA: gated integration of low-rank adaptation for continual learning of language models."""

__version__ = "0.1.0"
