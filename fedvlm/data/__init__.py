"""Datasets: LLaVA-style JSON site folders and the built-in offline digits set."""

from fedvlm.data.llava_json import DataError, Example, load_llava_json

__all__ = ["DataError", "Example", "load_llava_json"]
