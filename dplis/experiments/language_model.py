"""``python -m dplis.experiments.language_model``: private training of a small GPT- or
BERT-style model built from code (random init, no download) on synthetic token sequences
with padding, through the ghost engine.

The task: sequences are arithmetic progressions mod the vocabulary (start and step drawn at
random) of random length, right-padded. GPT: next-token prediction; BERT: 15 % of the real
tokens are replaced by a [MASK] id and predicted. Padding positions are never attended to and
carry target -100 (no loss, no gradient).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset
from tqdm import tqdm

from ..models import TinyTransformer, lm_loss
from ..trainer import PrivateTrainer


def synthetic_tokens(n: int, seq_len: int, vocab: int, causal: bool, seed: int = 0
                     ) -> TensorDataset:
    """(tokens [n, T], pad mask [n, T], targets [n, T]) — id 0 is padding, vocab-1 is [MASK]."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, vocab - 1, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    tokens = 1 + (start + step * torch.arange(seq_len)) % (vocab - 2)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n, 1), generator=g)
    mask = torch.arange(seq_len) < lengths
    tokens = tokens.masked_fill(~mask, 0)
    if causal:
        targets = tokens.roll(-1, 1).masked_fill(~mask.roll(-1, 1) | ~mask, -100)
        targets[:, -1] = -100
    else:
        hide = (torch.rand(n, seq_len, generator=g) < 0.15) & mask
        targets = tokens.masked_fill(~hide, -100)
        tokens = tokens.masked_fill(hide, vocab - 1)
    return TensorDataset(tokens, mask, targets)


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(prog="python -m dplis.experiments.language_model",
                                description=__doc__)
    p.add_argument("--model", choices=("gpt", "bert"), default="gpt")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--noise-multiplier", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--perturbations", type=int, default=2)
    p.add_argument("--smoothing-std", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--low-memory", action="store_true",
                   help="norms inside the backward, the clipped sum from a second backward "
                        "(needs --perturbations 1)")
    args = p.parse_args(argv)
    if args.low_memory and args.perturbations != 1:
        p.error(f"--low-memory takes one pass per step: --perturbations 1, not "
                f"{args.perturbations}")
    torch.manual_seed(args.seed)
    causal = args.model == "gpt"
    data = synthetic_tokens(args.examples, 16, 32, causal, args.seed)
    model = TinyTransformer(vocab=32, seq_len=16, dim=32, heads=4, layers=2, causal=causal,
                            tied=causal)
    trainer = PrivateTrainer(
        model, torch.optim.AdamW(model.parameters(), lr=args.lr), lm_loss,
        sample_rate=args.batch_size / args.examples, max_grad_norm=1.0,
        noise_multiplier=args.noise_multiplier, smoothing_std=args.smoothing_std,
        num_perturbations=args.perturbations, seed=args.seed, low_memory=args.low_memory)
    losses = []
    with tqdm(total=args.steps, unit="step") as bar:
        while len(losses) < args.steps:
            for tokens, mask, targets in trainer.data_loader(data, steps=args.steps - len(losses)):
                losses.append(trainer.step((tokens, mask), targets))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    print(f"{args.model}: engine {trainer.engine}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"ε = {trainer.epsilon(1e-5):.2f} at δ = 1e-5")
    return losses


if __name__ == "__main__":
    main()
