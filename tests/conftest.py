"""Test session setup: a thread cap for a shared CPU, and the ``integration`` mark on everything under
``tests/integration`` so that ``pytest -m "not integration"`` is a fast inner loop. Helpers live in ``helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
