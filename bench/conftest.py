"""Options of the pytest-benchmark suite (``pytest bench --benchmark-only``)."""

from __future__ import annotations

import pytest

from bench.cases import DEFAULT_MODELS
from dplis.private_grad import ENGINES


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dplis bench")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"),
                    help="device of the benchmark cases (default cpu)")
    group.addoption("--bench-batch-size", type=int, default=32,
                    help="examples per step for every case (default 32)")
    group.addoption("--bench-models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated models (default {','.join(DEFAULT_MODELS)})")
    group.addoption("--bench-rounds", type=int, default=5,
                    help="timed steps per case (default 5)")
    group.addoption("--bench-dplis-engine", default=None, choices=ENGINES,
                    help="dplis engine for the dplis_* cases (default: the library default)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's default)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the cases of models not named by --bench-models."""
    wanted = {m for m in config.getoption("--bench-models").split(",") if m}
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        model = callspec.params.get("model") if callspec else None
        (drop if model is not None and model not in wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
