"""Benchmarks, prompts and the task-stream data module."""
from gainlora.data.types import DataError, Example, TaskData

__all__ = ["DataError", "Example", "TaskData"]
