"""PrivateTrainer: steps, calibration, smoothing radius, atomic failure, state, bad input."""

import copy
import os
import random
import warnings

import pytest
import torch
from helpers import OutsideUse, mlp_case
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import dplis
from dplis import accounting
from dplis.ghost import GhostUnsupported
from dplis.private_grad import step_noise_seed
from dplis.reference import naive_private_grad


def make(**kw):
    model, loss_fn, x, y = mlp_case(batch=8)
    opt_name = kw.pop("optimizer", "sgd")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
           "adam": lambda: torch.optim.Adam(params, lr=0.01),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.01)}[opt_name]()
    args = dict(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0, seed=0,
                dataset_size=80) | kw
    return dplis.PrivateTrainer(model, opt, loss_fn, **args), x, y


def snapshot(trainer):
    return (copy.deepcopy(trainer.model.state_dict()),
            copy.deepcopy(trainer.optimizer.state_dict()),
            list(trainer.accountant.history), trainer.generator.get_state().clone())


def same(a, b):
    (m1, o1, h1, g1), (m2, o2, h2, g2) = a, b
    return (all(torch.equal(m1[k], m2[k]) for k in m1) and h1 == h2 and torch.equal(g1, g2)
            and str(o1) == str(o2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_step_updates_model_and_accountant(optimizer):
    trainer, x, y = make(optimizer=optimizer)
    before = copy.deepcopy(trainer.model.state_dict())
    loss = trainer.step(x, y)
    assert isinstance(loss, float) and loss > 0
    after = trainer.model.state_dict()
    assert torch.equal(before["0.weight"], after["0.weight"])  # frozen layer untouched
    assert not torch.equal(before["2.weight"], after["2.weight"])
    assert trainer.accountant.steps == 1
    assert trainer.epsilon(1e-5) == pytest.approx(accounting.compute_epsilon(1.0, 0.1, 1, 1e-5))


def test_step_writes_the_private_gradient():
    trainer, x, y = make(noise_multiplier=0.0)
    expected = dplis.private_grad(trainer.model, trainer.loss_fn, x, y, max_grad_norm=1.0,
                                  noise_multiplier=0.0, expected_batch_size=8.0)
    trainer.step(x, y)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name])


def test_seed_makes_runs_reproducible():
    runs = []
    for _ in range(2):
        trainer, x, y = make(smoothing_std=0.01, num_perturbations=2)
        for _ in range(3):
            trainer.step(x, y)
        runs.append(trainer.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_calibration_from_target_epsilon():
    trainer, _, _ = make(noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, epochs=3)
    assert trainer.max_steps == 30
    eps = trainer.planned_epsilon(trainer.max_steps)
    assert 0.99 * 2.0 <= eps <= 2.0


def test_budget_guard_refuses_extra_step():
    trainer, x, y = make(noise_multiplier=None, target_epsilon=8.0, target_delta=1e-5, steps=2)
    trainer.step(x, y)
    trainer.step(x, y)
    before = snapshot(trainer)
    with pytest.raises(dplis.BudgetExceededError, match="target_epsilon"):
        trainer.step(x, y)
    assert same(before, snapshot(trainer))
    assert trainer.epsilon() <= 8.0


def test_smoothing_radius_follows_the_authors_unit():
    trainer, _, _ = make(smoothing_radius=3.0, noise_multiplier=1.5)
    # s = r · lr · σ · C / expected batch size = 3 · 0.1 · 1.5 · 1 / (0.1 · 80)
    assert trainer.current_smoothing_std() == pytest.approx(3 * 0.1 * 1.5 / 8)


def test_failing_step_changes_nothing():
    trainer, x, y = make(smoothing_std=0.01, num_perturbations=2)
    trainer.step(x, y)
    before = snapshot(trainer)
    bad = x.clone()
    bad[3] = float("inf")
    with pytest.raises(dplis.NonFiniteError):
        trainer.step(bad, y)
    with pytest.raises(ValueError, match="mismatched"):
        trainer.step(x, y[:3])
    assert same(before, snapshot(trainer))


def test_auto_keeps_the_engine_its_first_step_ran(monkeypatch, tmp_path):
    """"auto" starts on ghost; a model ghost cannot handle (a parameter used outside its
    layer) runs the vmap engine from the first step on, without a ghost attempt per step."""
    from helpers import OutsideUse

    from dplis import ghost

    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 10, (4, 5)), torch.randint(0, 10, (4,))

    def trainer_of(model, **kw):
        return dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    torch.nn.functional.cross_entropy, sample_rate=0.1,
                                    max_grad_norm=1.0, noise_multiplier=1.0,
                                    expected_batch_size=4, seed=0, **kw)

    attempts = []
    real = ghost.clipped_sum
    monkeypatch.setattr(ghost, "clipped_sum", lambda *a, **k: attempts.append(1) or real(*a, **k))
    trainer = trainer_of(OutsideUse())
    assert trainer.engine == "ghost"  # before any step: the optimistic choice
    for _ in range(3):
        trainer.step(tokens, labels)
    assert trainer.engine == "vmap" and len(attempts) == 1  # one ghost attempt, then vmap
    ok = trainer_of(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 10)))
    ok.step(tokens, labels)
    assert ok.engine == "ghost"
    # a resumed trainer checks again on its first step: ghost forced on this model refuses
    trainer.save(tmp_path / "run.pt")
    resumed = trainer_of(OutsideUse(), engine="ghost")
    resumed.load(tmp_path / "run.pt")
    before = snapshot(resumed)
    with pytest.raises(ghost.GhostUnsupported, match="do not add up"):
        resumed.step(tokens, labels)
    assert same(before, snapshot(resumed))


def test_data_loader_is_poisson_and_sets_batch_size():
    model, loss_fn, _, _ = mlp_case()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = dplis.PrivateTrainer(model, opt, loss_fn, sample_rate=0.05, max_grad_norm=1.0,
                                   noise_multiplier=1.0, seed=1)
    data = TensorDataset(torch.randn(200, 10), torch.randint(0, 3, (200,)))
    loader = trainer.data_loader(data)
    assert trainer.expected_batch_size == pytest.approx(10.0)
    sizes = [len(y) for x, y in loader]
    assert len(sizes) == 20 and len(set(sizes)) > 1
    for x, y in trainer.data_loader(data):
        trainer.step(x, y)
    assert trainer.accountant.steps == 20


def test_state_dict_round_trip(tmp_path):
    trainer, x, y = make()
    trainer.step(x, y)
    trainer.save(tmp_path / "ckpt.pt")
    trainer.step(x, y)
    expected = copy.deepcopy(trainer.model.state_dict())
    other, _, _ = make()
    other.load(tmp_path / "ckpt.pt")
    assert other.accountant.steps == 1
    other.step(x, y)
    assert all(torch.equal(expected[k], other.model.state_dict()[k]) for k in expected)


def test_load_refuses_other_privacy_config_and_damaged_files(tmp_path):
    trainer, x, y = make()
    trainer.save(tmp_path / "ckpt.pt")
    other, _, _ = make(noise_multiplier=2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load(tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted or not written by"):
        trainer.load(tmp_path / "cut.pt")


@pytest.mark.parametrize("kw,error,word", [
    (dict(sample_rate=0.0), ValueError, "sample_rate"),
    (dict(sample_rate=1.2), ValueError, "sample_rate"),
    (dict(max_grad_norm=0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=10**400), ValueError, "max_grad_norm must be finite"),
    (dict(noise_multiplier=-0.5), ValueError, "noise_multiplier"),
    (dict(num_perturbations=0), ValueError, "num_perturbations"),
    (dict(smoothing_std=-1.0), ValueError, "smoothing_std"),
    (dict(smoothing_std=0.1, smoothing_radius=1.0), ValueError, "not both"),
    (dict(noise_multiplier=None), ValueError, "exactly one"),
    (dict(target_epsilon=1.0), ValueError, "exactly one"),
    (dict(noise_multiplier=None, target_epsilon=0.0, target_delta=1e-5, epochs=1), ValueError,
     "target_epsilon"),
    (dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1.0, epochs=1), ValueError,
     "delta"),
    (dict(noise_multiplier=None, target_epsilon=1.0, epochs=1), ValueError, "target_delta"),
    (dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5, epochs=1, steps=3),
     ValueError, "not both"),
    (dict(accountant="moments"), ValueError, "accountant"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(seed=2**63), ValueError, "seed must be an int <= 9223372036854775807"),
    # refused when the trainer is made, not at its first step (the failing-step audit)
    (dict(max_physical_batch_size=0), ValueError, "max_physical_batch_size must be an int >= 1"),
    (dict(perturbation_chunk_size=-1), ValueError,
     "perturbation_chunk_size must be an int >= 1"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
    # the precision named first, not low_memory's fp32-only rule
    (dict(precision="fp16", low_memory=True), ValueError, "precision must be one of"),
])
def test_bad_arguments(kw, error, word):
    with pytest.raises(error, match=word):
        make(**kw)


def test_bad_models():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    kw = dict(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="no trainable parameter"):
        dplis.PrivateTrainer(nn.Linear(2, 2).requires_grad_(False), opt, None, **kw)
    with pytest.raises(ValueError, match="GroupNorm"):
        dplis.PrivateTrainer(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), opt, None, **kw)


def _clone_gen(gen):
    clone = torch.Generator()
    clone.set_state(gen.get_state())
    return clone


def test_dpsat_takes_the_gradient_at_the_ascent_point():
    rho = 0.05
    trainer, x, y = make(sat_rho=rho)
    model = trainer.model
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8.0)
    # first step: plain DP-SGD at θ
    first = dplis.private_grad(model, trainer.loss_fn, x, y, noise_seed=step_noise_seed(0, 0),
                               generator=_clone_gen(trainer.generator), **kw)
    trainer.step(x, y)
    g_prev = torch.cat([first[n].reshape(-1) for n in first])
    torch.testing.assert_close(trainer.prev_grad, g_prev)
    # second step: the gradient at θ + ρ·g_prev/‖g_prev‖, on an explicitly shifted copy
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in shifted.named_parameters():
            if p.requires_grad:
                p.add_(rho * first[name] / g_prev.norm())
    expected = dplis.private_grad(shifted, trainer.loss_fn, x, y,
                                  noise_seed=step_noise_seed(0, 1),
                                  generator=_clone_gen(trainer.generator), **kw)
    trainer.step(x, y)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name])


def test_accounting_is_identical_for_dpsgd_dplis_and_dpsat():
    eps = []
    for kw in (dict(), dict(smoothing_std=0.01, num_perturbations=3), dict(sat_rho=0.1)):
        trainer, x, y = make(**kw)
        for _ in range(3):
            trainer.step(x, y)
        eps.append(trainer.epsilon(1e-5))
    assert eps[0] == eps[1] == eps[2]


def test_smoothing_schedules():
    trainer, x, y = make(smoothing_std=0.2, smoothing_schedule="linear", noise_multiplier=None,
                         target_epsilon=8.0, target_delta=1e-5, steps=4)
    stds = []
    for _ in range(4):
        stds.append(trainer.current_smoothing_std())
        trainer.step(x, y)
    assert stds == pytest.approx([0.2, 0.15, 0.1, 0.05])
    trainer, x, y = make(smoothing_std=0.2, smoothing_schedule="lr")
    trainer.optimizer.param_groups[0]["lr"] = 0.05
    assert trainer.current_smoothing_std() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="smoothing_schedule"):
        make(smoothing_schedule="cosine")
    with pytest.raises(ValueError, match="decay length"):
        make(smoothing_schedule="linear")
    trainer, x, y = make(smoothing_std=0.2, smoothing_schedule="linear", steps=2)  # σ given
    assert trainer.max_steps is None and trainer.planned_steps == 2
    trainer.step(x, y)
    assert trainer.current_smoothing_std() == pytest.approx(0.1)


@pytest.mark.parametrize("kind", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_optimizers_that_cannot_take_one_dense_gradient_are_refused(kind):
    model, loss_fn, _, _ = mlp_case()
    with pytest.raises(TypeError, match=f"{kind.__name__} is not supported"):
        dplis.PrivateTrainer(model, kind([p for p in model.parameters() if p.requires_grad]),
                             loss_fn, sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0)


def test_a_trainable_parameter_missing_from_the_optimizer_is_refused():
    model, loss_fn, x, y = mlp_case(batch=8)
    model[0].requires_grad_(True)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)  # not model[0]
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are not in the optimizer"):
        dplis.PrivateTrainer(model, opt, loss_fn, sample_rate=0.1, max_grad_norm=1.0,
                             noise_multiplier=1.0)
    trainer, x, y = make()
    trainer.step(x, y)
    trainer.model[0].requires_grad_(True)  # unfrozen after the trainer was built
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are not in the optimizer"):
        trainer.step(x, y)
    assert same(before, snapshot(trainer))


def test_freezing_a_layer_mid_run():
    """The trainable set is read each step: a frozen layer gets no gradient (grad None, so
    SGD with momentum leaves it alone), and DP-SAT restarts its ascent on the new set."""
    model, loss_fn, x, y = mlp_case(batch=8)
    model[0].requires_grad_(True)
    trainer = dplis.PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn,
        sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0, sat_rho=0.05, seed=0,
        dataset_size=80)
    trainer.step(x, y)
    model[2].requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    trainer.step(x, y)
    assert model[2].weight.grad is None and model[0].weight.grad is not None
    assert torch.equal(model[2].weight, frozen)
    assert trainer.prev_grad.numel() == sum(p.numel() for p in model[0].parameters())
    trainer.step(x, y)
    assert trainer.accountant.steps == 3


def test_a_failing_optimizer_step_still_counts_the_released_step():
    """The noisy gradient existed: the step is recorded, and the next one draws other noise
    (a retry with the same noise seed on another batch would reveal the difference of the
    two batches' sums)."""
    trainer, x, y = make()
    handle = trainer.optimizer.register_step_post_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("hook failed")))
    with pytest.raises(RuntimeError, match="hook failed"):
        trainer.step(x, y)
    handle.remove()
    assert trainer.accountant.steps == 1
    seen = []
    trainer._private_step = lambda *a, _f=trainer._private_step: seen.append(
        trainer.accountant.steps) or _f(*a)
    trainer.step(x, y)
    assert seen == [1]  # step 1's noise seed, step_noise_seed(seed, 1), not step 0's


def test_a_refused_or_failed_load_changes_nothing(tmp_path):
    trainer, x, y = make()
    trainer.step(x, y)
    trainer.save(tmp_path / "ckpt.pt")
    other, _, _ = make(dataset_size=90)  # same q and privacy config, another dataset
    other.step(x, y)
    before = snapshot(other)
    with pytest.raises(ValueError, match="dataset_size is 90, got a dataset of 80"):
        other.load(tmp_path / "ckpt.pt")
    assert same(before, snapshot(other))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["dataset_size"] = None
    state["model"]["2.weight"] = torch.zeros(1, 1)  # fails inside model.load_state_dict
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)
    assert same(before, snapshot(other)) and other.dataset_size == 90
    state["model"] = trainer.model.state_dict()
    adam, _, _ = make(optimizer="adam")
    with pytest.raises(ValueError, match="the checkpoint's optimizer is a torch.optim.sgd.SGD, "
                                         "this trainer's a torch.optim.adam.Adam"):
        adam.load_state_dict(state)  # an SGD run's: Adam's step would fail, privacy spent
    older = {k: v for k, v in trainer.state_dict().items() if k != "optimizer_type"}
    again, _, _ = make()
    again.load_state_dict(older)  # a file from before the type was recorded: loads
    scheduled, _, _ = make()  # a scheduler adds keys (initial_lr) to the groups: same type
    torch.optim.lr_scheduler.StepLR(scheduled.optimizer, step_size=1)
    make()[0].load_state_dict(scheduled.state_dict())
    cuda_state = dict(state, generator=torch.zeros(16, dtype=torch.uint8))  # Philox's size
    with pytest.raises(ValueError, match="noise generator state does not fit this trainer's "
                                         "cpu generator"):
        other.load_state_dict(cuda_state)
    assert same(before, snapshot(other))
    state["prev_grad"] = "not a tensor"
    with pytest.raises(ValueError, match="prev_grad is not a flat float tensor"):
        other.load_state_dict(state)
    assert same(before, snapshot(other))
    explicit, _, _ = make(dataset_size=None, expected_batch_size=20.0)
    with pytest.raises(ValueError, match="expected_batch_size=20.0 was given"):
        explicit.load(tmp_path / "ckpt.pt")
    assert explicit.expected_batch_size == 20.0 and explicit.accountant.steps == 0


def test_a_loaded_trainer_checks_the_model_again_on_its_next_step(tmp_path, monkeypatch):
    """The ghost engine's checks run on a trainer's first step of two or more examples, and
    again after ``load``: the loaded weights are not those the checks saw."""
    import sys

    ghost = sys.modules["dplis.ghost"]
    calls = []
    check = ghost.check_independent
    monkeypatch.setattr(ghost, "check_independent",
                        lambda *a, **k: calls.append(1) or check(*a, **k))
    trainer, x, y = make()
    trainer.step(x, y)
    trainer.step(x, y)
    trainer.save(tmp_path / "ckpt.pt")
    assert len(calls) == 1 and trainer.engine == "ghost"
    trainer.load(tmp_path / "ckpt.pt")
    trainer.step(x, y)
    trainer.step(x, y)
    assert len(calls) == 2 and trainer.engine == "ghost"


def test_a_load_failing_after_the_accountant_is_undone_without_a_rollback_warning():
    ahead, x, y = make()
    for _ in range(3):
        ahead.step(x, y)
    state = ahead.state_dict()
    state["sampler_generator"] = torch.zeros(3, dtype=torch.uint8)  # set_state refuses it
    behind, _, _ = make()
    behind.step(x, y)
    before = snapshot(behind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undoing the load goes from 3 steps back to 1
        with pytest.raises(RuntimeError):
            behind.load_state_dict(state)
    assert same(before, snapshot(behind)) and behind.accountant.steps == 1


def test_data_loader_passes_add_up_to_the_planned_steps():
    """ε-calibrated run, 1/q = 2.6: an epoch is a pass of round(1/q) = 3 batches, so 10
    epochs plan 30 steps, and a loop over 10 passes of ``data_loader`` takes exactly them
    (once ⌈10/q⌉ = 26 were planned, and the ninth pass hit the budget)."""
    model, loss_fn, _, _ = mlp_case()
    data = TensorDataset(torch.randn(260, 10), torch.randint(0, 3, (260,)))
    trainer = dplis.PrivateTrainer(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        loss_fn, sample_rate=100 / 260, max_grad_norm=1.0, target_epsilon=3.0,
        target_delta=1e-5, epochs=10, seed=0)
    for _ in range(10):
        for xb, yb in trainer.data_loader(data):
            trainer.step(xb, yb)
    assert trainer.accountant.steps == trainer.max_steps == 30
    with pytest.raises(dplis.BudgetExceededError, match="30 planned steps"):
        trainer.data_loader(data)


def test_a_fractional_epoch_ends_its_last_pass_early():
    model, loss_fn, _, _ = mlp_case()
    data = TensorDataset(torch.randn(100, 10), torch.randint(0, 3, (100,)))
    trainer = dplis.PrivateTrainer(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        loss_fn, sample_rate=0.1, max_grad_norm=1.0, target_epsilon=3.0, target_delta=1e-5,
        epochs=2.5, seed=0)
    passes = [len(trainer.data_loader(data)) for _ in range(2)]
    assert trainer.max_steps == 25
    for _ in range(20):
        for xb, yb in trainer.data_loader(data):
            trainer.step(xb, yb)
        if trainer.accountant.steps == 25:
            break
    assert passes == [10, 10] and trainer.accountant.steps == 25


def test_data_loader_refuses_a_dataset_contradicting_expected_batch_size():
    trainer, _, _ = make(dataset_size=None, expected_batch_size=20.0)
    with pytest.raises(ValueError, match="expected_batch_size=20.0 was given"):
        trainer.data_loader(TensorDataset(torch.randn(60, 10), torch.zeros(60).long()))
    assert trainer.dataset_size is None and trainer.expected_batch_size == 20.0


def test_planned_epsilon_needs_a_delta():
    trainer, _, _ = make()
    with pytest.raises(ValueError, match="needs delta"):
        trainer.planned_epsilon(10)
    assert trainer.planned_epsilon(10, 1e-5) > 0


def test_checkpoints_get_the_umasks_permissions(tmp_path):
    trainer, _, _ = make()
    old = os.umask(0o022)
    try:
        trainer.save(tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


@pytest.mark.parametrize("engine", ["ghost", "auto"])
def test_a_new_trainable_set_is_checked_again(engine):
    """Unfrozen mid-run, OutsideUse's embedding is used outside its layer: the first step's
    check passed without it, so the step after the change must check again."""
    torch.manual_seed(0)
    model = OutsideUse()
    model.emb.requires_grad_(False)
    tokens, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 10, (6,))
    trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   F.cross_entropy, sample_rate=0.1, max_grad_norm=0.05,
                                   noise_multiplier=0.0, expected_batch_size=6.0, engine=engine)
    trainer.step(tokens, y)
    model.emb.requires_grad_(True)
    if engine == "ghost":
        with pytest.raises(GhostUnsupported, match="emb.weight"):
            trainer.step(tokens, y)
        return
    trainer.step(tokens, y)
    assert trainer.engine == "vmap"
    expected = naive_private_grad(model, F.cross_entropy, tokens, y, max_grad_norm=0.05)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=1e-4, atol=1e-6)


def test_dpsat_restarts_its_ascent_on_another_trainable_set_after_load(tmp_path):
    model, loss_fn, x, y = mlp_case(batch=8)
    model[0].requires_grad_(True)
    kw = dict(sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0, sat_rho=0.1, seed=0,
              dataset_size=80)
    first = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                                 **kw)
    first.step(x, y)
    first.save(tmp_path / "ckpt.pt")
    other, loss_fn, _, _ = mlp_case(batch=8)  # layer 0 frozen: another trainable set
    second = dplis.PrivateTrainer(other, torch.optim.SGD(other.parameters(), lr=0.1), loss_fn,
                                  **kw)
    second.load(tmp_path / "ckpt.pt")
    assert second.sat_offset() is None
    second.step(x, y)
    second.step(x, y)
    assert second.sat_offset() is not None and second.accountant.steps == 3


def test_a_gradient_left_on_a_frozen_parameter_is_never_applied():
    model, loss_fn, x, y = mlp_case(batch=8)  # layer 0 frozen, but in the optimizer
    model[0].weight.grad = torch.ones_like(model[0].weight)  # e.g. a non-private backward
    before = model[0].weight.detach().clone()
    trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                                   sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                                   dataset_size=80)
    trainer.step(x, y)
    assert model[0].weight.grad is None and torch.equal(model[0].weight, before)


class _Centre(nn.Module):
    """Adds the batch mean: one example moves every other's output (no parameters)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 3 * h.mean(0, keepdim=True)


@pytest.mark.parametrize("engine", ["ghost", "auto"])
def test_a_module_swapped_in_mid_run_is_checked_again(engine):
    """A parameter-free module swapped in after the checked first step changes no parameter
    name: the structure must trigger the checks again, or the ghost engine lets one example
    move the others' clipped gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                   F.cross_entropy, sample_rate=0.1, max_grad_norm=0.5,
                                   noise_multiplier=0.0, expected_batch_size=8.0, engine=engine)
    trainer.step(x, y)
    assert trainer.engine == "ghost"
    model[1] = nn.Tanh()  # the same computation: checked again, and still the ghost engine
    trainer.step(x, y)
    assert trainer.engine == "ghost"
    model[1] = nn.Identity()  # the checked Tanh is freed: the next module may take its id
    model[1] = _Centre()
    if engine == "ghost":
        with pytest.raises(GhostUnsupported):
            trainer.step(x, y)
        return
    trainer.step(x, y)
    assert trainer.engine in ("vmap", "loop")  # each example alone: the mean is its own


class _NoisyInput(nn.Module):
    """Draws input noise from a generator of its own (seeded 1) and from Python's RNG."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)
        self.gen = torch.Generator().manual_seed(1)

    def forward(self, x):
        x = x * (1 + 0.1 * random.random()) + 0.1 * torch.randn(x.shape, generator=self.gen)
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
def test_a_failing_step_puts_back_the_generators_the_forward_draws_from(engine):
    """A target out of range fails the step inside the loss, after the forward drew from the
    module's generator and Python's RNG: the next step must be the never-failed run's. (The
    ghost engine's position check reseeds those generators to tell a forward drawing random
    numbers: one seeded with 1 itself must not pass for one drawing none.)"""
    torch.manual_seed(0)
    base, x, y = _NoisyInput(), torch.randn(6, 5), torch.randint(0, 3, (6,))
    bad = y.clone()
    bad[0] = 7
    runs = []
    for fail in (False, True):
        model = copy.deepcopy(base)
        trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                       F.cross_entropy, sample_rate=0.1, max_grad_norm=0.5,
                                       noise_multiplier=1.0, expected_batch_size=6.0, seed=0,
                                       engine=engine)
        random.seed(0)
        trainer.step(x, y)
        if fail:
            with pytest.raises((IndexError, RuntimeError)):
                trainer.step(x, bad)
        trainer.step(x, y)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
