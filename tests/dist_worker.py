"""Runs inside each process of the distributed tests (spawned; gloo on loopback)."""

import itertools
import os
import random

import torch
import torch.distributed as dist
from helpers import mlp_case
from torch import nn
from torch.utils.data import TensorDataset

import dplis
from dplis import distributed

SMOOTH = dict(smoothing_std=0.05, num_perturbations=3)
LOW_MEMORY = dict(smoothing_std=0.05, low_memory=True)


def trainer_for(model, loss_fn, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    args = dict(sample_rate=0.1, max_grad_norm=0.5, noise_multiplier=0.0, seed=0,
                expected_batch_size=8.0) | kw
    return dplis.PrivateTrainer(model, torch.optim.SGD(params, lr=0.1), loss_fn, **args)


def dropout_model() -> nn.Module:
    """An MLP for ``mlp_case``'s inputs with a dropout layer, from a fixed seed."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Dropout(0.5), nn.Linear(32, 3))


def checks(rank: int, world: int, folder: str) -> dict:
    out = {}
    # 1. noise 0: each rank half of the batch -> the single-process update
    model, loss_fn, x, y = mlp_case(batch=8)
    trainer = trainer_for(model, loss_fn, **SMOOTH)
    out["loss"] = trainer.step(x[rank::world], y[rank::world])
    out["params"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["generator"] = trainer.generator.get_state()
    out["epsilon"] = trainer.epsilon(1e-5)
    # 2. noise on: the summed gradient carries σC once
    torch.manual_seed(0)
    wide = nn.Linear(200, 100)
    zero = trainer_for(wide, lambda o, t: (o * 0).sum(), noise_multiplier=1.3,
                       max_grad_norm=2.0)
    zero.step(torch.randn(4, 200), torch.zeros(4, 100))
    out["noise"] = torch.cat([p.grad.flatten() for p in wide.parameters()])
    # 3. dropout: both ranks share the generator (perturbations) but not the dropout masks;
    # the same batch on both ranks gives other per-example norms on each
    out["dropout_norms"] = trainer_for(dropout_model(), loss_fn)._private_step(x, y).norms
    # 4. a rank that fails makes every rank fail, and none applies anything: not even the
    # draws of a forward from a module's generator and Python's RNG on the rank that succeeded
    model.gen = torch.Generator().manual_seed(5)

    def draw(module, args) -> None:
        torch.randn(1, generator=module.gen)
        random.random()

    model.register_forward_pre_hook(draw)
    drawn = (model.gen.get_state(), random.getstate())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = trainer.generator.get_state()
    bad = x[rank::world].clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    try:
        trainer.step(bad, y[rank::world])
        out["failure"] = "no error"
    except Exception as e:  # each rank reports what it raised
        out["failure"] = type(e).__name__
    out["unchanged"] = (all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                        and trainer.accountant.steps == 1
                        and torch.equal(trainer.generator.get_state(), state)
                        and torch.equal(model.gen.get_state(), drawn[0])
                        and random.getstate() == drawn[1])
    # 5. low_memory=True (at a perturbed point, K = 1): each rank half of the batch
    model, loss_fn, x, y = mlp_case(batch=8)
    trainer_for(model, loss_fn, **LOW_MEMORY).step(x[rank::world], y[rank::world])
    out["low_memory_params"] = {k: v.clone() for k, v in model.state_dict().items()}
    # 6. a checkpoint holds every rank's sampler state; each rank resumes its own stream
    path = os.path.join(folder, "ckpt.pt")
    data = TensorDataset(torch.zeros(40, 1), torch.arange(40))

    def sampler_trainer():
        return trainer_for(nn.Linear(1, 1), lambda o, t: o.sum(), expected_batch_size=None,
                           dataset_size=40)

    def batches(trainer, n):
        return [y.tolist() for _, y in itertools.islice(trainer.data_loader(data), n)]

    straight = sampler_trainer()
    batches(straight, 2)
    straight.save(path)
    dist.barrier()  # a later run: every rank's save is done before any rank loads
    resumed = sampler_trainer()
    resumed.load(path)
    out["resume"] = (batches(straight, 3), batches(resumed, 3))
    # 7. no seed: rank 0 draws one for all (the ranks share perturbations); different given
    # seeds are refused on every rank
    out["random_seed"] = trainer_for(nn.Linear(1, 1), lambda o, t: o.sum(), seed=None).seed
    try:
        trainer_for(nn.Linear(1, 1), lambda o, t: o.sum(), seed=rank)
        out["different_seeds"] = "no error"
    except ValueError as e:
        out["different_seeds"] = str(e)
    # 8. a checkpoint only rank 1 cannot read: every rank refuses it, none changes
    straight.save(path)  # rank 0 writes it; rank 1 reads a damaged copy of it
    own = path if rank == 0 else os.path.join(folder, "damaged.pt")
    if rank == 1:
        with open(path, "rb") as src, open(own, "wb") as dst:
            dst.write(src.read()[:100])
    before = straight.sampler_generator.get_state()
    try:
        straight.load(own)
        out["damaged"] = "no error"
    except Exception as e:
        out["damaged"] = type(e).__name__
    out["damaged_unchanged"] = torch.equal(straight.sampler_generator.get_state(), before)
    # 9. datasets of other sizes on the ranks, or fewer examples than ranks: refused on every
    # rank (the ranks divided by their own q·N and drifted apart; N = 1 crashed one rank)
    for name, size in (("sizes", 40 + rank), ("tiny", 1)):
        data = TensorDataset(torch.zeros(size, 1), torch.arange(size))
        trainer = trainer_for(nn.Linear(1, 1), lambda o, t: o.sum(), sample_rate=1.0,
                              expected_batch_size=None)
        try:
            trainer.data_loader(data)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def run(rank: int, world: int, port: int, folder: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with distributed.closing():
        torch.save(checks(rank, world, folder), os.path.join(folder, f"rank{rank}.pt"))
