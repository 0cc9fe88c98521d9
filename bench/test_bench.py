"""pytest-benchmark suite: the same cases as ``python -m bench``.

    pytest bench --benchmark-only                          # compare modes, grouped by model
    pytest bench --benchmark-only --benchmark-autosave     # save the run under .benchmarks/
    pytest bench --benchmark-only --benchmark-compare      # compare with the last saved run
    pytest bench --benchmark-only --bench-models mlp --bench-batch-size 64 --bench-threads 1

Not part of the default test run (``pytest`` collects ``tests/`` only). Before the first case of
a model runs, dplis K = 1 is checked against every Opacus mode with noise 0
(``bench.equivalence``): a dplis mismatch fails, an Opacus mode that cannot run the model or
disagrees is skipped with its error as the reason.
"""

from __future__ import annotations

import warnings

import pytest

from bench.cases import MODEL_NAMES, MODES, OPACUS_MODES, Settings, dplis_options, make_step
from bench.equivalence import EQUIVALENCE_MAX_BATCH, check_model

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session")
def bench_config(request: pytest.FixtureRequest) -> dict:
    opt = request.config.getoption
    device = opt("--bench-device")
    if opt("--bench-threads"):
        import torch

        torch.set_num_threads(opt("--bench-threads"))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--bench-device cuda: CUDA is not available")
    return {"device": device, "batch_size": opt("--bench-batch-size"),
            "rounds": opt("--bench-rounds"),
            "settings": Settings(dplis_engine=opt("--bench-dplis-engine"))}


@pytest.fixture(scope="session")
def equivalence(bench_config: dict):
    """model -> ModelCheck, computed once per model on first use."""
    cache = {}

    def get(model: str):
        if model not in cache:
            cache[model] = check_model(
                model, min(bench_config["batch_size"], EQUIVALENCE_MAX_BATCH),
                device=bench_config["device"],
                dplis_options=dplis_options(bench_config["settings"]))
        return cache[model]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_step(benchmark, bench_config: dict, equivalence, model: str, mode: str) -> None:
    if mode in OPACUS_MODES or mode.startswith("dplis_"):
        check = equivalence(model)
        error = check.mode_error(mode)
        if error is not None:
            if mode in OPACUS_MODES:
                pytest.skip(f"{mode} on {model}: {error}")
            pytest.fail(f"{mode} on {model}: {error}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = make_step(model, mode, bench_config["batch_size"], device=bench_config["device"],
                         settings=bench_config["settings"])
        step()  # first call: tracing / lazy initialisation
    benchmark.group = f"{model} batch {bench_config['batch_size']}"
    benchmark.name = f"{model}-{mode}"
    benchmark.extra_info.update(model=model, mode=mode, batch_size=bench_config["batch_size"],
                                device=bench_config["device"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(step, rounds=bench_config["rounds"], warmup_rounds=1, iterations=1)
