"""Data-parallel private training: 2 gloo processes on loopback vs one process; bf16."""

import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import LOW_MEMORY, SMOOTH, dropout_model, run, trainer_for
from helpers import cnn_case, mlp_case

from dplis import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(run, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_equal_one_process(ranks):
    model, loss_fn, x, y = mlp_case(batch=8)
    single = trainer_for(model, loss_fn, **SMOOTH)
    loss = single.step(x, y)
    for r in ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-7)
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        # identical seeds on every rank: the same perturbations as the single process
        assert torch.equal(r["generator"], single.generator.get_state())
        assert r["epsilon"] == single.epsilon(1e-5)


def test_two_ranks_equal_one_process_with_low_memory(ranks):
    model, loss_fn, x, y = mlp_case(batch=8)
    trainer_for(model, loss_fn, **LOW_MEMORY).step(x, y)
    for r in ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["low_memory_params"][k], v, rtol=1e-5, atol=1e-7)


def test_datasets_the_ranks_cannot_share_are_refused_on_every_rank(ranks):
    """Ranks given datasets of 40 and 41 examples each divided by their own q·N and fell out
    of step; one example for two ranks crashed one rank with "dataset is empty" and the other
    with gloo's "Connection closed" (the sampling audit)."""
    for r in ranks:
        assert r["sizes"] == ("the ranks passed datasets of [40, 41] examples: every rank "
                              "passes the whole dataset (each samples its own shard of it)")
        assert r["tiny"].startswith("a dataset of 1 examples cannot be shared by 2 ranks")


def test_each_rank_resumes_its_own_poisson_stream(ranks):
    """A checkpoint once held one rank's sampler state, which every rank then loaded: the
    ranks drew the same masks over their shards (examples 2j and 2j + 1 always together)."""
    for r in ranks:
        straight, resumed = r["resume"]
        assert straight == resumed
    shard_positions = [[[i // 2 for i in b] for b in r["resume"][0]] for r in ranks]
    assert shard_positions[0] != shard_positions[1]


def test_a_trainer_without_seed_shares_rank_0s_random_one(ranks):
    assert ranks[0]["random_seed"] == ranks[1]["random_seed"]
    for r in ranks:
        assert "different seeds [0, 1]" in r["different_seeds"]


def test_a_checkpoint_one_rank_cannot_read_is_refused_by_every_rank(ranks):
    """Once, the other ranks loaded it and then waited in their next collective."""
    assert [r["damaged"] for r in ranks] == ["RuntimeError", "ValueError"]
    assert all(r["damaged_unchanged"] for r in ranks)


def test_noise_is_added_once(ranks):
    noise = ranks[0]["noise"]
    assert torch.equal(noise, ranks[1]["noise"])  # every rank applies the same update
    target, n = 1.3 * 2.0 / 8.0, noise.numel()
    assert abs(float(noise.std()) - target) < 6 * target / math.sqrt(2 * n)


def test_ranks_draw_their_own_dropout_masks(ranks):
    first, second = ranks[0]["dropout_norms"], ranks[1]["dropout_norms"]
    assert first.shape == second.shape == (8,)
    assert not torch.allclose(first, second)  # same batch, same generator, other masks
    _, loss_fn, x, y = mlp_case(batch=8)
    alone = trainer_for(dropout_model(), loss_fn)._private_step(x, y).norms
    assert torch.equal(first, alone)  # rank 0 draws the masks of a single process


def test_a_failing_rank_fails_the_step_everywhere(ranks):
    assert ranks[1]["failure"] == "NonFiniteError"
    assert ranks[0]["failure"] == "RuntimeError"
    assert ranks[0]["unchanged"] and ranks[1]["unchanged"]


def test_torchrun_runs_the_training_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dplis.train", "--epochs", "1", "--num-samples", "300", "--batch-size", "40",
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "DPLIS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final test accuracy") == 1  # rank 0 alone logs
    assert "2 ranks" in proc.stdout and (tmp_path / "r.json").exists()


def test_torchrun_refuses_a_bad_output_path_and_changed_flags_on_every_rank(tmp_path):
    """Checked on rank 0 (paths) or after the collective load (flags), every rank stops
    with a message: no rank goes on alone into a collective."""
    def torchrun(*flags):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "dplis.train", "--epochs", "1", "--num-samples",
             "200", "--batch-size", "40", "--quiet", *flags],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "DPLIS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"})

    proc = torchrun("--checkpoint", str(tmp_path / "missing" / "run.pt"))
    assert proc.returncode != 0 and "no folder" in proc.stderr
    assert "rank 0 refused this run's output paths" in proc.stderr
    checkpoint = str(tmp_path / "run.pt")
    assert torchrun("--checkpoint", checkpoint).returncode == 0
    proc = torchrun("--checkpoint", checkpoint, "--resume", "--lr", "0.01")
    assert proc.returncode != 0
    assert proc.stderr.count("the run was saved with other flags: --lr 0.25 (now 0.01)") == 2


@pytest.mark.parametrize("case", [mlp_case, cnn_case])
@pytest.mark.parametrize("engine", ["ghost", "vmap"])  # (low_memory is fp32 only)
def test_bf16_agrees_with_fp32(case, engine):
    grads = {}
    for precision in ("fp32", "bf16"):
        model, loss_fn, x, y = case(batch=8)
        trainer = trainer_for(model, loss_fn, precision=precision, engine=engine)
        trainer.step(x, y)
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()
                                      if p.requires_grad])
    # bf16 keeps 8 mantissa bits: 2^-8 ≈ 0.4 % per value, a few % after the network
    rel = float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert 0 < rel < 0.05, rel  # > 0: autocast really ran in bf16


@pytest.mark.parametrize("completed", [True, False])
def test_close_barriers_and_waits_only_after_a_completed_run(monkeypatch, completed):
    calls = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed, "_release", lambda timeout: calls.append(("wait", timeout)))
    distributed.close(completed)
    wait = ("wait", distributed.RELEASE_TIMEOUT_S)
    assert calls == (["barrier", wait, "destroy"] if completed else ["destroy"])


@pytest.mark.parametrize("enabled", [True, False])
def test_closing_closes_as_completed_only_when_the_block_ran_to_its_end(monkeypatch, enabled):
    calls = []
    monkeypatch.setattr(distributed, "close", calls.append)
    with distributed.closing(enabled):
        pass
    with pytest.raises(KeyError), distributed.closing(enabled):
        raise KeyError("a failed run")
    assert calls == ([True, False] if enabled else [])


def test_collective_tensors_are_held_until_nothing_else_references_them(monkeypatch):
    monkeypatch.setattr(distributed, "_held", [])
    seen = []

    def all_reduce(alias, op):  # a work that keeps its tensor, as gloo's may for a while
        alias.mul_(2)
        # a C++ reference to the alias (an autograd graph saving it), like the work's
        seen.append((torch.ones(3, requires_grad=True) * alias).sum())

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    flat = torch.ones(3)
    views = flat[1:]  # the caller's views do not count
    assert distributed.all_reduce_sum(flat) is flat and torch.equal(flat, torch.full((3,), 2.0))
    assert len(distributed._held) == 1 and distributed._held[0] is not flat
    start = time.monotonic()
    assert not distributed._release(timeout=0.05)  # the "work" still holds it: kept
    assert time.monotonic() - start >= 0.05 and len(distributed._held) == 1
    seen.clear()  # the work is freed
    assert distributed._release() and distributed._held == []
    assert torch.equal(views, torch.full((2,), 2.0))
