"""GainLoRA: gated integration of low-rank adaptation for continual learning of language models."""

__version__ = "0.1.0"


def load_run(path):
    """Load a run directory for inference; see :func:`gainlora.api.load_run`."""
    from gainlora.api import load_run as _load_run

    return _load_run(path)


__all__ = ["load_run"]
