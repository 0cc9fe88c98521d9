"""Smoke test of ``python -m bench``: a tiny run writes the documented JSON schema.

Runs the CLI as a user would (a subprocess from the repository root) on one model with one timed
step, and checks that every mode has a row, that successful rows carry numbers and failed rows
an error, and that the equivalence check ran. Needs the bench extra (opacus).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "opacus", reason="opacus is not installed (benchmark extra: pip install -e '.[bench]')")

ROOT = Path(__file__).resolve().parents[1]
MODES = ["nonprivate", "dplis_k1", "dplis_k4", "dplis_k8", "dplis_k1_secure",
         "dplis_k1_lowmem", "dplis_k1_compiled", "dplis_k4_compiled", "opacus_hooks",
         "opacus_functorch", "opacus_ew", "opacus_ghost"]
ROW_KEYS = {"model", "mode", "batch_size", "examples_per_s", "step_ms", "peak_mem_mb",
            "peak_tensor_mb", "ratio_to_nonprivate", "error"}


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text()), proc.stdout


def test_cli_writes_every_mode_row(tmp_path: Path) -> None:
    data, stdout = run_bench(tmp_path, "--models", "mlp", "--batch-size", "8", "--steps", "2",
                             "--warmup", "0", "--threads", "1")
    assert data["device"] == "cpu"
    assert isinstance(data["torch"], str) and data["torch"]
    rows = data["results"]
    assert [(r["model"], r["mode"]) for r in rows] == [("mlp", m) for m in MODES]
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["batch_size"] == 8
        if r["error"] is None:
            assert r["examples_per_s"] > 0 and r["step_ms"] > 0, r
            assert r["peak_mem_mb"] >= 0 and r["ratio_to_nonprivate"] > 0, r
            assert r["peak_tensor_mb"] > 0, r  # every step allocates (activations at least)
            assert r["examples_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3), rel=1e-3)
        else:
            assert isinstance(r["error"], str) and r["error"]
            assert r["examples_per_s"] is None
    by_mode = {r["mode"]: r for r in rows}
    for mode in ("nonprivate", "dplis_k1", "dplis_k4", "dplis_k8", "dplis_k1_lowmem",
                 "dplis_k1_compiled", "dplis_k4_compiled"):
        assert by_mode[mode]["error"] is None, by_mode[mode]
    assert by_mode["nonprivate"]["ratio_to_nonprivate"] == pytest.approx(1.0)
    # the equivalence check ran, and on the MLP every Opacus mode agrees with dplis K=1
    (check,) = data["equivalence"]
    assert check["model"] == "mlp" and check["dplis_error"] is None
    assert check["low_memory_error"] is None  # low_memory=True matched dplis K=1
    assert "low_memory=True matches dplis K=1" in stdout
    assert {v["opacus_mode"]: v["ok"] for v in check["verdicts"]} == {
        m: True for m in MODES if m.startswith("opacus_")}
    for mode in MODES:
        assert mode in stdout
    assert "allocator: " in stdout and isinstance(data["allocator_env"], dict)


def test_failed_opacus_mode_carries_its_error(tmp_path: Path) -> None:
    # Opacus ghost clipping refuses tied weights (the transformer's head is tied to its embedding)
    data, _ = run_bench(tmp_path, "--models", "transformer", "--modes", "dplis_k1",
                        "opacus_ghost", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                        "--threads", "1", "--in-process")
    rows = {r["mode"]: r for r in data["results"]}
    assert set(rows) == {"dplis_k1", "opacus_ghost"}
    assert rows["dplis_k1"]["error"] is None
    ghost = rows["opacus_ghost"]
    assert ghost["error"] and "tying" in ghost["error"]
    assert ghost["examples_per_s"] is None and ghost["step_ms"] is None


def test_allocator_settings_are_recorded(monkeypatch) -> None:
    from bench.runner import environment

    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert environment()["allocator_env"] == {}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "268435456")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert environment()["allocator_env"] == {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2",
                                              "MALLOC_TRIM_THRESHOLD_": "268435456"}


def test_every_model_takes_a_private_step() -> None:
    """The opt-in models too (``--models all``): the batch fits the model, the loss is finite,
    the documented size holds, and one dplis K = 1 step at batch 2 runs."""
    from bench.cases import (
        DEFAULT_MODELS,
        MODEL_NAMES,
        build_model,
        get_case,
        make_batch,
        make_step,
    )

    assert set(DEFAULT_MODELS) < set(MODEL_NAMES)
    for name in MODEL_NAMES:
        model, (x, y) = build_model(name), make_batch(name, 2)
        out = model(x)
        assert out.shape[0] == 2 and bool(torch.isfinite(get_case(name).loss_fn(out, y)))
        make_step(name, "dplis_k1", 2)()
    size = sum(p.numel() for p in build_model("transformer_t128").parameters())
    assert round(size / 1e6, 2) == 0.88  # as its description and the README say


@pytest.mark.parametrize("name, layers", [("mlp", 3), ("cnn", 4), ("transformer", 9)])
def test_floor_pieces_time_the_computations_they_name(name: str, layers: int) -> None:
    """``bench.floors`` times, per Linear / Conv call, the weight-gradient product, the ghost
    norm and the explicit route: the last two must give the same per-example norms, and the
    first the layer's batch weight gradient; the frozen pass computes no weight gradient."""
    from bench.cases import build_model, get_case, make_batch
    from bench.floors import _frozen_pass, _layer_factors, _norm_pieces

    factors = _layer_factors(name, 5)
    assert len(factors) == layers  # the transformer: 4 Linear per block, 2 blocks, the head
    model, (x, y) = build_model(name), make_batch(name, 5)
    get_case(name).loss_fn(model(x), y).backward()
    weights = dict(model.named_parameters())
    for layer, factor in factors:
        pieces = _norm_pieces(factor)
        norms, _ = pieces["explicit"]()
        torch.testing.assert_close(pieces["ghost"](), norms.square(), rtol=1e-4, atol=1e-6)
        if name != "transformer" or layer != "head":  # the head's weight is the embedding's
            weight = weights[f"{layer}.weight"]
            torch.testing.assert_close(pieces["wgrad"]().reshape(weight.shape), weight.grad,
                                       rtol=1e-4, atol=1e-6)
    frozen, backward = _frozen_pass(name, 5)
    backward()
    assert all(p.grad is None for p in frozen.parameters())


def test_floor_report_verdicts() -> None:
    from bench.floors import format_report

    result = {"model": "m", "parameters": 10, "best_opacus": "opacus_ew",
              "norm_extra_ms": {"fc": 0.1}, "pieces_ms": {"nonprivate": 1.0, "noise": 0.5,
                                                          "pass": 0.4},
              "ratios": {"floor_k1": 1.6, "dplis_k1": 2.0, "floor_k4": 3.0, "dplis_k4": 4.0,
                         "floor_opacus": 1.5, "dplis_opacus": 1.3}}
    lines = format_report([result]).splitlines()
    assert "below the floor" in lines[1]  # K=1: floor 1.6 > 1.3
    assert "met" in lines[2] and "not met" not in lines[2]  # K=4: 4.0 <= 4.4
    assert lines[3].endswith("met") and "floor" not in lines[3]  # 1.3 >= 1.25 Opacus
    result["ratios"] |= {"dplis_k4": 5.0, "floor_opacus": 1.2}
    lines = format_report([result]).splitlines()
    assert "not met; the floor allows it" in lines[2]
    assert lines[3].endswith("met (measured beyond the floor: not a bound in this run)")
    result["ratios"] |= {"dplis_opacus": 1.1}
    assert "below the floor" in format_report([result]).splitlines()[3]  # at most 1.2x
    result["ratios"] |= {"floor_k1": 1.35, "dplis_k1": 1.28}  # a step beating its floor
    assert format_report([result]).splitlines()[1].endswith(
        "  met (measured beyond the floor: not a bound in this run)")


def test_floors_command_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "floors.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.floors", "--models", "mlp", "--batch-size", "4",
         "--steps", "1", "--rounds", "1", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())["results"]
    pieces = result["pieces_ms"]
    for key in ("nonprivate", "dplis_k1", "dplis_k4", "noise", "perturbation", "pass", "ghost:1",
                "explicit:1", "wgrad:1", "opacus_ew"):
        assert pieces[key] > 0, key
    assert set(result["norm_extra_ms"]) == {"1", "3", "5"}  # the MLP's three Linear layers
    floor = pieces["nonprivate"] + pieces["noise"] + sum(result["norm_extra_ms"].values())
    assert result["floor_ms"]["k1"] == pytest.approx(floor)
    assert result["floor_ms"]["k4"] == pytest.approx(floor + 3 * pieces["pass"]
                                                     + 4 * pieces["perturbation"])
    assert "K=1 x non-private" in proc.stdout and "verdict" in proc.stdout


def test_floors_stop_with_the_error_of_a_failing_piece(monkeypatch) -> None:
    import bench.floors as floors

    def step_or_fail(name, mode, batch_size):
        if mode == "dplis_k1":
            def fail():
                raise ValueError("boom")
            return fail
        return lambda: None

    monkeypatch.setattr(floors, "make_step", step_or_fail)
    with pytest.raises(RuntimeError, match="mlp: pieces failed, no floor: .*dplis_k1.*boom"):
        floors.floors("mlp", 4, steps=1, rounds=1)
