"""Datasets (docs/data.md).

- ``llava_json``: LLaVA-style JSON records (multi-turn, optional ``task``), validated with precise errors;
- ``sources``: what a site's ``--data`` path means (site folder, FedVLMBench client file, JSON file, HF datasets dir);
- ``collate``: model batches (every assistant turn trained on);
- ``digits``, ``scenes``, ``builtin``: the built-in offline datasets (``fedvlm data build``);
- ``partition``: IID / Dirichlet / quantity / attribute / task splits and their report (``fedvlm data partition``).
"""

from fedvlm.data.llava_json import DataError, Example, load_llava_json

__all__ = ["DataError", "Example", "load_llava_json"]
