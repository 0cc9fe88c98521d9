"""``python -m dplis.train``: private training of a small model, DPlis by default.

With no argument: an MLP on MNIST-1D (generated locally by the mnist1d package, no download),
DPlis smoothing, calibrated to ε = 3 at δ = 1e-5; well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from . import __version__, distributed, models
from .allocator import MALLOC_MODES, retain_freed_memory
from .data import load_dataset
from .kernels import NonFiniteError
from .private_grad import ENGINES, PRECISIONS
from .sampling import steps_per_epoch
from .trainer import PrivateTrainer, read_checkpoint, replaceable

DEFAULT_RADIUS = 40.0  # tuned on MNIST-1D at ε = 3 (docs/compare_full.md)
DEFAULT_PERTURBATIONS = 4
DEFAULT_NUM_SAMPLES = 20000
DEFAULT_MOMENTUM = 0.9


def _number(kind: type, low: float, *, open_low: bool = False, high: float | None = None):
    """An argparse type: ``kind`` in [low, high] (or (low, high] with ``open_low``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        below = value <= low if open_low else value < low
        if value in (math.inf, -math.inf):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if below or (high is not None and value >= high) or value != value:
            span = f"{'(' if open_low else '['}{low:g}, {'∞)' if high is None else f'{high:g})'}"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE = _number(float, 0, open_low=True)
NON_NEGATIVE = _number(float, 0)
COUNT = _number(int, 1)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default shown, except None: the flag's help says what it then means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dplis.train", description=__doc__,
                                formatter_class=_Help)
    p.add_argument("--method", choices=("dplis", "dpsgd"), default="dplis",
                   help="dplis: K-perturbation smoothing; dpsgd: plain DP-SGD (K = 1, s = 0)")
    p.add_argument("--epsilon", type=POSITIVE, default=3.0, help="target ε (σ is calibrated)")
    p.add_argument("--delta", type=_number(float, 0, open_low=True, high=1), default=1e-5,
                   help="target δ")
    p.add_argument("--epochs", type=POSITIVE, default=10, help="expected passes over the data")
    p.add_argument("--batch-size", type=COUNT, default=256, help="expected (Poisson) batch size")
    p.add_argument("--lr", type=POSITIVE, default=0.25, help="learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="torch optimizer")
    p.add_argument("--momentum", type=NON_NEGATIVE, default=None,
                   help=f"SGD momentum (default {DEFAULT_MOMENTUM}; adam takes none)")
    p.add_argument("--max-grad-norm", type=POSITIVE, default=1.0, help="clipping norm C")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--smoothing-std", type=NON_NEGATIVE, default=None, help="absolute std s")
    group.add_argument("--smoothing-radius", type=NON_NEGATIVE, default=None,
                       help=f"s = r·lr·σ·C/batch (default {DEFAULT_RADIUS} for dplis)")
    p.add_argument("--perturbations", type=COUNT, default=None,
                   help=f"K for dplis (default {DEFAULT_PERTURBATIONS}; dpsgd takes 1)")
    p.add_argument("--seed", type=_number(int, 0, high=2**32), default=0,
                   help="seeds data, init, noise, sampling")
    p.add_argument("--secure-rng", action="store_true",
                   help="noise from os.urandom (not reproducible; --seed then seeds only data "
                        "and init)")
    p.add_argument("--dataset", choices=("mnist1d", "mnist", "fashion-mnist", "cifar10"),
                   default="mnist1d", help="mnist1d is generated locally; others need --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="folder with MNIST/Fashion-MNIST/CIFAR-10; for mnist1d, the folder its "
                        "generated arrays are cached in (default $DPLIS_CACHE or ~/.cache/dplis)")
    p.add_argument("--num-samples", type=_number(int, 100), default=None,
                   help=f"MNIST-1D size, train+test (default {DEFAULT_NUM_SAMPLES}; the image "
                        "datasets have their own)")
    p.add_argument("--model", choices=("auto", *models.MODELS), default="auto",
                   help="auto: mlp for mnist1d, cnn for images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=_number(int, 0), default=0,
                   help="torch CPU threads (0: torch's default; 1 on a busy shared machine)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="save the trainer here after every epoch (atomic write)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run saved in --checkpoint (same flags)")
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run over an existing --checkpoint file (without it "
                            "or --resume, an existing file is refused)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast forward/backward; norms, clipping, noise in fp32")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="per-example engine (auto: ghost, or vmap where ghost cannot handle "
                        "the model, or loop where vmap cannot either; loop: one example at a "
                        "time)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the vmap engine's per-example gradients (--engine vmap)")
    p.add_argument("--low-memory", action="store_true",
                   help="ghost engine: norms inside the backward, the clipped sum from a "
                        "second backward (peak memory near non-private, one more backward); "
                        "one pass per step: --method dpsgd or --perturbations 1")
    p.add_argument("--malloc", choices=MALLOC_MODES, default="retain",
                   help="retain: on CPU, glibc keeps freed memory (dplis.retain_freed_memory: "
                        "no page faults from step to step, up to 256 MiB kept); default: "
                        "leave the allocator as it is")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-epoch lines: only the final result")
    return p


# what a run's result depends on: --resume must be given the same (device, threads, engine,
# output and display flags may change)
RUN_FLAGS = ("method", "epsilon", "delta", "epochs", "batch_size", "lr", "optimizer", "momentum",
             "max_grad_norm", "smoothing_std", "smoothing_radius", "perturbations", "seed",
             "secure_rng", "dataset", "num_samples", "model", "precision")


def _output_path(flag: str, path: str | None) -> None:
    """Refuse (SystemExit) before training a ``--flag PATH`` the run could not write at its
    end: empty, an existing folder, device or pipe, or in a folder that is missing or
    read-only. A symbolic link is written through."""
    if path is None:
        return
    if not path:
        raise SystemExit(f"{flag}: an empty path")
    try:
        real = replaceable(path)
    except ValueError as e:
        raise SystemExit(f"{flag} {path}: {e}") from None
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise SystemExit(f"{flag} {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(real)
                                                    and not os.access(real, os.W_OK)):
        raise SystemExit(f"{flag} {path}: not writable")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _effective(flags: dict) -> dict:
    """Run flags as the run uses them: dpsgd takes K = 1 and no smoothing, adam no momentum,
    and only mnist1d a size (so that a checkpoint's flags compare equal whatever defaults
    wrote them)."""
    flags = dict(flags)
    if flags.get("method") == "dpsgd":
        flags.update(perturbations=1, smoothing_std=None, smoothing_radius=None)
    if flags.get("optimizer") == "adam":
        flags["momentum"] = None
    if flags.get("dataset") != "mnist1d":
        flags["num_samples"] = None
    return flags


def _settle(args: argparse.Namespace) -> None:
    """Refuse (SystemExit) flags the method or dataset would ignore (their no-op values
    pass), then fill in the defaults that depend on them."""
    if args.method == "dpsgd":
        no_ops = {"smoothing_std": 0, "smoothing_radius": 0, "perturbations": 1}
        ignored = [f"{_flag(name)} {getattr(args, name):g}" for name, no_op in no_ops.items()
                   if getattr(args, name) not in (None, no_op)]
        if ignored:
            raise SystemExit(f"--method dpsgd takes no smoothing (K = 1, s = 0): drop "
                             f"{', '.join(ignored)}, or use --method dplis")
    if args.optimizer == "adam" and args.momentum not in (None, 0):
        raise SystemExit(f"--momentum is SGD's; adam has none (its betas are torch's "
                         f"defaults): drop --momentum {args.momentum:g}, or use --optimizer sgd")
    if args.num_samples is not None and args.dataset != "mnist1d":
        raise SystemExit(f"--num-samples sets the size of mnist1d; {args.dataset} has its own: "
                         "drop --num-samples")
    if args.perturbations is None:
        args.perturbations = DEFAULT_PERTURBATIONS
    if args.num_samples is None:
        args.num_samples = DEFAULT_NUM_SAMPLES
    if args.momentum is None:
        args.momentum = DEFAULT_MOMENTUM
    vars(args).update(_effective(vars(args)))


def _resumed(args: argparse.Namespace) -> list[dict]:
    """The per-epoch history saved in ``--checkpoint`` ([] if none); refuse (SystemExit) a
    --resume whose run flags differ from those the checkpoint was saved with (files of this
    command only: another file's are the trainer's to check)."""
    try:
        saved = read_checkpoint(args.checkpoint).get("extra") or {}
    except (ValueError, OSError) as e:
        raise SystemExit(f"--resume {args.checkpoint}: {e}") from None
    flags = saved.get("flags") if isinstance(saved, dict) else None
    if not isinstance(flags, dict):
        return []
    flags = _effective(flags)
    diff = [f"{_flag(k)} {flags[k]!r} (now {getattr(args, k)!r})"
            for k in RUN_FLAGS if k in flags and flags[k] != getattr(args, k)]
    if diff:
        raise SystemExit(f"--resume {args.checkpoint}: the run was saved with other flags: "
                         f"{', '.join(diff)}; resume with the flags it was started with")
    history = saved.get("history")
    return list(history) if isinstance(history, list) else []


def build_model(name: str, dataset: str, sample: torch.Tensor) -> torch.nn.Module:
    if name == "auto":
        name = "mlp" if dataset == "mnist1d" else "cnn"
    if name == "cnn":
        return models.paper_cnn(sample.shape[0], 10, sample.shape[-1])
    if name == "conv1d":
        return models.conv1d_net(sample.numel())
    return models.mlp(sample.numel(), hidden=(128, 128))


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, device: str, batch: int = 2048) -> float:
    model.eval()
    x, y = dataset.tensors
    correct = sum(int((model(x[i:i + batch].to(device)).argmax(1) == y[i:i + batch].to(device))
                      .sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def main(argv: list[str] | None = None) -> dict:
    """Run the command; under torchrun (WORLD_SIZE > 1) join the process group first."""
    args = build_parser().parse_args(argv)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if launched:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    with distributed.closing(launched):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch build sees no CUDA device")
    rank, world_size = distributed.world()
    if rank != 0:
        args.quiet, args.json = True, None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.malloc == "retain" and device.type == "cpu":
        retain_freed_memory()  # this command owns its process; False (no-op) without glibc
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    _settle(args)
    kw = {"num_samples": args.num_samples, "seed": args.seed} if args.dataset == "mnist1d" else {}
    if args.low_memory and args.method == "dplis" and args.perturbations != 1:
        raise SystemExit("--low-memory takes one pass per step: add --perturbations 1 or "
                         f"--method dpsgd (got --perturbations {args.perturbations})")
    if args.low_memory and args.precision != "fp32":
        raise SystemExit("--low-memory runs in fp32 only: drop --precision bf16")
    if args.low_memory and args.engine in ("vmap", "loop"):
        raise SystemExit(f"--low-memory is a mode of the ghost engine: drop --engine "
                         f"{args.engine}")
    if args.model == "cnn" and args.dataset == "mnist1d":
        raise SystemExit("--model cnn takes images (mnist, fashion-mnist, cifar10); for mnist1d "
                         "use mlp or conv1d")
    if args.model == "conv1d" and args.dataset != "mnist1d":
        raise SystemExit(f"--model conv1d takes 1-D signals (mnist1d); for {args.dataset} use "
                         "cnn or mlp")
    for flag in ("resume", "overwrite"):
        if getattr(args, flag) and not args.checkpoint:
            raise SystemExit(f"--{flag} needs --checkpoint PATH")
    # (under torch.distributed every rank reads it in the collective load, which refuses a
    # file any rank lacks on every rank: a check here, on one rank alone, would hang the rest)
    if args.resume and world_size == 1 and not os.path.isfile(args.checkpoint):
        raise SystemExit(f"--resume: no checkpoint at {args.checkpoint}")
    refused = None
    if rank == 0:  # the rank that writes them
        try:
            _output_path("--checkpoint", args.checkpoint)
            _output_path("--json", args.json)
            if args.checkpoint and not (args.resume or args.overwrite) and \
                    os.path.exists(args.checkpoint):
                raise SystemExit(f"--checkpoint {args.checkpoint}: a file is there already: "
                                 "--resume continues its run, --overwrite starts a new one "
                                 "over it")
            if args.checkpoint and args.json and os.path.realpath(args.checkpoint) == \
                    os.path.realpath(args.json):
                raise SystemExit(f"--checkpoint and --json are one file ({args.json}): the "
                                 "result would overwrite the checkpoint")
        except SystemExit as e:
            refused = e
    if world_size > 1:  # every rank stops, or none
        try:
            distributed.agree(refused, device)
        except RuntimeError:
            raise SystemExit("rank 0 refused this run's output paths") from None
    elif refused is not None:
        raise refused
    history = []
    if args.resume and world_size == 1:  # (under torch.distributed: after the collective load)
        history = _resumed(args)
    try:
        train, test = load_dataset(args.dataset, args.data_dir, **kw)
    except (ValueError, OSError) as e:  # no --data-dir, a missing or malformed file
        raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    if not 1 <= args.batch_size <= len(train):
        raise SystemExit(f"--batch-size must be in [1, {len(train)}], got {args.batch_size}")
    model = build_model(args.model, args.dataset, train[0][0]).to(args.device)
    opt = (torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
           if args.optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=args.lr))
    dplis = args.method == "dplis"
    radius = args.smoothing_radius
    if dplis and radius is None and args.smoothing_std is None:
        radius = DEFAULT_RADIUS
    try:
        trainer = PrivateTrainer(
            model, opt, F.cross_entropy, sample_rate=args.batch_size / len(train),
            max_grad_norm=args.max_grad_norm, target_epsilon=args.epsilon,
            target_delta=args.delta, epochs=args.epochs,
            smoothing_std=(args.smoothing_std or 0.0) if dplis else 0.0,
            smoothing_radius=radius if dplis else None,
            num_perturbations=args.perturbations if dplis else 1,
            seed=None if args.secure_rng else args.seed, secure_rng=args.secure_rng,
            precision=args.precision, dataset_size=len(train), engine=args.engine,
            compile=args.compile, low_memory=args.low_memory)
    except ValueError as e:  # an unreachable ε, settings that do not go together
        raise SystemExit(f"error: {e}") from None
    if args.resume:
        try:
            trainer.load(args.checkpoint)
        except (ValueError, KeyError, TypeError, OSError) as e:  # another run's flags, a
            # damaged or unreadable file
            raise SystemExit(f"--resume {args.checkpoint}: {e!s}") from None
        except RuntimeError as e:  # torch's load_state_dict: the model differs
            raise SystemExit(f"--resume {args.checkpoint}: the checkpoint's model does not fit "
                             f"this run's (another --model or --dataset?): {e}") from None
        if world_size > 1:  # every rank read the file: each decides alike
            history = _resumed(args)
    log = (lambda *a: None) if args.quiet else tqdm.write
    log(f"dplis {__version__}: {args.method} on {args.dataset} ({len(train)} train"
        f"{f', {world_size} ranks' if world_size > 1 else ''}), "
        f"σ={trainer.noise_multiplier:.3f}, q={trainer.sample_rate:.4g}, "
        f"{trainer.max_steps} steps, K={trainer.num_perturbations}, "
        f"s={trainer.current_smoothing_std():.3g}")
    bar = tqdm(total=trainer.max_steps, disable=args.quiet, unit="step", file=sys.stderr)
    bar.update(trainer.accountant.steps)
    epoch = trainer.accountant.steps // steps_per_epoch(trainer.sample_rate)
    saved = {"flags": {k: getattr(args, k) for k in RUN_FLAGS}, "history": history}
    saved_at = trainer.accountant.steps if args.resume else None  # the file's last step
    try:
        while trainer.accountant.steps < trainer.max_steps:
            epoch += 1
            losses = []
            for x, y in trainer.data_loader(train):  # the last pass ends with the planned steps
                loss = trainer.step(x.to(args.device), y.to(args.device))
                if not math.isnan(loss):
                    losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            row = {"epoch": epoch, "loss": sum(losses) / max(1, len(losses)),
                   "test_accuracy": accuracy(model, test, args.device),
                   "epsilon": trainer.epsilon()}
            history.append(row)
            if args.checkpoint:
                trainer.save(args.checkpoint, extra=saved)
                saved_at = trainer.accountant.steps
            log(f"epoch {epoch}: loss {row['loss']:.4f}  test acc "
                f"{row['test_accuracy']:.4f}  ε {row['epsilon']:.3f}")
    except KeyboardInterrupt:
        bar.close()
        if not args.checkpoint:
            where = " (no --checkpoint: nothing saved)"
        elif saved_at is None:
            where = f" (no epoch ended: nothing saved in {args.checkpoint} by this run)"
        else:
            where = f"; --resume continues from step {saved_at}, saved in {args.checkpoint}"
        print(f"interrupted at step {trainer.accountant.steps} of {trainer.max_steps}{where}",
              file=sys.stderr)
        raise SystemExit(130) from None
    except NonFiniteError as e:  # diverged: a learning rate too large for the model
        bar.close()
        raise SystemExit(f"training diverged at step {trainer.accountant.steps}: {e} "
                         "(a smaller --lr, or --max-grad-norm)") from None
    bar.close()
    result = {
        "accuracy": accuracy(model, test, args.device), "epsilon": trainer.epsilon(),
        "delta": args.delta, "sigma": trainer.noise_multiplier, "steps": trainer.accountant.steps,
        "smoothing_std": trainer.current_smoothing_std(), "seconds": time.perf_counter() - start,
        "history": history, "flags": vars(args), "version": __version__,
    }
    if rank != 0:
        return result
    print(f"final test accuracy {result['accuracy']:.4f} at ε = {result['epsilon']:.3f} "
          f"(δ = {args.delta}), σ = {result['sigma']:.3f}, {result['steps']} steps, "
          f"{result['seconds']:.0f} s")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:  # checked at the start; the folder may have changed since
            raise SystemExit(f"--json {args.json}: {e}") from None
    return result


if __name__ == "__main__":
    main()
