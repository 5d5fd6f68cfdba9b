"""Fixtures shared by the test modules: one preset cache and one digits dataset per session, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedvlm.data.digits import build_digits


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and they crawl when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fedvlm_cache(tmp_path_factory) -> Path:
    """One preset cache per test session, exported as FEDVLM_CACHE (presets are built once, then reused)."""
    cache = tmp_path_factory.getbasetemp() / "fedvlm-cache"
    old = os.environ.get("FEDVLM_CACHE")
    os.environ["FEDVLM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FEDVLM_CACHE", None)
    else:
        os.environ["FEDVLM_CACHE"] = old


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The built-in digits dataset (3 sites + held-out set), built once per session."""
    out = tmp_path_factory.getbasetemp() / "digits"
    if not (out / "test.json").exists():
        build_digits(out)
    return out
