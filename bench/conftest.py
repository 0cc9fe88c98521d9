"""Options of the pytest-benchmark suite (``pytest bench --benchmark-only``)."""

from __future__ import annotations

import pytest

from bench.cases import MODEL_NAMES


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dplis bench")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"),
                    help="device of the benchmark cases (default cpu)")
    group.addoption("--bench-batch-size", type=int, default=32,
                    help="examples per step for every case (default 32)")
    group.addoption("--bench-models", default=",".join(MODEL_NAMES),
                    help=f"comma-separated models (default {','.join(MODEL_NAMES)})")
    group.addoption("--bench-rounds", type=int, default=5,
                    help="timed steps per case (default 5)")
