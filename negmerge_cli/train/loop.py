"""One training run: seeded mini-batch SGD/Adam with optional shift and noise augmentation.

Everything random (batch order, augmentation) draws from one ``torch.Generator`` seeded
by the caller, and the data sits in memory as tensors, so a run is reproducible bit for
bit on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import math
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


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    from negmerge_cli.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the recipe asks for it; otherwise nothing."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps, then constant or a cosine decay to 0 at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule != "cosine":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with 0.

    With ``max_shift=4`` on 32x32 images this is the usual CIFAR random crop of a
    zero-padded image. Random numbers come from the CPU ``generator`` on every device.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, :]  # [n, 1, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing puts the index dimensions first: [n, h, w, c] -> [n, c, h, w].
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(
    x: torch.Tensor, kind: str, generator: torch.Generator, noise_std: float
) -> torch.Tensor:
    """Apply the recipe's augmentation (``none``, ``shift``, ``noise``, ``shift+noise``,
    ``crop+flip``: CIFAR's 4-pixel padded random crop and horizontal flip)."""
    if kind == "crop+flip":
        return random_flip(random_shift(x, generator, max_shift=4), generator)
    if "shift" in kind:
        x = random_shift(x, generator)
    if "noise" in kind and noise_std > 0:
        noise = torch.randn(x.shape, generator=generator).to(x.device) * noise_std
        x = (x + noise).clamp_(0.0, 1.0)
    return x


def make_optimizer(model: nn.Module, params: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, Adam or AdamW, as the run's hyperparameters say."""
    if params.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
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
    precision: str = "fp32",
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)``; deterministic in ``seed`` (on one device).

    The data moves once to the model's device; on CUDA the model and images use the
    channels-last layout and ``precision="bf16"`` autocasts to bfloat16.
    """
    if len(y) == 0:
        raise ValueError("cannot train on an empty set")
    start = time.perf_counter()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, params)
    steps = params.epochs * math.ceil(len(y) / params.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, params.warmup_steps, params.schedule)
    )
    model.train()
    loss_mean = float("nan")
    for epoch in range(params.epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        total = torch.zeros((), device=device)
        count = 0
        for first in range(0, len(y), params.batch_size):
            index = order[first : first + params.batch_size]
            inputs = augment(x[index], params.augment, generator, params.noise_std)
            if cuda:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[index], label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(index)  # no sync with the GPU per step
            count += len(index)
        loss_mean = float(total) / count
        if progress is not None:
            progress(epoch + 1, params.epochs, loss_mean)
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(device, precision):
        for first in range(0, len(y), 1024):
            batch = x[first : first + 1024]
            correct += int((model(batch).argmax(1) == y[first : first + 1024]).sum())
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    return TrainResult(loss_mean, correct / len(y), time.perf_counter() - start)
