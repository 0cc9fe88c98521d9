"""Small models and batches shared by the tests."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from dplis.models import TinyTransformer, lm_loss


def mlp_case(batch: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].requires_grad_(False)  # a frozen layer
    return model, F.cross_entropy, torch.randn(batch, 10), torch.randint(0, 3, (batch,))


def cnn_case(batch: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(  # one input channel, then eight: both per-example conv paths
        nn.Conv2d(1, 8, 3, stride=2), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 2 * 2, 4),
    )
    return model, F.cross_entropy, torch.randn(batch, 1, 9, 9), torch.randint(0, 4, (batch,))


class EmbedNet(nn.Module):
    """Embedding + LayerNorm + mean pooling + a frozen projection + head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.ln = nn.LayerNorm(12)
        self.frozen = nn.Linear(12, 12).requires_grad_(False)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens):
        return self.head(self.frozen(self.ln(self.emb(tokens))).mean(1))


def embed_case(batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    tokens, labels = torch.randint(0, 30, (batch, 7)), torch.randint(0, 5, (batch,))
    return EmbedNet(), F.cross_entropy, tokens, labels


def gpt_case(batch: int = 3, seed: int = 0):
    """Tied-embedding causal LM on padded sequences: inputs (tokens, mask), targets -100 on pads."""
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=17, seq_len=8, dim=16, heads=2, layers=1, causal=True, tied=True)
    tokens = torch.randint(0, 17, (batch, 8))
    mask = torch.ones(batch, 8, dtype=torch.bool)
    mask[0, 5:] = False
    targets = tokens.roll(-1, 1).masked_fill(~mask, -100)
    return model, lm_loss, (tokens, mask), targets


def transformer_case(causal: bool, batch: int = 3, seed: int = 2):
    """A 2-layer TinyTransformer (vocab 13, T = 6, width 8; the causal one ties its head to
    the embedding) on padded tokens: inputs (tokens, mask), targets -100 on the pads
    (example 1 padded from position 3)."""
    torch.manual_seed(seed)
    model = TinyTransformer(vocab=13, seq_len=6, dim=8, heads=2, layers=2, causal=causal,
                            tied=causal)
    tokens = torch.randint(0, 13, (batch, 6))
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[1, 3:] = False
    return model, lm_loss, (tokens, mask), tokens.masked_fill(~mask, -100)


class OutsideUse(nn.Module):
    """The embedding matrix is also used by F.linear in the parent's forward: no hook sees it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, tokens):
        return F.linear(self.lin(self.emb(tokens)).mean(1), self.emb.weight)


class Twice(nn.Module):
    """No ghost rule (the vmap fallback), one parameter registered under two attribute names."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.again = self.scale  # the same parameter, registered a second time

    def forward(self, x):
        return x * self.scale + x.square() * self.again


CASES = {"mlp": mlp_case, "cnn": cnn_case, "embed": embed_case, "gpt": gpt_case}


@contextlib.contextmanager
def freed_before(watched: nn.Module, reached: nn.Module) -> Iterator[dict]:
    """While open, record whether ``watched``'s output storage is already freed when the
    backward computes the gradient of ``reached``'s output: the yielded dict's "freed"."""
    seen: dict = {}

    def keep(module, args, out):
        seen["output"] = weakref.ref(out.untyped_storage())

    def probe(module, args, out):
        def reached_now(grad):
            seen["freed"] = seen["output"]() is None

        out.register_hook(reached_now)

    hooks = [watched.register_forward_hook(keep), reached.register_forward_hook(probe)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
