"""One training run: seeded mini-batch SGD/Adam with optional shift and noise augmentation.

Everything random (batch order, augmentation) draws from one ``torch.Generator`` seeded
by the caller, and the data sits in memory as tensors, so a run is reproducible bit for
bit on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from negmerge_cli.recipes import TrainConfig

ProgressFn = Callable[[int, int, float], None]
"""Called after every epoch with ``(epoch, epochs, mean loss)``."""


@dataclass(frozen=True)
class TrainResult:
    """What a run reports in its ``run.json``: final loss and accuracy on its training set."""

    loss: float
    accuracy: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Use ``count`` intra-op threads inside the block and restore the previous setting.

    The digits model is tiny: one thread is as fast as two on an idle machine and many
    times faster when another process keeps a core busy (the threads then spin-wait).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with 0."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # [n, 1, w]
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def augment(
    x: torch.Tensor, kind: str, generator: torch.Generator, noise_std: float
) -> torch.Tensor:
    """Apply the recipe's augmentation (``none``, ``shift``, ``noise``, ``shift+noise``)."""
    if "shift" in kind:
        x = random_shift(x, generator)
    if "noise" in kind and noise_std > 0:
        noise = torch.randn(x.shape, generator=generator) * noise_std
        x = (x + noise).clamp_(0.0, 1.0)
    return x


def make_optimizer(model: nn.Module, params: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, as the run's hyperparameters say."""
    if params.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: TrainConfig,
    seed: int,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)``; deterministic in ``seed``."""
    if len(y) == 0:
        raise ValueError("cannot train on an empty set")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, params)
    model.train()
    loss_mean = float("nan")
    for epoch in range(params.epochs):
        order = torch.randperm(len(y), generator=generator)
        total, count = 0.0, 0
        for first in range(0, len(y), params.batch_size):
            index = order[first : first + params.batch_size]
            inputs = augment(x[index], params.augment, generator, params.noise_std)
            loss = F.cross_entropy(model(inputs), y[index], label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        loss_mean = total / count
        if progress is not None:
            progress(epoch + 1, params.epochs, loss_mean)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return TrainResult(loss_mean, accuracy, time.perf_counter() - start)
