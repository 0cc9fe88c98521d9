"""Small models built in code (no downloads) for the training command, tests and benchmarks.

None uses BatchNorm: per-example privacy needs layers that never mix examples.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def mlp(in_features: int = 40, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10,
        dropout: float = 0.0) -> nn.Sequential:
    """ReLU MLP: [B, in_features] -> logits [B, num_classes]."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def paper_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The DPlis / DP-SGD papers' CNN: conv 16@8x8/2, conv 32@4x4/2, FC 32, FC 10 (tanh).

    [B, C, H, W] -> logits [B, num_classes]; 28x28 (MNIST) and 32x32 (CIFAR-10) inputs.
    """
    side = (image_size + 2 * 3 - 8) // 2 + 1 - 1  # conv1 (padding 3) then max-pool 2, stride 1
    side = (side - 4) // 2 + 1 - 1  # conv2 then max-pool 2, stride 1
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * side * side, 32), nn.Tanh(), nn.Linear(32, num_classes),
    )


def conv1d_net(length: int = 40, num_classes: int = 10, channels: int = 32) -> nn.Sequential:
    """1-D CNN for MNIST-1D with GroupNorm: [B, length] -> logits [B, num_classes]."""
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.GroupNorm(4, channels), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * math.ceil(math.ceil(length / 2) / 2), num_classes),
    )


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``causal`` selects GPT- or BERT-style attention."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # [B, H, T, T]
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device)
        if self.causal:
            keep = keep.tril()
        if pad_mask is not None:  # [B, T], True = real token: padding keys are never attended
            keep = keep & pad_mask[:, None, None, :].bool()
        att = scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token model: GPT-style causal LM (``causal=True``) or BERT-style encoder.

    tokens [B, T] int64 (and optional pad mask [B, T]) -> logits [B, T, vocab];
    ``tied=True`` shares the embedding matrix with the output head.
    """

    def __init__(self, vocab: int = 256, seq_len: int = 32, dim: int = 64, heads: int = 4,
                 layers: int = 2, causal: bool = True, tied: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, causal) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        # positions expanded to [B, T] so every layer input carries the batch dimension
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy averaged over real targets: logits [B, T, V], targets [B, T].

    -100 marks ignored positions; a batch without any target has loss 0 (not NaN).
    """
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def _lm_loss_per_example(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``lm_loss`` of each sequence [B] in one call (see ``dplis.losses``)."""
    tokens = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                             reduction="none").view(targets.shape)
    return tokens.flatten(1).sum(1) / (targets != -100).flatten(1).sum(1).clamp(min=1)


lm_loss.per_example = _lm_loss_per_example


MODELS = {"mlp": mlp, "cnn": paper_cnn, "conv1d": conv1d_net}
