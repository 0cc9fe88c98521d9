"""``python -m dplis.experiments.compare`` on tiny configurations (a few seconds each)."""

import json
import os
import subprocess
import sys

import pytest

from dplis.data import load_mnist1d
from dplis.experiments import compare

pytest.importorskip("matplotlib")

TINY = ["--num-samples", "400", "--epochs", "1", "--batch-size", "40", "--epsilons", "4",
        "--quiet"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_tiny_comparison_writes_json_markdown_and_png(cache):
    out = cache / "out"
    methods = ["dpsgd", "dplis", "dplis-linear", "dpsat"]
    result = compare.main([*TINY, "--seeds", "2", "--methods", *methods, "--grid-lr", "0.5",
                           "--grid-max-grad-norm", "1", "--grid-radius", "5", "--grid-rho",
                           "0.1", "--out", str(out), "--prefix", "tiny"])

    saved = json.loads((out / "tiny.json").read_text())
    assert saved["runs"] == result["runs"] and len(saved["runs"]) == len(methods) * 2
    assert {r["method"] for r in saved["runs"]} == set(methods)
    assert all(0 <= r["accuracy"] <= 1 and r["epsilon_spent"] <= 4 for r in saved["runs"])
    assert len({r["sigma"] for r in saved["runs"]}) == 1  # identical privacy for every method
    assert len({r["steps"] for r in saved["runs"]}) == 1
    # one tuning run per configuration: dpsgd, dplis (shared by dplis-linear), dpsat
    assert [t["method"] for t in saved["tuning"]["trials"]] == ["dpsgd", "dplis", "dpsat"]
    assert saved["tuning"]["grid"]["dplis"] == {"lr": [0.5], "radius": [5.0], "K": [4]}
    chosen = {c["method"]: c["params"] for c in saved["chosen"]}
    assert chosen["dplis-linear"] == chosen["dplis"] and chosen["dplis"]["radius"] == 5.0
    assert chosen["dpsgd"]["radius"] is None and chosen["dpsat"]["rho"] == 0.1
    rows = {r["method"]: r for r in saved["summary"]}
    assert rows["dplis"]["n"] == 2 and rows["dplis"]["paired"] == 2 and "diff_mean" not in \
        rows["dpsgd"]

    table = (out / "tiny.md").read_text()
    assert "| method | ε = 4 | Δ at ε = 4 | time / run (s) | × DP-SGD |" in table
    for label in ("DP-SGD", "DPlis", "DPlis, r linear → 0", "DP-SAT"):
        assert f"| {label} |" in table

    from matplotlib.image import imread

    image = imread(out / "tiny.png")
    assert image.shape[:2] == (480, 640) and saved["figure_size"] == [640, 480]
    assert image.std() > 0  # something was drawn


def test_same_seed_same_accuracy(cache):
    train, test = load_mnist1d(300, seed=0)
    common = {"dataset": "mnist1d", "model_name": "mlp", "epsilon": 4.0, "delta": 1e-5,
              "epochs": 1.0, "batch_size": 30}
    for name in ("dplis", "dpsat"):  # random perturbations, and DP-SAT's state
        method = compare.METHODS[name]
        params = compare.method_params(method, {"lr": 0.5, "max_grad_norm": 1.0, "radius": 20.0,
                                                "K": 3, "rho": 1.0})
        a, b, c = (compare.train_and_evaluate(train, test, method=method, params=params,
                                              seed=seed, **common) for seed in (3, 3, 4))
        assert a["accuracy"] == b["accuracy"] and a["sigma"] == c["sigma"]
        assert a["steps"] == b["steps"] == 8  # 240 train examples, q = 30 / 240

    args = [*TINY, "--no-tune", "--seeds", "2", "--methods", "dpsgd", "dplis",
            "--out", str(cache / "out")]
    first, second = compare.main(args), compare.main(args)
    assert [r["accuracy"] for r in first["runs"]] == [r["accuracy"] for r in second["runs"]]
    assert first["chosen"][1]["params"] == {**compare.preset_for("dplis", 4.0), "rho": None}


def test_tuning_grid_gives_every_method_the_same_budget():
    sizes = {key: len(compare.grid_for(key, compare.GRID, compare.FIXED))
             for key in compare.TUNED}
    assert len(set(sizes.values())) == 1, sizes
    dplis = compare.grid_for("dplis", compare.GRID, compare.FIXED)
    assert all(c["max_grad_norm"] == compare.FIXED["max_grad_norm"] for c in dplis)
    assert compare.preset_for("dpsgd", 2.0) == compare.PRESETS[3.0]["dpsgd"]  # nearest in log ε
    assert set(compare.FULL["methods"]) == set(compare.METHODS)


def test_bad_arguments_are_refused(cache):
    with pytest.raises(SystemExit):
        compare.main(["--methods", "sgd"])
    with pytest.raises(SystemExit):
        compare.main([*TINY, "--seeds", "0"])


def test_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "dplis.experiments.compare", "--help"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "Tuning grid per ε" in proc.stdout


def _write_idx(path, array):
    import struct

    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def test_all_datasets_runs_the_images_found_in_data_dir(cache):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    data = cache / "data"
    data.mkdir()
    for split, n in (("train", 120), ("t10k", 30)):
        _write_idx(data / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), np.uint8))
        _write_idx(data / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,), np.uint8))
    result = compare.main([*TINY, "--dataset", "all", "--data-dir", str(data), "--no-tune",
                           "--seeds", "1", "--methods", "dpsgd", "--out", str(cache / "out")])
    # MNIST files found; Fashion-MNIST would be the same files (skipped); no CIFAR-10
    assert [d["name"] for d in result["datasets"]] == ["mnist1d", "mnist"]
    assert result["datasets"][1]["model"] == "cnn" and len(result["runs"]) == 2
    assert tuple(result["figure_size"]) == (1280, 480)
