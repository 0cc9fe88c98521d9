"""``python -m dplis.train`` end to end on a tiny configuration."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from dplis import train


@pytest.mark.parametrize("method", ["dplis", "dpsgd"])
def test_train_main_tiny(tmp_path, monkeypatch, method):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    out = tmp_path / "result.json"
    result = train.main(["--method", method, "--epochs", "2", "--num-samples", "500",
                         "--batch-size", "50", "--epsilon", "4", "--quiet", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == result["accuracy"] and 0 <= saved["accuracy"] <= 1
    assert 0.99 * 4 <= saved["epsilon"] <= 4
    assert saved["steps"] == 16 and saved["sigma"] > 0
    assert len(saved["history"]) == 2
    assert saved["flags"]["method"] == method
    assert (saved["smoothing_std"] > 0) == (method == "dplis")


def test_train_module_runs_as_a_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dplis.train", "--epochs", "1", "--num-samples", "300",
         "--batch-size", "40", "--perturbations", "2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DPLIS_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout and "epoch 1: loss" in proc.stdout
    assert "step/s" in proc.stderr  # the progress bar


def test_bad_flag_is_refused():
    with pytest.raises(SystemExit):
        train.main(["--method", "sgd"])
    with pytest.raises(SystemExit, match="--low-memory takes one pass per step"):
        train.main(["--low-memory", "--perturbations", "4"])
    with pytest.raises(SystemExit, match="--low-memory runs in fp32 only"):
        train.main(["--low-memory", "--method", "dpsgd", "--precision", "bf16"])
    with pytest.raises(SystemExit, match="--low-memory is a mode of the ghost engine"):
        train.main(["--low-memory", "--method", "dpsgd", "--engine", "vmap"])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: must be in \\(0, ∞\\), got 0"),
    (["--delta", "1"], "argument --delta: must be in \\(0, 1\\), got 1"),
    (["--epsilon", "-1"], "argument --epsilon: must be in"),
    (["--perturbations", "0"], "argument --perturbations: must be in \\[1, ∞\\)"),
    (["--threads", "-1"], "argument --threads: must be in \\[0, ∞\\)"),
    (["--num-samples", "5"], "argument --num-samples: must be in \\[100, ∞\\)"),
    (["--lr", "x"], "argument --lr: expected float, got 'x'"),
    (["--epochs", "inf"], "argument --epochs: must be finite, got inf"),
])
def test_out_of_range_flags_get_a_usage_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--method", "dpsgd", "--perturbations", "4", "--smoothing-std", "0.1"],
     "--method dpsgd takes no smoothing \\(K = 1, s = 0\\): drop --smoothing-std 0.1, "
     "--perturbations 4, or use --method dplis"),
    (["--method", "dpsgd", "--smoothing-radius", "5"], "drop --smoothing-radius 5,"),
    (["--optimizer", "adam", "--momentum", "0.5"],
     "--momentum is SGD's; adam has none .*: drop --momentum 0.5, or use --optimizer sgd"),
    (["--dataset", "mnist", "--data-dir", ".", "--num-samples", "500"],
     "--num-samples sets the size of mnist1d; mnist has its own"),
    (["--overwrite"], "--overwrite needs --checkpoint PATH"),
    (["--model", "cnn"], "--model cnn takes images"),
    (["--model", "conv1d", "--dataset", "mnist", "--data-dir", "."], "--model conv1d takes 1-D"),
    (["--device", "nowhere"], "--device 'nowhere'"),
    (["--resume", "--checkpoint", "missing.pt"], "--resume: no checkpoint at missing.pt"),
])
def test_flags_that_cannot_run_are_refused_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(flags)


def test_resume_with_other_flags_is_refused_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    checkpoint = str(tmp_path / "run.pt")
    flags = ["--num-samples", "200", "--batch-size", "40", "--quiet", "--checkpoint", checkpoint]
    train.main(flags + ["--epochs", "1"])
    saved = f"--resume {re.escape(checkpoint)}: the run was saved with other flags: "
    with pytest.raises(SystemExit, match=saved + "--epochs 1.0 \\(now 2.0\\)"):
        train.main(flags + ["--epochs", "2", "--resume"])
    with pytest.raises(SystemExit, match=saved + "--model 'auto' \\(now 'conv1d'\\)"):
        train.main(flags + ["--epochs", "1", "--resume", "--model", "conv1d"])
    # flags outside the privacy config: the optimizer would keep the saved ones, the
    # smoothing std follow the new --lr, and --seed make another dataset
    with pytest.raises(SystemExit, match=saved + "--lr 0.25 \\(now 0.01\\), --momentum 0.9 "
                                               "\\(now 0.0\\), --seed 0 \\(now 5\\)"):
        train.main(flags + ["--epochs", "1", "--resume", "--lr", "0.01", "--momentum", "0",
                            "--seed", "5"])
    # a file this command did not write (no flags in it): the trainer's own checks
    state = torch.load(checkpoint, weights_only=True)
    del state["extra"]
    torch.save(state, checkpoint)
    with pytest.raises(SystemExit, match=f"--resume {re.escape(checkpoint)}: checkpoint privacy "
                                         "config differs"):
        train.main(flags + ["--epochs", "2", "--resume"])
    with pytest.raises(SystemExit, match=f"--resume {re.escape(checkpoint)}: the checkpoint's "
                                         "model does not fit this run's"):
        train.main(flags + ["--epochs", "1", "--resume", "--model", "conv1d"])


def test_an_existing_checkpoint_is_resumed_or_overwritten_never_replaced_unasked(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    checkpoint = tmp_path / "run.pt"
    flags = ["--num-samples", "200", "--batch-size", "40", "--quiet", "--epochs", "1",
             "--method", "dpsgd", "--perturbations", "1", "--checkpoint", str(checkpoint)]
    first = train.main(flags)
    saved = checkpoint.read_bytes()
    with pytest.raises(SystemExit, match=f"--checkpoint {re.escape(str(checkpoint))}: a file is "
                                         "there already: --resume continues its run, "
                                         "--overwrite starts a new one over it"):
        train.main(flags)
    assert checkpoint.read_bytes() == saved
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags + ["--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert train.main(flags + ["--overwrite"])["history"] == first["history"]  # a new run, seed 0
    # a file whose flags were written with the older defaults (dpsgd recorded K = 4, the image
    # datasets' size 20000) resumes: the flags compare as the run uses them
    state = torch.load(checkpoint, weights_only=True)
    state["extra"]["flags"].update(perturbations=4, smoothing_radius=None)
    torch.save(state, checkpoint)
    resumed = train.main(flags[:-4] + ["--resume", "--checkpoint", str(checkpoint)])
    assert resumed["history"] == first["history"] and resumed["flags"]["perturbations"] == 1


def test_a_damaged_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path):
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--checkpoint", str(checkpoint), "--quiet"])
    message = str(exit_info.value.code)
    assert "truncated, corrupted or not written by PrivateTrainer.save" in message
    assert "weights_only" not in message


def test_output_paths_are_checked_before_training(tmp_path):
    folder, missing = tmp_path / "a folder", tmp_path / "no such folder" / "run.pt"
    folder.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for flag in ("--checkpoint", "--json"):
        for path, message in ((folder, "exists and is not a regular file"),
                              (fifo, "exists and is not a regular file"),
                              (missing, "no folder"), ("", "an empty path")):
            with pytest.raises(SystemExit, match=f"{flag}.*{message}"):
                train.main([flag, str(path), "--quiet"])
    assert fifo.is_fifo()
    one = str(tmp_path / "run.out")
    with pytest.raises(SystemExit, match="--checkpoint and --json are one file"):
        train.main(["--checkpoint", one, "--json", one, "--quiet"])


def test_settings_that_cannot_be_met_end_in_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    small = ["--num-samples", "200", "--batch-size", "40", "--quiet", "--epochs", "1"]
    for flags, message in ((["--epsilon", "1e-4"], "^error: no noise multiplier"),
                           (["--lr", "1e30", "--method", "dpsgd"], "^training diverged at step")):
        with pytest.raises(SystemExit, match=message):
            train.main(small + flags)
    for flag in ("--epochs", "--lr", "--epsilon", "--max-grad-norm", "--smoothing-std"):
        with pytest.raises(SystemExit) as exit_info:
            train.main([flag, "inf"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be finite, got inf" in capsys.readouterr().err


def test_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    checkpoint = str(tmp_path / "run.pt")
    flags = ["--num-samples", "200", "--batch-size", "40", "--quiet", "--epochs", "2",
             "--checkpoint", checkpoint]
    step = train.PrivateTrainer.step

    def interrupt_at(call: int):
        calls = []

        def interrupted(self, x, y):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return step(self, x, y)
        monkeypatch.setattr(train.PrivateTrainer, "step", interrupted)

    interrupt_at(2)  # in the first epoch: nothing saved yet, and it says so
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 130
    assert f"interrupted at step 1 of 8 (no epoch ended: nothing saved in {checkpoint} by " \
           "this run)" in capsys.readouterr().err
    interrupt_at(8)  # in the second epoch, after the first was saved
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 130
    assert f"interrupted at step 7 of 8; --resume continues from step 4, saved in " \
           f"{checkpoint}" in capsys.readouterr().err
    monkeypatch.setattr(train.PrivateTrainer, "step", step)
    resumed = train.main(flags + ["--resume"])
    assert resumed["steps"] == 8
    # the result's history holds the epoch the checkpoint saved, and the one run since
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert resumed["history"][0] == train.read_checkpoint(checkpoint)["extra"]["history"][0]



def test_low_memory_flag_gives_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    flags = ["--epochs", "1", "--num-samples", "300", "--batch-size", "40", "--quiet",
             "--perturbations", "1"]
    base, low = train.main(flags), train.main(flags + ["--low-memory"])
    assert low["flags"]["low_memory"] and low["steps"] == base["steps"]
    for a, b in zip(low["history"], base["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_compile_flag_gives_the_eager_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    flags = ["--epochs", "1", "--num-samples", "300", "--batch-size", "40", "--quiet",
             "--engine", "vmap"]
    eager = train.main(flags)
    torch._dynamo.reset()  # below dynamo's per-function limit, where it would run eager
    counters.clear()
    compiled = train.main(flags + ["--compile"])
    assert counters["stats"]["unique_graphs"] >= 1  # one per batch-size bucket met
    assert compiled["flags"]["compile"] and compiled["flags"]["engine"] == "vmap"
    assert compiled["accuracy"] == eager["accuracy"] and compiled["steps"] == eager["steps"]
    for a, b in zip(compiled["history"], eager["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("flag, device, applied", [
    ([], "cpu", True), (["--malloc", "default"], "cpu", False), ([], "meta", False)])
def test_malloc_flag_decides_whether_freed_memory_is_retained(monkeypatch, flag, device,
                                                              applied):
    class Reached(Exception):
        """run() got past the allocator setup to the data: stop there."""

    def stop(*args, **kwargs):
        raise Reached

    calls = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(train, "load_dataset", stop)
    with pytest.raises(Reached):
        train.run(train.build_parser().parse_args(["--device", device, *flag]))
    assert calls == ([1] if applied else [])


def test_help_gives_each_default_once(capsys):
    """A flag whose default None stands for another value says so in its help: argparse's
    "(default: None)" beside "(default 0.9; ...)" contradicted it."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert "SGD momentum (default 0.9; adam takes none)" in " ".join(text.split())
