"""Evaluating CLIP task negation: forget-task and control accuracy under frozen zero-shot heads.

Everything that does not depend on lambda is built once per ``negmerge tune`` and reused
for every method, run and lambda: the heads (read from the sweep's ``heads.safetensors``),
the image encoder module, and the evaluation images, decoded, resized and centre-cropped
once into uint8 tensors (on the GPU when they fit in a fraction of its free memory, else
in pinned host memory). Only the encoder's forward pass runs per lambda; the zero-shot
model's own validation accuracy (lambda = 0 of every curve) is computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from negmerge_cli.evaluate.selection import Curve
from negmerge_cli.recipes import Recipe
from negmerge_cli.train.clip import (
    ImageClassifier,
    Normalizer,
    create_clip,
    eval_transform,
    image_size,
    image_stats,
    load_encoder,
    make_loader,
    read_heads,
    task_splits,
)
from negmerge_cli.train.loop import autocast, resolve_device
from negmerge_cli.train.vision import ImageDataset, ImageSet

State = dict[str, torch.Tensor]
EVAL_BATCH = 256
DEVICE_SHARE = 0.4
"""Cache the evaluation images on the GPU when they take at most this share of free memory."""


@dataclass
class CachedImages:
    """Preprocessed evaluation images (uint8 ``[N, 3, S, S]``) and their labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()


@dataclass
class ClipEvalData:
    """The four evaluation sets of task negation, decoded once."""

    val_forget: CachedImages
    test_forget: CachedImages
    val_control: CachedImages
    test_control: CachedImages
    mean: tuple[float, ...]
    std: tuple[float, ...]


def decode_images(
    images: ImageSet, indices: Sequence[int], size: int, workers: int, device: torch.device
) -> CachedImages:
    """Decode and preprocess ``indices`` once (DataLoader workers do the decoding)."""
    dataset = ImageDataset(images, indices, eval_transform(size))
    loader = make_loader(dataset, EVAL_BATCH, workers, torch.device("cpu"), seed=None)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    if not xs:
        x = torch.empty(0, 3, size, size, dtype=torch.uint8)
        return CachedImages(x, torch.empty(0, dtype=torch.long))
    return CachedImages(torch.cat(xs), torch.cat(ys))


def _place(sets: list[CachedImages], device: torch.device) -> None:
    """Move the caches to the GPU when they fit comfortably, else pin them in host memory."""
    if device.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(device)
    on_device = sum(s.nbytes() for s in sets) <= DEVICE_SHARE * free
    for s in sets:
        if on_device:
            s.x, s.y = s.x.to(device), s.y.to(device)
        else:
            s.x = s.x.pin_memory()


def load_eval_data(recipe: Recipe) -> ClipEvalData:
    """Validation and test images of the forget task and of the control task, cached."""
    device = resolve_device(recipe.device)
    shape_model = create_clip(recipe.model, load_weights=False)
    size = image_size(shape_model)
    mean, std = image_stats(shape_model)
    del shape_model
    control = recipe.data.control or "imagenet"
    forget = task_splits(recipe, recipe.data.dataset)
    kept = task_splits(recipe, control)
    sets = [
        decode_images(forget.train_images, forget.validation, size, recipe.workers, device),
        decode_images(forget.test_images, forget.test, size, recipe.workers, device),
        decode_images(kept.train_images, kept.validation, size, recipe.workers, device),
        decode_images(kept.test_images, kept.test, size, recipe.workers, device),
    ]
    _place(sets, device)
    return ClipEvalData(*sets, mean=mean, std=std)


class ClipEvaluator:
    """Evaluates ``base - lambda * vector`` (image encoder weights) on both tasks.

    The same interface as :class:`negmerge_cli.evaluate.tune.Evaluator`: ``validation``
    returns (forget, control) accuracy on the validation splits and ``test`` the test
    accuracies as ``{"forget": ..., "control": ...}``.
    """

    def __init__(self, recipe: Recipe, data: ClipEvalData, base: State) -> None:
        from negmerge_cli.train.linearize import LinearizedModel

        self.recipe = recipe
        self.data = data
        self.device = resolve_device(recipe.device)
        cpu_base = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
        encoder = load_encoder(recipe, cpu_base).to(self.device)
        # Base and task vector live on the device: each lambda's weights are one fused
        # subtraction there, not a host-side copy of the whole encoder.
        self.base = {k: v.to(self.device) for k, v in cpu_base.items()}
        self._vector: State | None = None
        self._vector_on_device: State = {}
        self.model: torch.nn.Module = (
            LinearizedModel(encoder) if recipe.model.finetune == "linear" else encoder
        )
        self.model.eval()
        heads = read_heads(recipe)
        control = recipe.data.control or "imagenet"
        missing = [t for t in (recipe.data.dataset, control) if t not in heads]
        if missing:
            from negmerge_cli.errors import UsageError

            raise UsageError(
                f"{recipe.output}: no zero-shot head for {', '.join(missing)}; run the sweep"
            )
        self.forget_head = heads[recipe.data.dataset][0].to(self.device)
        self.control_head = heads[control][0].to(self.device)
        self.normalizer = Normalizer(data.mean, data.std, self.device)
        self._base_validation: tuple[float, float] | None = None

    def edited(self, vector: State, lam: float) -> State:
        """The weights ``base - lam * vector`` (tensors missing from the vector stay as base)."""
        if vector is not self._vector:  # a new vector: move it once, reuse for every lambda
            self._vector = vector
            self._vector_on_device = {
                k: v.to(self.device, torch.float32) for k, v in vector.items() if k in self.base
            }
        moved = self._vector_on_device
        return {
            name: (value - lam * moved[name]) if name in moved else value
            for name, value in self.base.items()
        }

    def load(self, state: State) -> None:
        self.model.load_state_dict(state, strict=True)

    @torch.no_grad()
    def accuracy(self, images: CachedImages, head: torch.Tensor) -> float:
        """Top-1 accuracy of the loaded encoder under ``head`` (NaN for an empty set)."""
        if len(images) == 0:
            return float("nan")
        classifier = ImageClassifier(self.model, head)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for first in range(0, len(images), EVAL_BATCH):
            x = self.normalizer(images.x[first : first + EVAL_BATCH])
            y = images.y[first : first + EVAL_BATCH].to(self.device, non_blocking=True)
            with autocast(self.device, self.recipe.precision):
                logits = classifier(x)
            correct += (logits.argmax(-1) == y).sum()
        return int(correct) / len(images)

    def validation(self, state: State) -> tuple[float, float]:
        """(forget, control) accuracy on the validation splits."""
        is_base = state is self.base
        if is_base and self._base_validation is not None:
            return self._base_validation
        self.load(state)
        result = (
            self.accuracy(self.data.val_forget, self.forget_head),
            self.accuracy(self.data.val_control, self.control_head),
        )
        if is_base:
            self._base_validation = result
        return result

    def curve(self, vector: State, lambdas: Sequence[float]) -> Curve:
        points = [
            self.validation(self.base if lam == 0 else self.edited(vector, lam)) for lam in lambdas
        ]
        return Curve(tuple(lambdas), tuple(p[0] for p in points), tuple(p[1] for p in points))

    def test(self, state: State) -> dict[str, Any]:
        """Forget-task and control-task accuracy on their test splits."""
        self.load(state)
        return {
            "forget": self.accuracy(self.data.test_forget, self.forget_head),
            "control": self.accuracy(self.data.test_control, self.control_head),
        }
