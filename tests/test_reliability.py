"""Resume without losing budget, secure noise, hostile input."""

import gc
import gzip
import math
import os
import warnings

import pytest
import torch
from helpers import mlp_case
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import dplis
from dplis import data, train
from dplis.secure_noise import secure_gaussian


def _trainer(seed=0, **kw):
    model, loss_fn, _, _ = mlp_case(seed=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2,
                          momentum=0.9)
    args = dict(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.1, seed=seed,
                smoothing_std=0.01, num_perturbations=2, sat_rho=0.02) | kw
    return dplis.PrivateTrainer(model, opt, loss_fn, **args)


def _epoch(trainer, dataset):
    for x, y in trainer.data_loader(dataset):
        trainer.step(x, y)


def test_resume_is_bit_identical(tmp_path):
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(100, 10, generator=g), torch.randint(0, 3, (100,),
                                                                             generator=g))
    straight = _trainer()
    _epoch(straight, dataset)
    _epoch(straight, dataset)
    first = _trainer()
    _epoch(first, dataset)
    first.save(tmp_path / "ckpt.pt")
    resumed = _trainer()
    resumed.load(tmp_path / "ckpt.pt")
    _epoch(resumed, dataset)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.epsilon(1e-5) == resumed.epsilon(1e-5)
    assert straight.accountant.steps == resumed.accountant.steps == 20


def test_resume_into_a_trainer_with_another_seed_keeps_it_and_warns(tmp_path):
    # the checkpoint records the seed (the base of every step's noise seed): the same seed
    # resumes bit for bit; another one (or none) is kept, with a warning, so that two runs
    # forked from one file never share noise
    _, _, x, y = mlp_case()
    first = _trainer(seed=0, dataset_size=50)
    first.step(x, y)
    first.save(tmp_path / "ckpt.pt")
    first.step(x, y)
    after = {}
    for seed in (0, 1, None):
        resumed = _trainer(seed=seed, dataset_size=50)
        if seed == 0:
            resumed.load(tmp_path / "ckpt.pt")
        else:
            with pytest.warns(UserWarning, match="written by a run seeded 0; this trainer keeps"):
                resumed.load(tmp_path / "ckpt.pt")
        resumed.step(x, y)
        after[seed] = {n: p.grad for n, p in resumed.params.items()}
    b = after[0]
    assert all(torch.equal(p.grad, b[n]) for n, p in first.params.items())
    for seed in (1, None):  # fresh noise: about sqrt(2)·σC/E|B| apart per coordinate
        diff = torch.cat([(after[seed][n] - b[n]).flatten() for n in b])
        assert float(diff.std()) > 0.5 * math.sqrt(2) * 1.1 * 1.0 / (0.1 * 50)


def _batches(trainer, dataset, steps):
    """The example ids of the next ``steps`` Poisson batches of ``trainer.data_loader``,
    each step taken (dataset: ids as a float feature, column 0)."""
    ids = []
    for x, y in trainer.data_loader(dataset):
        if len(ids) == steps:
            break
        ids.append(x[:, 0].long().tolist())
        trainer.step(x, y)
    return ids


@pytest.mark.parametrize("fork", [dict(seed=1), dict(seed=2**32), dict(seed=None),
                                  dict(seed=None, secure_rng=True)])
def test_a_fork_draws_its_own_poisson_batches(tmp_path, fork):
    """A trainer of another seed loading a file kept its own noise but restored the file's
    sampler state: it drew the original run's next Poisson batches, released again with
    other noise — two releases of one subsample, which the two runs' accountants would
    compose as independent (the sampling audit: ε 2.9 counted against 4.6 at the training
    command's settings). A fork now draws its own batches; a same-seed resume the same."""
    model, loss_fn, _, _ = mlp_case(seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(100.0)[:, None].expand(100, 10).clone()
    ids[:, 1:] = torch.randn(100, 9, generator=g)
    dataset = TensorDataset(ids, torch.randint(0, 3, (100,), generator=g))

    def make(**kw):
        return _trainer(smoothing_std=0.0, num_perturbations=1, sat_rho=0.0, **(dict(seed=0) | kw))

    secure = fork.get("secure_rng", False)  # a secure run forks secure runs (its seed: random)
    first = make(**fork) if secure else make()
    _batches(first, dataset, 3)
    first.save(tmp_path / "ckpt.pt")
    original = _batches(first, dataset, 6)
    if not secure:
        resumed = make()
        resumed.load(tmp_path / "ckpt.pt")
        assert _batches(resumed, dataset, 6) == original
    forked = make(**fork)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "a fork, not an exact resume"
        forked.load(tmp_path / "ckpt.pt")
    assert forked.accountant.steps == 3
    drawn = _batches(forked, dataset, 6)
    assert all(a != b for a, b in zip(drawn, original)), (drawn, original)


def test_rolling_back_restores_the_model_but_no_privacy_state():
    """A rollback to a snapshot restores the weights and optimizer; the accountant keeps the
    steps taken (privacy spent is not given back, so neither is budget) and the RNGs carry on:
    the step taken again draws fresh noise."""
    _, _, x, y = mlp_case()
    trainer = _trainer(sat_rho=0.0, num_perturbations=1, smoothing_std=0.0, dataset_size=50,
                       target_epsilon=5.0, target_delta=1e-5, steps=3, noise_multiplier=None)
    trainer.step(x, y)
    snapshot = trainer.state_dict()  # a copy: the step below does not change it
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.step(x, y)
    discarded = {n: p.grad.clone() for n, p in trainer.params.items()}
    epsilon = trainer.epsilon()
    rngs = (trainer.generator.get_state(), trainer.sampler_generator.get_state())
    with pytest.warns(UserWarning, match="went back from step 2 to 1: .* keeps the 2 steps"):
        trainer.load_state_dict(snapshot)
    # the RNGs carry on: no Poisson mask or perturbation of the discarded step is drawn again
    assert torch.equal(trainer.generator.get_state(), rngs[0])
    assert torch.equal(trainer.sampler_generator.get_state(), rngs[1])
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)  # the model went back
    assert trainer.accountant.steps == 2 and trainer.epsilon() == epsilon
    trainer.step(x, y)  # the same weights and batch: only the noise differs
    again = {n: p.grad for n, p in trainer.params.items()}
    diff = torch.cat([(again[n] - discarded[n]).flatten() for n in again])
    assert float(diff.std()) > 0.5 * math.sqrt(2) * trainer.noise_multiplier / (0.1 * 50)
    with pytest.raises(dplis.BudgetExceededError):  # 3 steps released: the plan is spent
        trainer.step(x, y)


def test_cli_resume_continues_the_saved_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLIS_CACHE", str(tmp_path))
    flags = ["--epochs", "2", "--num-samples", "300", "--batch-size", "40", "--quiet",
             "--checkpoint", str(tmp_path / "run.pt")]
    full = train.main(flags)
    again = train.main([*flags, "--resume"])  # nothing left to do: same model, same ε
    assert again["steps"] == full["steps"] and again["epsilon"] == full["epsilon"]
    assert again["accuracy"] == full["accuracy"]
    with pytest.raises(SystemExit, match="--checkpoint"):
        train.main(["--resume", "--num-samples", "300", "--batch-size", "40"])


def test_secure_noise_statistics_and_refused_seed():
    z = secure_gaussian(200_001, 2.0)
    n = z.numel()
    assert n == 200_001 and z.dtype == torch.float32
    assert abs(float(z.mean())) < 6 * 2.0 / math.sqrt(n)
    assert abs(float(z.std()) - 2.0) < 6 * 2.0 / math.sqrt(2 * n)
    assert not torch.equal(secure_gaussian(10, 1.0), secure_gaussian(10, 1.0))
    with pytest.raises(ValueError, match="no seed"):
        _trainer(seed=1, secure_rng=True)
    model, loss_fn, x, y = mlp_case()
    with pytest.raises(ValueError, match="no noise_seed"):  # the functional API too
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                           secure_rng=True, noise_seed=5)
    for value in ("False", 1):  # not a bool: refused, never read as on or off
        with pytest.raises(TypeError, match="secure_rng must be True or False"):
            _trainer(seed=None, secure_rng=value)
        with pytest.raises(TypeError, match="secure_rng must be True or False"):
            dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                               secure_rng=value)


def test_secure_mode_trains_and_adds_noise_of_the_right_size():
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 100)
    x, y = torch.randn(4, 400), torch.zeros(4, 100)
    g = dplis.private_grad(model, lambda o, t: (o * 0).sum(), x, y, max_grad_norm=2.0,
                           noise_multiplier=1.5, expected_batch_size=5.0, secure_rng=True)
    flat = torch.cat([t.flatten() for t in g.values()])
    target = 1.5 * 2.0 / 5.0
    assert abs(float(flat.std()) - target) < 6 * target / math.sqrt(2 * flat.numel())
    trainer = _trainer(seed=None, secure_rng=True, dataset_size=50)
    _, _, xb, yb = mlp_case()
    assert math.isfinite(trainer.step(xb, yb)) and trainer.accountant.steps == 1


def test_hostile_batches_leave_the_trainer_untouched():
    trainer = _trainer(dataset_size=50)
    _, _, x, y = mlp_case()
    trainer.step(x, y)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps, gen = trainer.accountant.steps, trainer.generator.get_state().clone()
    bad_batches = [
        ((x.double(), y), TypeError, "float64"),
        ((x[:, :5], y), RuntimeError, None),  # wrong feature size: the model's own error
        ((x, y[:-1]), ValueError, "mismatched"),
        ((torch.full_like(x, float("nan")), y), dplis.NonFiniteError, "NaN"),
    ]
    for (bx, by), error, word in bad_batches:
        with pytest.raises(error, match=word):
            trainer.step(bx, by)
        assert trainer.accountant.steps == steps
        assert torch.equal(trainer.generator.get_state(), gen)
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    # an empty Poisson batch is a valid step: pure noise, privacy spent
    assert math.isnan(trainer.step(x[:0], y[:0])) and trainer.accountant.steps == steps + 1


def test_dataset_too_small_for_the_sample_rate():
    trainer = _trainer()
    with pytest.raises(ValueError, match="almost always empty"):
        trainer.data_loader(TensorDataset(torch.randn(5, 10), torch.zeros(5, dtype=torch.long)))


def test_parameters_on_several_devices_are_refused():
    model, loss_fn, x, y = mlp_case()
    model[2].bias = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one dtype and device"):
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0)


def test_damaged_dataset_files(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError):
        data.load_idx(tmp_path / "bad.idx")
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x10" + b"\x00" * 4)  # says 16 bytes, has 4
    with pytest.raises(ValueError):
        data.load_idx(tmp_path / "cut.gz")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("engine, low_memory, k", [("ghost", True, 1), ("ghost", False, 1),
                                                   ("ghost", False, 2), ("vmap", False, 2),
                                                   ("loop", False, 1)])
def test_steps_leave_no_tensor_behind(engine, low_memory, k):
    """Every engine's step, and a failing one, frees what it made (low_memory=True leaked
    each step's activations through a cycle of its taps' closures and autograd's nodes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, engine=engine, low_memory=low_memory,
              num_perturbations=k, smoothing_std=0.01 if k > 1 else 0.0)
    dplis.private_grad(model, F.cross_entropy, x, y, **kw)  # lazily built state, once
    before = _live_tensors()
    for _ in range(3):
        dplis.private_grad(model, F.cross_entropy, x, y, **kw)
        with pytest.raises(dplis.NonFiniteError):
            dplis.private_grad(model, F.cross_entropy, x * float("inf"), y, **kw)
    assert _live_tensors() == before


def test_save_writes_through_links_and_never_replaces_other_kinds_of_file(tmp_path):
    """Renaming the temporary file over the path replaced whatever was there: /dev/null
    became a regular file when given as a checkpoint, and a link lost its target."""
    trainer = _trainer()
    target, link = tmp_path / "real.pt", tmp_path / "link.pt"
    target.write_bytes(b"old")
    link.symlink_to(target)
    trainer.save(link)
    assert link.is_symlink() and dplis.trainer.read_checkpoint(target)["seed"] == 0
    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for path in (fifo, folder):
        with pytest.raises(ValueError, match="exists and is not a regular file"):
            trainer.save(path)
    assert fifo.is_fifo() and folder.is_dir() and not list(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "link.pt", "pipe",
                                                          "real.pt"]  # no temporary left
