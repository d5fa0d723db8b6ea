"""CLIP task negation: fine-tune the image encoder on a task, sweep RandAugment, save vectors.

The setting of task arithmetic (Ilharco et al., ICLR 2023) as NegMerge uses it: an
open_clip model, a frozen zero-shot head per task built from class names and prompt
templates, and only the image encoder fine-tuned (AdamW, lr 1e-5, weight decay 0.1,
batch 128, 500 warm-up steps then cosine, the reference's epochs per task). The sweep
varies RandAugment (magnitude x number of operations); each run's image encoder is saved
as an ordinary state dict, so the merge engine computes task vectors against the
zero-shot encoder the sweep writes once::

    OUT/zeroshot/{model.safetensors, run.json}   the pre-trained image encoder (the base)
    OUT/heads.safetensors                        zero-shot heads of the task and the control
    OUT/seed-S/runs/<run-id>/{model.safetensors, run.json}

Weights come only from ``model.pretrained`` on disk; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from negmerge_cli.errors import CheckpointError, ConfigError, UsageError
from negmerge_cli.recipes import ModelConfig, Recipe, TrainConfig
from negmerge_cli.train.loop import TrainResult, autocast, lr_factor, resolve_device
from negmerge_cli.train.sweep import StartingPoint, SweepJob
from negmerge_cli.train.vision import ImageDataset, ImageSet, limited, split_validation

WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
HEADS_FILE = "heads.safetensors"
GRAD_CLIP = 1.0


# --------------------------------------------------------------------------- the model


def resolve_weights(config: ModelConfig) -> Path:
    """The weights file of ``model.pretrained``: the file itself, or the one weights file
    found in the folder (an open_clip or Hugging Face cache folder)."""
    path = config.pretrained
    if path is None:
        raise ConfigError("model.pretrained: required for arch clip (the open_clip weights file)")
    hint = (
        f"put the {config.name} weights there (OpenAI's {config.name}.pt, or an open_clip "
        "open_clip_pytorch_model.bin / open_clip_model.safetensors); nothing is downloaded"
    )
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"model.pretrained: no open_clip weights at {path}; {hint}")
    found = [p for p in path.rglob("*") if p.is_file() and p.name in WEIGHT_FILES]
    found += [p for p in path.rglob("*.pt") if p.is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"model.pretrained: the folder {path} holds no weights file; {hint}")
    names = ", ".join(str(p.relative_to(path)) for p in sorted(found)[:5])
    raise ConfigError(
        f"model.pretrained: the folder {path} holds several weights files ({names}); "
        "give the file itself"
    )


def create_clip(config: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The open_clip model ``config.name`` in float32 eval mode, with the local weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach the network
    import logging

    import open_clip

    if config.name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith("vit-")][:12]
        raise ConfigError(
            f"model.name: open_clip has no model {config.name!r} (e.g. {', '.join(close)})"
        )
    weights = resolve_weights(config) if load_weights else None
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": we load them
    try:
        model = open_clip.create_model(
            config.name, pretrained=None, force_quick_gelu=config.quick_gelu
        )
    finally:
        logging.getLogger().setLevel(quiet)
    if weights is not None:
        from open_clip.factory import load_checkpoint

        try:
            load_checkpoint(model, str(weights))
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise CheckpointError(
                f"{weights}: does not fit open_clip model {config.name}: {detail[:300]}"
            ) from None
    return model.float().eval()


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def image_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = model.visual
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def eval_transform(size: int) -> Callable:
    """Resize (bicubic) and centre-crop to ``size``; uint8 tensor (normalised on device)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.PILToTensor(),
        ]
    )


def train_transform(size: int, params: TrainConfig) -> Callable:
    """The evaluation preprocessing plus torchvision's RandAugment (when magnitude > 0)."""
    from torchvision import transforms as T

    steps = [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.PILToTensor(),
    ]
    if params.randaug_magnitude > 0:
        steps.append(T.RandAugment(num_ops=params.randaug_ops, magnitude=params.randaug_magnitude))
    return T.Compose(steps)


class Normalizer:
    """uint8 ``[N, 3, H, W]`` batches to normalised float on the device (one place)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """An image encoder and a frozen zero-shot head: logits = normalise(features) @ head.T."""

    def __init__(self, encoder: nn.Module, head: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        features = features / features.norm(dim=-1, keepdim=True)
        return features @ self.head.to(features.dtype).T


# --------------------------------------------------------------------------- data


@dataclass
class TaskSplits:
    """The forget task's train / validation / test indices (validation carved from train)."""

    train_images: ImageSet
    test_images: ImageSet
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def task_splits(recipe: Recipe, dataset: str) -> TaskSplits:
    """Open ``dataset`` under ``data.root`` and split it as the task-vectors protocol does."""
    from negmerge_cli.train.vision import open_split

    config = recipe.data
    assert config.root is not None
    train_images = open_split(dataset, config.root, train=True)
    test_images = open_split(dataset, config.root, train=False)
    train_pos, val_pos = split_validation(
        len(train_images), config.validation_fraction, config.validation_max, config.split_seed
    )
    return TaskSplits(
        train_images, test_images,
        limited(train_pos, config.limit, config.split_seed),
        limited(val_pos, config.limit, config.split_seed + 1),
        limited(np.arange(len(test_images)), config.limit, config.split_seed + 2),
    )  # fmt: skip


def class_names_of(recipe: Recipe, images: ImageSet, control: bool) -> list[str]:
    from negmerge_cli.train.vision import class_names

    if control:
        return class_names(images, recipe.data.control_class_names, "data.control_class_names")
    return class_names(images, recipe.data.class_names, "data.class_names")


# --------------------------------------------------------------------------- zero-shot heads


def zeroshot_weights(class_embeddings: Sequence[torch.Tensor], logit_scale: float) -> torch.Tensor:
    """The head from per-class text embeddings ``[templates, dim]``: each row normalised,
    averaged over templates, renormalised, times the logit scale -> ``[classes, dim]``.

    >>> w = zeroshot_weights([torch.tensor([[3.0, 4.0], [0.0, 2.0]])], 10.0)
    >>> [round(v, 4) for v in w[0].tolist()]
    [3.1623, 9.4868]
    """
    rows = []
    for embeddings in class_embeddings:
        embeddings = embeddings.float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows) * logit_scale


@torch.no_grad()
def build_head(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    tokenizer_name: str,
) -> torch.Tensor:
    """Encode every class name in every template with ``model``'s text tower."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    model = model.to(device)
    per_class = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        per_class.append(model.encode_text(tokens).float().cpu())
    scale = float(model.logit_scale.exp())
    return zeroshot_weights(per_class, scale)


def heads_path(recipe: Recipe) -> Path:
    return recipe.output / HEADS_FILE


def read_heads(recipe: Recipe) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The saved heads by dataset name, with the class names they were built from."""
    path = heads_path(recipe)
    if not path.is_file():
        raise UsageError(f"{path}: the zero-shot heads are missing; run the sweep first")
    return _read_heads_file(path)


def _read_heads_file(path: Path) -> dict[str, tuple[torch.Tensor, list[str]]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            out[key] = (handle.get_tensor(key), json.loads(meta.get(key, "[]")))
    return out


# --------------------------------------------------------------------------- fine-tuning


def encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The image encoder's weights on the CPU, contiguous, ready to save."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in encoder.state_dict().items()}


def finetune_encoder(
    encoder: nn.Module,
    head: torch.Tensor,
    loader: torch.utils.data.DataLoader,
    params: TrainConfig,
    normalizer: Normalizer,
    precision: str,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``encoder`` (a plain or linearized image encoder) in place under a frozen head."""
    start = time.perf_counter()
    device = normalizer.device
    model = ImageClassifier(encoder, head).to(device)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    steps = params.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, params.warmup_steps, params.schedule)
    )
    model.train()
    loss_mean = math.nan
    correct = seen = 0
    for epoch in range(params.epochs):
        total = torch.zeros((), device=device)
        count = 0
        right = torch.zeros((), device=device, dtype=torch.long)
        for images, labels in loader:
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(normalizer(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(labels)
            right += (logits.detach().argmax(-1) == labels).sum()
            count += len(labels)
        loss_mean = float(total) / max(1, count)
        correct, seen = int(right), count
        if progress is not None:
            progress(epoch + 1, params.epochs, loss_mean)
    model.eval()
    # Accuracy over the last epoch's augmented batches (no extra pass over the data).
    return TrainResult(loss_mean, correct / max(1, seen), time.perf_counter() - start)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    seed: int | None,
) -> torch.utils.data.DataLoader:
    """Shuffled (seeded) when ``seed`` is given; pinned memory and persistent workers on GPU."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=seed is not None, generator=generator,
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, drop_last=False,
    )  # fmt: skip


# --------------------------------------------------------------------------- the sweep


def _zeroshot_info(recipe: Recipe, weights: Path) -> dict[str, Any]:
    from negmerge_cli import __version__
    from negmerge_cli.train.sweep import RUN_FORMAT

    stat = weights.stat()
    return {
        "format": RUN_FORMAT,
        "kind": "zeroshot",
        "run_id": "zeroshot",
        "seed": 0,
        "model": {
            "name": recipe.model.name,
            "quick_gelu": recipe.model.quick_gelu,
            "weights": str(weights),
            "weights_bytes": stat.st_size,
        },
        "negmerge_version": __version__,
    }


def _write_heads(recipe: Recipe, heads: dict[str, tuple[torch.Tensor, list[str]]]) -> None:
    from negmerge_cli.io import save_state_dict

    tensors = {name: head.contiguous() for name, (head, _names) in heads.items()}
    meta = {name: json.dumps(names) for name, (_head, names) in heads.items()}
    save_state_dict(tensors, heads_path(recipe), metadata=meta, force=True)


def clip_jobs(recipe: Recipe) -> list[SweepJob]:
    """The CLIP sweep as jobs, in the order the local backend runs them: the zero-shot base
    (image encoder and heads, written once for every seed), then every seed's fine-tunes,
    which start from it. The class names are read here (cheap): a missing name file fails
    before any model loads."""
    from negmerge_cli.train.sweep import derive_seed, run_dir

    weights = resolve_weights(recipe.model)
    tasks = [recipe.data.dataset, recipe.data.control or "imagenet"]
    names_of = {
        task: class_names_of(recipe, task_splits(recipe, task).train_images, control=i == 1)
        for i, task in enumerate(tasks)
    }
    folder = recipe.output / "zeroshot"
    expect = {"model": _expected_model(folder, _zeroshot_info(recipe, weights)["model"]),
              "heads": names_of}  # fmt: skip
    jobs = [SweepJob("zeroshot", 0, "zeroshot", "zero-shot base", folder, recipe.pretrain, 0,
                     expect=expect)]  # fmt: skip
    # A run depends on the head it was trained under: its class names are part of its identity.
    names_digest = hashlib.sha256(json.dumps(names_of[tasks[0]]).encode()).hexdigest()[:16]
    extra = {
        "finetune": recipe.model.finetune,
        "dataset": recipe.data.dataset,
        "class_names_sha256": names_digest,
    }
    for seed in recipe.seeds:
        for run in recipe.sweep.runs:
            label = f"seed {seed} run {run.run_id}"
            jobs.append(SweepJob("finetune", seed, run.run_id, label, run_dir(recipe, seed, run),
                                 run.params, derive_seed(seed, run.run_id), dict(run.varied),
                                 extra))  # fmt: skip
    return jobs


def _expected_model(folder: Path, model: dict[str, Any]) -> dict[str, Any]:
    """``model`` as the saved zero-shot base names it when only the spelling of the weights
    path differs (relative on one run, absolute on the Ray driver) and it is the same file."""
    from negmerge_cli.train.sweep import read_run

    saved = (read_run(folder) or {}).get("model")
    if (
        isinstance(saved, dict)
        and saved != model
        and {**saved, "weights": model["weights"]} == model
    ):
        try:
            if os.path.samefile(saved["weights"], model["weights"]):
                return saved
        except (OSError, TypeError):
            pass
    return model


def zeroshot_is_finished(job: SweepJob) -> bool:
    """True when the zero-shot base is there, from the recipe's weights, with heads built
    from the recipe's class names; an error when it was extracted from other weights."""
    from negmerge_cli.train.sweep import MODEL_FILE, read_run

    done = read_run(job.folder)
    if done is None or not (job.folder / MODEL_FILE).is_file():
        return False
    if done.get("model") != job.expect["model"]:
        raise UsageError(
            f"{job.folder}: holds the zero-shot encoder of other weights ({done.get('model')}); "
            "delete it or choose another output folder"
        )
    heads = job.folder.parent / HEADS_FILE
    if not heads.is_file():
        return False
    saved = _read_heads_file(heads)
    return all(t in saved and saved[t][1] == names for t, names in job.expect["heads"].items())


def run_zeroshot_job(recipe: Recipe, job: SweepJob, progress: Any) -> TrainResult | None:
    """Write the zero-shot image encoder and the heads (None when already there). Heads
    built from other class names are rebuilt; the encoder is kept."""
    from negmerge_cli.evaluate.templates import templates_for
    from negmerge_cli.train.sweep import MODEL_FILE, read_run, write_run

    if zeroshot_is_finished(job):
        return None
    began = time.perf_counter()
    device = resolve_device(recipe.device)
    weights = resolve_weights(recipe.model)
    progress.note(f"zero-shot: loading {recipe.model.name} from {weights}")
    model = create_clip(recipe.model)
    heads = {}
    for task, names in job.expect["heads"].items():
        head = build_head(model, names, templates_for(task), device, recipe.model.name)
        heads[task] = (head, names)
        progress.note(f"zero-shot: head for {task} ({len(names)} classes)")
    _write_heads(recipe, heads)
    if read_run(job.folder) is None or not (job.folder / MODEL_FILE).is_file():
        write_run(job.folder, encoder_state(model.visual), _zeroshot_info(recipe, weights))
    return TrainResult(math.nan, math.nan, time.perf_counter() - began)


def load_encoder(recipe: Recipe, state: dict[str, torch.Tensor]) -> nn.Module:
    """The image encoder architecture of ``recipe`` with ``state`` loaded (no text tower)."""
    model = create_clip(recipe.model, load_weights=False)
    encoder = model.visual
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise CheckpointError(
            f"the saved image encoder does not fit {recipe.model.name}: {lines[-1].strip()}"
        ) from None
    return encoder.float()


@dataclass
class ClipStart(StartingPoint):
    """What every fine-tune of a CLIP sweep starts from, loaded once per process: the
    zero-shot encoder (``model``, reset to ``state`` before each run), the task's head,
    its training images and their preprocessing."""

    head: torch.Tensor
    splits: TaskSplits
    size: int
    normalizer: Normalizer


def load_clip_start(recipe: Recipe) -> ClipStart:
    """Load the zero-shot base (it must exist) for the fine-tunes."""
    from negmerge_cli.io import load_state_dict
    from negmerge_cli.train.sweep import file_sha256, pretrained_path

    device = resolve_device(recipe.device)
    base_file = pretrained_path(recipe, 0)
    base_sha = file_sha256(base_file)
    base_state = load_state_dict(base_file)
    head, _names = read_heads(recipe)[recipe.data.dataset]
    splits = task_splits(recipe, recipe.data.dataset)
    shape_model = create_clip(recipe.model, load_weights=False)
    size = image_size(shape_model)
    mean, std = image_stats(shape_model)
    del shape_model
    # One encoder module for the process, reset to the zero-shot weights before each run
    # (building a large open_clip model from scratch takes seconds).
    encoder = load_encoder(recipe, base_state).to(device)
    return ClipStart(base_sha, encoder, base_state, head, splits, size,
                     Normalizer(mean, std, device))  # fmt: skip


def run_clip_finetune(
    recipe: Recipe,
    job: SweepJob,
    start: ClipStart,
    progress: Any,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune the zero-shot encoder (full or linearized) once and write the run."""
    from negmerge_cli.train.linearize import LinearizedModel
    from negmerge_cli.train.sweep import _now, _run_info, write_run

    device = start.normalizer.device
    torch.manual_seed(job.train_seed)
    encoder = start.model
    encoder.load_state_dict(start.state)
    trained_module: nn.Module = encoder
    if recipe.model.finetune == "linear":
        trained_module = LinearizedModel(encoder)
    dataset = ImageDataset(
        start.splits.train_images, start.splits.train, train_transform(start.size, job.params)
    )
    loader = make_loader(
        dataset, job.params.batch_size, recipe.workers, device, seed=job.train_seed
    )

    def report(epoch: int, epochs: int, loss: float) -> None:
        progress.epoch(epoch, epochs, loss)
        if on_epoch is not None:
            on_epoch(epoch, epochs, loss)

    begun = _now()
    result = finetune_encoder(
        trained_module, start.head, loader, job.params, start.normalizer, recipe.precision, report
    )
    info = _run_info(
        "finetune", job.run_id, job.seed, job.train_seed, job.params, result, len(dataset),
        begun, dict(job.varied), start.sha256,
    )  # fmt: skip
    info.update(job.expect)
    write_run(job.folder, encoder_state(encoder), info)
    progress.finish(
        f"done in {result.seconds:.1f}s (loss {result.loss:.3f}, train acc {result.accuracy:.3f})"
    )
    del trained_module, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_clip_sweep(
    recipe: Recipe,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> Any:
    """Zero-shot encoder and heads once, then every (seed, run) fine-tune of the task: the
    jobs of :func:`clip_jobs` one after another, as the Ray backend runs them as tasks."""
    from negmerge_cli.train.sweep import (
        SweepProgress,
        SweepSummary,
        remove_leftovers,
        run_job,
        seed_dir,
    )

    started = time.perf_counter()
    resolve_device(recipe.device)  # a missing GPU fails before any work
    progress = SweepProgress(stream, quiet)
    progress.begin(len(recipe.sweep.runs) * len(recipe.seeds))
    recipe.output.mkdir(parents=True, exist_ok=True)
    start: ClipStart | None = None
    cleaned: set[int] = set()
    trained = skipped = 0
    for job in clip_jobs(recipe):
        if job.kind == "zeroshot":
            run_job(recipe, job, None, progress)
            continue
        if start is None:
            start = load_clip_start(recipe)
        if job.seed not in cleaned:
            cleaned.add(job.seed)
            root = seed_dir(recipe, job.seed)
            for folder in (root, root / "runs"):
                for leftover in remove_leftovers(folder):
                    progress.note(f"removed the leftover of an interrupted run: {leftover}")
        progress.start(job.label)
        if run_job(recipe, job, None, progress, start, on_epoch) is None:
            skipped += 1
        else:
            trained += 1
    seconds = time.perf_counter() - started
    progress.note(
        f"sweep: {trained} run(s) trained, {skipped} skipped (finished earlier) "
        f"in {seconds:.1f}s -> {recipe.output}"
    )
    return SweepSummary(trained, skipped, seconds, tuple(seed_dir(recipe, s) for s in recipe.seeds))
