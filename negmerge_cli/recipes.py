"""YAML recipes: a strict schema, grid expansion and ``--set key.sub=value`` overrides.

A recipe describes one whole unlearning experiment (data and splits, the model and how it
is pre-trained, the fine-tuning sweep, the methods and lambda grid to compare, the
selection rule, seeds, output folder). It is validated completely before any work starts:
unknown keys, wrong types, missing files and unknown method names are all collected and
raised together as one :class:`~negmerge_cli.errors.ConfigError`, each with its location
(``sweep.grid.lr[1] (line 31)``).

This module imports only the standard library and PyYAML, so that ``negmerge recipes
validate`` answers without importing torch.

Example:
    >>> from negmerge_cli import load_recipe
    >>> recipe = load_recipe("digits", overrides=["seeds=[0]", "sweep.base.epochs=2"])
    >>> len(recipe.sweep.runs) >= 8
    True
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from negmerge_cli.errors import ConfigError

SCENARIOS = ("class", "random", "task")
"""``task``: task negation (forget a whole dataset, keep a control task; the CLIP setting)."""
VISION_DATASETS = (
    "cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "imagenet",
    "cifar10",
)  # fmt: skip
"""Image datasets read from a local folder (never downloaded)."""
DATASETS = ("digits", *VISION_DATASETS)
ARCHITECTURES = ("small_cnn", "resnet18", "clip")
FINETUNE_MODES = ("full", "linear")
"""``linear``: fine-tune the first-order expansion around the pre-trained weights (CLIP)."""
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "shift", "noise", "shift+noise", "crop+flip")
MERGE_METHODS = ("negmerge", "mean", "ties", "magmax")
"""Methods computed by the merge engine from all runs at once."""
SEARCH_METHODS = ("single", "greedy")
"""Methods that need evaluation to pick which runs to use."""
TUNE_METHODS = MERGE_METHODS + SEARCH_METHODS
OBJECTIVES = ("min_forget", "match_heldout")
DIGITS_CLASSES = 10

BUNDLED_PACKAGE = "negmerge_cli.bundled_recipes"


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run: pre-training, retraining or one fine-tune."""

    lr: float = 0.01
    """Learning rate."""
    epochs: int = 5
    """Passes over the training set."""
    batch_size: int = 32
    """Mini-batch size."""
    optimizer: str = "sgd"
    """``sgd`` (with momentum) or ``adam``."""
    momentum: float = 0.9
    """SGD momentum; ignored by Adam."""
    weight_decay: float = 0.0
    """L2 penalty."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""
    augment: str = "none"
    """``none``, ``shift`` (random 1-pixel shifts), ``noise`` (Gaussian) or ``shift+noise``."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise augmentation (pixels are in [0, 1])."""
    schedule: str = "constant"
    """Learning-rate schedule: ``constant`` or ``cosine`` (to 0 at the last step)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    randaug_magnitude: int = 0
    """torchvision RandAugment magnitude (image datasets; 0 = no RandAugment)."""
    randaug_ops: int = 2
    """RandAugment's number of operations per image."""


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the sweep: its folder name and its full hyperparameters."""

    run_id: str
    params: TrainConfig
    varied: Mapping[str, Any]
    """The hyperparameters this run sets beyond ``sweep.base`` (what makes it different)."""


@dataclass(frozen=True)
class DataConfig:
    """Which data, what is forgotten, and how it splits into train / validation / test."""

    dataset: str = "digits"
    forget_classes: tuple[int, ...] = ()
    """Class forgetting: the classes to forget (scenario ``class``)."""
    forget_fraction: float | None = None
    """Random forgetting: the share of the training set to forget (scenario ``random``)."""
    test_fraction: float = 0.25
    validation_fraction: float = 0.15
    """Held out from the training data; used only to choose lambda and runs."""
    split_seed: int = 0
    """Fixes the splits (and the random forget set); the same for every seed."""
    validation_max: int | None = None
    """At most this many validation images (image datasets: 10% of train, at most 5,000)."""
    root: Path | None = None
    """Image datasets: the folder holding one sub-folder per dataset (``root/eurosat``)."""
    class_names: Path | None = None
    """A text file with one class name per line, replacing the dataset's own names."""
    control: str | None = None
    """Task negation: the control task whose accuracy must be kept (``imagenet``)."""
    control_class_names: Path | None = None
    """Class-name file of the control task (ImageNet folders are named by WordNet id)."""
    limit: int | None = None
    """Use at most this many images of each split (quick trials; None = all)."""


@dataclass(frozen=True)
class ModelConfig:
    """The network, and either pre-trained weights on disk or pre-training in the recipe."""

    arch: str = "small_cnn"
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    pretrained: Path | None = None
    """A state dict to start from; when absent the recipe pre-trains (``pretrain``). For
    ``clip``: the open_clip weights file (or a folder holding exactly one)."""
    name: str = "ViT-B-32"
    """``clip``: the open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ...)."""
    quick_gelu: bool = True
    """``clip``: QuickGELU activations, as OpenAI's weights need."""
    finetune: str = "full"
    """``clip``: ``full`` fine-tuning of the image encoder or ``linear`` (its linearization)."""


@dataclass(frozen=True)
class SweepConfig:
    """The fine-tunes on the forget set whose task vectors are merged."""

    base: TrainConfig
    runs: tuple[RunSpec, ...]


@dataclass(frozen=True)
class TuneConfig:
    """How methods are compared: which ones, over which lambdas, chosen by which rule."""

    methods: tuple[str, ...] = TUNE_METHODS
    lambdas: tuple[float, ...] = tuple(i / 20 for i in range(21))
    retain_ratio: float = 0.95
    """Validation retain accuracy must stay >= this share of the pre-trained model's."""
    objective: str = "min_forget"
    """``min_forget``: lowest validation forget accuracy; ``match_heldout``: forget accuracy
    closest to the model's own accuracy on held-out data (random forgetting)."""
    ties_density: float = 0.2


@dataclass(frozen=True)
class ResourcesConfig:
    """What each run of the sweep asks a Ray cluster for (``--backend ray``; the local
    backend ignores it)."""

    cpus: float = 1.0
    """CPUs reserved for each run."""
    gpus: float = 0.0
    """GPUs reserved for each run (a fraction shares a GPU between runs)."""
    retries: int = 3
    """How often a run whose worker died (a killed process, a lost node) is started again."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; build it with :func:`load_recipe`."""

    name: str
    scenario: str
    output: Path
    seeds: tuple[int, ...]
    threads: int
    data: DataConfig
    model: ModelConfig
    pretrain: TrainConfig
    sweep: SweepConfig
    tune: TuneConfig
    retrain: bool
    """Retrain from scratch on the retain set as the reference (random forgetting)."""
    mia: bool
    """Report membership-inference efficacy (SalUn style)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    precision: str = "fp32"
    """``bf16``: autocast matrix products to bfloat16 on CUDA (weights stay float32)."""
    workers: int = 0
    """DataLoader worker processes decoding images (image datasets)."""
    description: str = ""
    source: str = ""
    overrides: tuple[str, ...] = ()
    """The ``--set`` strings applied on top of the file (recorded with the results)."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Per-run resources and retries on Ray."""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The recipe as a plain mapping after overrides (stored with the results)."""


# --------------------------------------------------------------------------- checkers

_INVALID = object()
_REQUIRED = object()

Check = Callable[[Any, str, list[str]], Any]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any, loc: str, errors: list[str]) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{loc}: expected an integer, got {_type_name(value)} {value!r}")
            return _INVALID
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            errors.append(f"{loc}: {value} is out of range {_range(lo, hi)}")
            return _INVALID
        return value

    return check


def _range(lo: float | None, hi: float | None, open_lo: bool = False, open_hi: bool = False) -> str:
    left = "(" if open_lo else "["
    right = ")" if open_hi else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _float(
    lo: float | None = None, hi: float | None = None, open_lo: bool = False, open_hi: bool = False
) -> Check:
    def check(value: Any, loc: str, errors: list[str]) -> Any:
        # PyYAML reads ``1e-3`` (no dot) as a string; accept it since it clearly is a number.
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{loc}: expected a number, got {_type_name(value)} {value!r}")
            return _INVALID
        value = float(value)
        if not math.isfinite(value):
            errors.append(f"{loc}: expected a finite number, got {value}")
            return _INVALID
        bad_lo = lo is not None and (value <= lo if open_lo else value < lo)
        bad_hi = hi is not None and (value >= hi if open_hi else value > hi)
        if bad_lo or bad_hi:
            errors.append(f"{loc}: {value:g} is out of range {_range(lo, hi, open_lo, open_hi)}")
            return _INVALID
        return value

    return check


def _bool(value: Any, loc: str, errors: list[str]) -> Any:
    if not isinstance(value, bool):
        errors.append(f"{loc}: expected true or false, got {_type_name(value)} {value!r}")
        return _INVALID
    return value


def _str(value: Any, loc: str, errors: list[str]) -> Any:
    if not isinstance(value, str):
        errors.append(f"{loc}: expected a string, got {_type_name(value)} {value!r}")
        return _INVALID
    return value


def _choice(options: Sequence[str]) -> Check:
    def check(value: Any, loc: str, errors: list[str]) -> Any:
        if not isinstance(value, str) or value not in options:
            errors.append(f"{loc}: unknown value {value!r}; choose one of: {', '.join(options)}")
            return _INVALID
        return value

    return check


def _list_of(item: Check, *, min_len: int = 1, unique: bool = False) -> Check:
    def check(value: Any, loc: str, errors: list[str]) -> Any:
        if not isinstance(value, list):
            errors.append(f"{loc}: expected a list, got {_type_name(value)} {value!r}")
            return _INVALID
        if len(value) < min_len:
            errors.append(f"{loc}: expected at least {min_len} item(s), got {len(value)}")
            return _INVALID
        out = [item(v, f"{loc}[{i}]", errors) for i, v in enumerate(value)]
        if any(v is _INVALID for v in out):
            return _INVALID
        if unique:
            seen: set[Any] = set()
            for i, v in enumerate(out):
                if v in seen:
                    errors.append(f"{loc}[{i}]: duplicate value {v!r}")
                    return _INVALID
                seen.add(v)
        return tuple(out)

    return check


def _optional(inner: Check) -> Check:
    def check(value: Any, loc: str, errors: list[str]) -> Any:
        return None if value is None else inner(value, loc, errors)

    return check


def _existing_path(value: Any, loc: str, errors: list[str]) -> Any:
    if _str(value, loc, errors) is _INVALID:
        return _INVALID
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        errors.append(f"{loc}: file not found: {value}")
        return _INVALID
    return path


def _path(value: Any, loc: str, errors: list[str]) -> Any:
    """A path that need not exist yet (checked by :func:`check_files` before running)."""
    if _str(value, loc, errors) is _INVALID:
        return _INVALID
    return Path(os.path.expanduser(value))


def _ray_quantity(hi: int) -> Check:
    """A resource amount as Ray takes it: a fraction below 1, or a whole number."""
    number = _float(0.0, hi)

    def check(value: Any, loc: str, errors: list[str]) -> Any:
        value = number(value, loc, errors)
        if value is not _INVALID and value > 1 and not value.is_integer():
            errors.append(f"{loc}: {value:g}: Ray takes a fraction below 1 or a whole number")
            return _INVALID
        return value

    return check


def _join(loc: str, key: Any) -> str:
    return f"{loc}.{key}" if loc else str(key)


def _section(
    raw: Any, loc: str, spec: Mapping[str, tuple[Check, Any]], errors: list[str]
) -> dict[str, Any] | None:
    """Check a mapping against ``spec`` (key -> (checker, default)); None when unusable."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{loc or 'recipe'}: expected a mapping, got {_type_name(raw)} {raw!r}")
        return None
    out: dict[str, Any] = {}
    for key in raw:
        if key not in spec:
            errors.append(f"{_join(loc, key)}: unknown key{_suggest(key, spec)}")
    for key, (check, default) in spec.items():
        if key in raw:
            value = check(raw[key], _join(loc, key), errors)
            if value is not _INVALID:
                out[key] = value
        elif default is _REQUIRED:
            errors.append(f"{_join(loc, key)}: missing required key")
    return out


def _suggest(key: Any, options: Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(str(key), options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; expected one of: {', '.join(options)}"


# --------------------------------------------------------------------------- schema

TRAIN_FIELDS: dict[str, tuple[Check, Any]] = {
    "lr": (_float(0.0, None, open_lo=True), None),
    "epochs": (_int(1, 10_000), None),
    "batch_size": (_int(1, 1_000_000), None),
    "optimizer": (_choice(OPTIMIZERS), None),
    "momentum": (_float(0.0, 1.0, open_hi=True), None),
    "weight_decay": (_float(0.0, None), None),
    "label_smoothing": (_float(0.0, 1.0, open_hi=True), None),
    "augment": (_choice(AUGMENTATIONS), None),
    "noise_std": (_float(0.0, None), None),
    "schedule": (_choice(SCHEDULES), None),
    "warmup_steps": (_int(0, 10_000_000), None),
    "randaug_magnitude": (_int(0, 30), None),
    "randaug_ops": (_int(1, 16), None),
}

# Short names used in run folder names (``03-lr0.03-ep6-ls0.1-shift``).
_RUN_ID_ABBREVIATIONS = {
    "lr": "lr",
    "epochs": "ep",
    "batch_size": "bs",
    "optimizer": "",
    "momentum": "mom",
    "weight_decay": "wd",
    "label_smoothing": "ls",
    "augment": "",
    "noise_std": "ns",
    "schedule": "",
    "warmup_steps": "wu",
    "randaug_magnitude": "m",
    "randaug_ops": "n",
}


def _train_config(raw: Any, loc: str, errors: list[str], base: TrainConfig) -> TrainConfig | None:
    values = _section(raw, loc, TRAIN_FIELDS, errors)
    if values is None:
        return None
    return _replace(base, values)


def _replace(base: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    merged = {f.name: getattr(base, f.name) for f in fields(TrainConfig)}
    merged.update(values)
    return TrainConfig(**merged)


def _lambdas(value: Any, loc: str, errors: list[str]) -> Any:
    """Either an explicit list of lambdas or ``{start, stop, count}`` (an even grid)."""
    if isinstance(value, list):
        return _list_of(_float(), unique=True)(value, loc, errors)
    spec = {
        "start": (_float(), 0.0),
        "stop": (_float(), 1.0),
        "count": (_int(1, 100_000), 21),
    }
    before = len(errors)
    grid = _section(value, loc, spec, errors)
    if grid is None or len(errors) > before:
        return _INVALID
    start, stop, count = grid.get("start", 0.0), grid.get("stop", 1.0), grid.get("count", 21)
    if count > 1 and start == stop:
        errors.append(f"{loc}: start and stop are equal but count is {count}")
        return _INVALID
    if count == 1:
        return (start,)
    step = (stop - start) / (count - 1)
    return tuple(round(start + i * step, 12) for i in range(count))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _run_id(index: int, varied: Mapping[str, Any]) -> str:
    parts = [f"{index:02d}"]
    for key, value in varied.items():
        parts.append(f"{_RUN_ID_ABBREVIATIONS.get(key, key)}{_format_value(value)}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(parts))


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` in key order, the last key varying fastest.

    >>> expand_grid({"lr": [0.1, 0.2], "epochs": [1, 2]})[:3]
    [{'lr': 0.1, 'epochs': 1}, {'lr': 0.1, 'epochs': 2}, {'lr': 0.2, 'epochs': 1}]
    """
    keys = list(grid)
    return [
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))
    ]


def _sweep(raw: Any, errors: list[str], defaults: TrainConfig | None = None) -> SweepConfig | None:
    spec: dict[str, tuple[Check, Any]] = {
        "base": (lambda v, loc, errs: v, None),
        "grid": (lambda v, loc, errs: v, None),
        "runs": (lambda v, loc, errs: v, None),
    }
    values = _section(raw, "sweep", spec, errors)
    if values is None:
        return None
    base = _train_config(values.get("base"), "sweep.base", errors, defaults or TrainConfig())
    variations: list[dict[str, Any]] = []
    ok = True
    if "grid" in values and "runs" in values:
        errors.append("sweep: give either grid (a cartesian product) or runs (a list), not both")
        ok = False
    elif "grid" in values:
        grid = values["grid"]
        if not isinstance(grid, dict) or not grid:
            errors.append(f"sweep.grid: expected a non-empty mapping, got {grid!r}")
            ok = False
        else:
            checked: dict[str, tuple[Any, ...]] = {}
            for key, options in grid.items():
                loc = f"sweep.grid.{key}"
                if key not in TRAIN_FIELDS:
                    errors.append(f"{loc}: unknown hyperparameter{_suggest(key, TRAIN_FIELDS)}")
                    ok = False
                    continue
                got = _list_of(TRAIN_FIELDS[key][0], unique=True)(options, loc, errors)
                if got is _INVALID:
                    ok = False
                else:
                    checked[key] = got
            if ok:
                variations = expand_grid(checked)
    elif "runs" in values:
        runs = values["runs"]
        if not isinstance(runs, list) or not runs:
            errors.append(f"sweep.runs: expected a non-empty list of mappings, got {runs!r}")
            ok = False
        else:
            for i, entry in enumerate(runs):
                got = _section(entry, f"sweep.runs[{i}]", TRAIN_FIELDS, errors)
                if got is None or (isinstance(entry, dict) and len(got) != len(entry)):
                    ok = False
                else:
                    variations.append(got)
    else:
        variations = [{}]
    if base is None or not ok:
        return None
    runs_out = tuple(
        RunSpec(_run_id(i, varied), _replace(base, varied), dict(varied))
        for i, varied in enumerate(variations)
    )
    seen: dict[TrainConfig, int] = {}
    for i, run in enumerate(runs_out):
        if run.params in seen:
            errors.append(
                f"sweep: runs {seen[run.params]} and {i} have the same hyperparameters "
                "(they would give the same checkpoint)"
            )
            return None
        seen[run.params] = i
    return SweepConfig(base=base, runs=runs_out)


def _validate(raw: dict[str, Any], errors: list[str]) -> Recipe | None:
    """Turn the parsed YAML into a :class:`Recipe`, appending every problem to ``errors``."""
    anything: tuple[Check, Any] = (lambda v, loc, errs: v, None)
    top_spec: dict[str, tuple[Check, Any]] = {
        "name": (_str, None),
        "description": (_str, None),
        "scenario": (_choice(SCENARIOS), _REQUIRED),
        "output": (_str, _REQUIRED),
        "seeds": (_list_of(_int(0, 2**31 - 1), unique=True), None),
        "threads": (_int(1, 1024), None),
        "device": (_choice(DEVICES), None),
        "precision": (_choice(PRECISIONS), None),
        "workers": (_int(0, 256), None),
        "data": (anything[0], _REQUIRED),
        "model": anything,
        "pretrain": anything,
        "sweep": (anything[0], _REQUIRED),
        "reference": anything,
        "tune": anything,
        "resources": anything,
    }
    top = _section(raw, "", top_spec, errors)
    if top is None:
        return None
    scenario = top.get("scenario")

    data_spec: dict[str, tuple[Check, Any]] = {
        "dataset": (_choice(DATASETS), None),
        "forget_classes": (
            _list_of(_int(0, DIGITS_CLASSES - 1), unique=True),
            None,
        ),
        "forget_fraction": (_float(0.0, 1.0, open_lo=True, open_hi=True), None),
        "test_fraction": (_float(0.0, 0.9, open_lo=True), None),
        "validation_fraction": (_float(0.0, 0.9, open_lo=True), None),
        "split_seed": (_int(0, 2**31 - 1), None),
        "validation_max": (_optional(_int(1, 10_000_000)), None),
        "root": (_optional(_path), None),
        "class_names": (_optional(_path), None),
        "control": (_optional(_choice(VISION_DATASETS)), None),
        "control_class_names": (_optional(_path), None),
        "limit": (_optional(_int(1, 1_000_000_000)), None),
    }
    data_raw = raw.get("data")
    data = _section(data_raw, "data", data_spec, errors)
    if data is not None and "data" in raw:
        _check_vision_data(data, data_raw, scenario, errors)
        if data.get("dataset") in VISION_DATASETS:
            # The task-vectors protocol: 10% of the training images (at most 5,000).
            data.setdefault("validation_fraction", 0.1)
        if scenario == "class":
            if "forget_classes" not in data and "forget_classes" not in (data_raw or {}):
                errors.append("data.forget_classes: required for scenario 'class'")
            if "forget_fraction" in (data_raw or {}):
                errors.append("data.forget_fraction: only for scenario 'random'")
            if len(data.get("forget_classes", ())) >= DIGITS_CLASSES:
                errors.append(
                    "data.forget_classes: forgetting every class leaves nothing to retain"
                )
        elif scenario == "random":
            if "forget_fraction" not in data and "forget_fraction" not in (data_raw or {}):
                errors.append("data.forget_fraction: required for scenario 'random'")
            if "forget_classes" in (data_raw or {}):
                errors.append("data.forget_classes: only for scenario 'class'")
        held_out = data.get("test_fraction", 0.25) + data.get("validation_fraction", 0.15)
        if held_out >= 0.9:
            errors.append(
                f"data: test_fraction + validation_fraction = {held_out:g} leaves too little "
                "training data (keep it below 0.9)"
            )

    arch = (raw.get("model") or {}).get("arch") if isinstance(raw.get("model"), dict) else None
    model_spec: dict[str, tuple[Check, Any]] = {
        "arch": (_choice(ARCHITECTURES), None),
        "channels": (_list_of(_int(1, 4096), min_len=2), None),
        "hidden": (_int(1, 1_000_000), None),
        # CLIP weights are checked with the data folders (check_files), so that a recipe
        # can be validated on a machine that does not hold them yet.
        "pretrained": (_optional(_path if arch == "clip" else _existing_path), None),
        "name": (_str, None),
        "quick_gelu": (_bool, None),
        "finetune": (_choice(FINETUNE_MODES), None),
    }
    model = _section(raw.get("model"), "model", model_spec, errors)
    if model is not None and "channels" in model and len(model["channels"]) != 2:
        errors.append(f"model.channels: expected 2 integers, got {len(model['channels'])}")
    if model is not None and data is not None:
        _check_model(model, raw.get("model") or {}, data, scenario, errors)

    pretrain_defaults = TrainConfig(lr=0.003, epochs=30, batch_size=64, optimizer="adam")
    pretrain = _train_config(raw.get("pretrain"), "pretrain", errors, pretrain_defaults)
    sweep_defaults = None
    if scenario == "task" and data is not None:
        sweep_defaults = clip_finetune_defaults(data.get("dataset", "digits"))
    sweep = _sweep(raw["sweep"], errors, sweep_defaults) if "sweep" in raw else None

    reference_spec: dict[str, tuple[Check, Any]] = {"retrain": (_bool, None), "mia": (_bool, None)}
    reference = _section(raw.get("reference"), "reference", reference_spec, errors)

    tune_spec: dict[str, tuple[Check, Any]] = {
        "methods": (_list_of(_choice(TUNE_METHODS), unique=True), None),
        "lambdas": (_lambdas, None),
        "retain_ratio": (_float(0.0, 1.5, open_lo=True), None),
        "objective": (_choice(OBJECTIVES), None),
        "ties_density": (_float(0.0, 1.0, open_lo=True), None),
    }
    tune = _section(raw.get("tune"), "tune", tune_spec, errors)

    resources_spec: dict[str, tuple[Check, Any]] = {
        "cpus": (_ray_quantity(1024), None),
        "gpus": (_ray_quantity(64), None),
        "retries": (_int(0, 100), None),
    }
    resources = _section(raw.get("resources"), "resources", resources_spec, errors)

    if errors:
        return None
    assert data is not None and model is not None and pretrain is not None
    assert sweep is not None and reference is not None and tune is not None
    assert resources is not None
    output = _output_path(top["output"], data, model, errors)
    if output is None:
        return None
    return Recipe(
        name=top.get("name", ""),
        description=top.get("description", ""),
        scenario=scenario,
        output=output,
        seeds=top.get("seeds", (0,)),
        threads=top.get("threads", 1),
        data=DataConfig(**data),
        model=ModelConfig(**model),
        pretrain=pretrain,
        sweep=sweep,
        tune=TuneConfig(**tune),
        retrain=reference.get("retrain", scenario == "random"),
        mia=reference.get("mia", scenario == "random"),
        device=top.get("device", "auto"),
        precision=top.get("precision", "fp32"),
        workers=top.get("workers", 0),
        resources=ResourcesConfig(**resources),
        raw=raw,
    )


CLIP_EPOCHS = {
    "cars": 35, "dtd": 76, "eurosat": 12, "gtsrb": 11, "mnist": 5, "resisc45": 15,
    "sun397": 14, "svhn": 4, "imagenet": 4, "cifar10": 5,
}  # fmt: skip
"""Fine-tuning epochs per task of the task-vectors reference (Ilharco et al., ICLR 2023)."""


def clip_finetune_defaults(dataset: str) -> TrainConfig:
    """The reference fine-tuning of CLIP's image encoder on ``dataset`` (task negation).

    AdamW, lr 1e-5, weight decay 0.1, batch 128, 500 warm-up steps then cosine, and the
    reference's epoch count for the task; a recipe's ``sweep.base`` overrides any of it.
    """
    return TrainConfig(
        lr=1e-5, epochs=CLIP_EPOCHS.get(dataset, 5), batch_size=128, optimizer="adamw",
        weight_decay=0.1, schedule="cosine", warmup_steps=500,
    )  # fmt: skip


def _output_path(
    text: str, data: dict[str, Any], model: dict[str, Any], errors: list[str]
) -> Path | None:
    """The output folder, with ``{dataset}``, ``{arch}``, ``{model}`` and ``{finetune}``
    filled in (so that ``--set data.dataset=dtd`` writes next to, not over, eurosat)."""
    fill = {
        "dataset": data.get("dataset", "digits"),
        "arch": model.get("arch", "small_cnn"),
        "model": model.get("name", "ViT-B-32"),
        "finetune": model.get("finetune", "full"),
    }
    try:
        text = text.format(**fill)
    except (KeyError, IndexError, ValueError) as exc:
        errors.append(
            f"output: cannot fill in {text!r} ({exc}); the placeholders are "
            + ", ".join("{" + k + "}" for k in fill)
        )
        return None
    return Path(os.path.expanduser(text))


def _check_vision_data(
    data: dict[str, Any], data_raw: Any, scenario: Any, errors: list[str]
) -> None:
    """Cross-field rules of the image datasets and of task negation."""
    given = data_raw if isinstance(data_raw, dict) else {}
    dataset = data.get("dataset", "digits")
    if dataset in VISION_DATASETS and "root" not in given:
        errors.append(
            f"data.root: required for dataset {dataset!r} (the folder that holds "
            f"{dataset}/ and the other datasets)"
        )
    if dataset == "digits":
        for key in ("root", "class_names", "control", "control_class_names", "limit"):
            if key in given:
                errors.append(f"data.{key}: only for the image datasets, not digits")
    if scenario == "task":
        for key in ("forget_classes", "forget_fraction"):
            if key in given:
                errors.append(f"data.{key}: not for scenario 'task' (the whole task is forgotten)")
        if dataset == "digits":
            errors.append("data.dataset: scenario 'task' needs an image dataset, not digits")
        if data.get("control", "imagenet") == dataset:
            errors.append(f"data.control: the control task must differ from {dataset!r}")
    elif "control" in given or "control_class_names" in given:
        errors.append("data.control: only for scenario 'task'")


def _check_model(
    model: dict[str, Any], model_raw: Any, data: dict[str, Any], scenario: Any, errors: list[str]
) -> None:
    """Which architecture goes with which data and scenario; CLIP needs its weights."""
    given = model_raw if isinstance(model_raw, dict) else {}
    arch = model.get("arch", "small_cnn")
    dataset = data.get("dataset", "digits")
    if arch == "clip":
        if scenario != "task":
            errors.append("model.arch: clip is for scenario 'task' (task negation)")
        if "pretrained" not in given or model.get("pretrained") is None:
            errors.append(
                "model.pretrained: required for arch clip (the open_clip weights file, e.g. "
                "the OpenAI ViT-B-32 checkpoint; nothing is downloaded)"
            )
        for key in ("channels", "hidden"):
            if key in given:
                errors.append(f"model.{key}: only for arch small_cnn")
    else:
        for key in ("name", "quick_gelu", "finetune"):
            if key in given:
                errors.append(f"model.{key}: only for arch clip")
        if scenario == "task":
            errors.append("model.arch: scenario 'task' needs arch clip (a zero-shot head)")
        if arch == "small_cnn" and dataset != "digits":
            errors.append(f"model.arch: small_cnn reads 8x8 digits; use resnet18 for {dataset}")
        if arch == "resnet18" and dataset == "digits":
            errors.append("model.arch: resnet18 is for the image datasets (e.g. cifar10)")
        if arch == "resnet18" and ("channels" in given or "hidden" in given):
            errors.append("model.channels: only for arch small_cnn")


def check_files(recipe: Recipe) -> list[str]:
    """What a recipe needs on disk that is missing: data folders, CLIP weights, name files.

    Each problem names the recipe key, the path and what to put there. Empty when the
    recipe can run. Digits needs nothing (scikit-learn ships it).
    """
    problems: list[str] = []
    data, model = recipe.data, recipe.model
    if data.dataset in VISION_DATASETS and data.root is not None:
        names = [("data.root", data.dataset)]
        if recipe.scenario == "task":
            names.append(("data.control", data.control or "imagenet"))
        for key, name in names:
            folder = data.root / name
            if not folder.is_dir():
                problems.append(
                    f"{key}: no {name} data: the folder {folder} does not exist; put {name} "
                    f"there ({DATA_LAYOUT_HINT})"
                )
    for key, path in (
        ("data.class_names", data.class_names),
        ("data.control_class_names", data.control_class_names),
    ):
        if path is not None and not path.is_file():
            problems.append(f"{key}: file not found: {path} (one class name per line)")
    if model.arch == "clip" and model.pretrained is not None:
        path = model.pretrained
        if not path.exists():
            problems.append(
                f"model.pretrained: no open_clip weights at {path}; put the {model.name} "
                "weights file there (e.g. OpenAI's ViT-B-32.pt or an open_clip "
                "open_clip_pytorch_model.bin), or point it at a folder holding one; nothing "
                "is downloaded"
            )
    return problems


DATA_LAYOUT_HINT = (
    "either image folders train/<class>/*.png and test/<class>/*.png, or the files of the "
    "torchvision dataset class, which is read with download=False"
)


# --------------------------------------------------------------------------- overrides


def apply_overrides(raw: Any, overrides: Sequence[str]) -> tuple[Any, list[str]]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a copy of ``raw``.

    Returns the new mapping and the problems found (a malformed override, a path through
    something that is not a mapping). Unknown keys are left for validation to report.

    >>> apply_overrides({"tune": {"retain_ratio": 0.95}}, ["tune.retain_ratio=0.9"])[0]
    {'tune': {'retain_ratio': 0.9}}
    """
    import copy

    out = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    errors: list[str] = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"--set {text!r}: expected key.sub=value")
            continue
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError as exc:
            errors.append(f"--set {text!r}: the value is not valid YAML ({_first_line(exc)})")
            continue
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                errors.append(f"--set {text!r}: {where} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out, errors


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------- line numbers


def _line_index(text: str) -> dict[str, int]:
    """Map each key path (``sweep.grid.lr[1]``) to its 1-based line in the YAML text."""
    index: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node: yaml.Node, loc: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = _join(loc, key_node.value)
                index[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{loc}[{i}]"
                index[child] = item.start_mark.line + 1
                walk(item, child)

    if root is not None:
        walk(root, "")
    return index


def _with_lines(errors: list[str], lines: Mapping[str, int]) -> list[str]:
    out = []
    for problem in errors:
        loc, sep, rest = problem.partition(": ")
        # The longest known prefix of the location: ``sweep.grid.lr[1]`` then ``sweep.grid.lr``.
        probe = loc
        while probe and probe not in lines:
            shorter = re.sub(r"(\[\d+\]|\.[^.\[]*|^[^.\[]+)$", "", probe)
            probe = "" if shorter == probe else shorter
        if sep and probe:
            out.append(f"{loc} (line {lines[probe]}): {rest}")
        else:
            out.append(problem)
    return out


# --------------------------------------------------------------------------- loading


def bundled_recipes() -> dict[str, str]:
    """Names of the recipes shipped with negmerge, mapped to their YAML text."""
    texts: dict[str, str] = {}
    try:
        from importlib.resources import files

        root = files(BUNDLED_PACKAGE)
        for entry in root.iterdir():
            if entry.name.endswith(".yaml"):
                texts[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    if not texts:
        # Running from a source tree that is not installed: recipes/ sits next to the package.
        source = Path(__file__).resolve().parent.parent / "recipes"
        if source.is_dir():
            for path in source.glob("*.yaml"):
                texts[path.stem] = path.read_text(encoding="utf-8")
    return dict(sorted(texts.items()))


def recipe_summary(text: str) -> str:
    """The first line of a recipe's header comment (what it does)."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            summary = stripped.lstrip("#").strip()
            if summary:
                return summary
        elif stripped:
            break
    return ""


def read_recipe_text(path_or_name: str | os.PathLike[str]) -> tuple[str, str]:
    """Find a recipe by path or bundled name; returns ``(text, source)``."""
    path = Path(os.path.expanduser(str(path_or_name)))
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the recipe: {exc}", source=str(path)) from None
    bundled = bundled_recipes()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(path_or_name) == name and name in bundled:
        return bundled[name], f"bundled:{name}"
    choices = ", ".join(bundled) or "(none found)"
    raise ConfigError(
        f"no recipe file or bundled recipe named {str(path_or_name)!r}; bundled recipes: {choices}"
    )


def parse_recipe(
    text: str, source: str = "<recipe>", overrides: Sequence[str] = (), name: str = ""
) -> Recipe:
    """Validate recipe YAML text (with overrides); raises ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise ConfigError(f"not valid YAML{where}: {problem}", source=source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping at the top, got {_type_name(raw)}", source=source)
    raw, errors = apply_overrides(raw, overrides)
    recipe = _validate(raw, errors)
    if errors or recipe is None:
        raise ConfigError(_with_lines(errors, _line_index(text)), source=source)
    from dataclasses import replace

    return replace(recipe, name=recipe.name or name, source=source, overrides=tuple(overrides))


def load_recipe(path_or_name: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file or a bundled recipe by name (``digits``).

    ``overrides`` are ``key.sub=value`` strings, as given to ``--set``. Every problem in
    the file is reported at once in one :class:`ConfigError`.
    """
    text, source = read_recipe_text(path_or_name)
    stem = Path(str(path_or_name)).name
    stem = stem[: -len(".yaml")] if stem.endswith(".yaml") else stem
    return parse_recipe(text, source=source, overrides=overrides, name=stem)


def describe(recipe: Recipe) -> str:
    """A few lines saying what a recipe will do (for ``recipes validate``)."""
    if recipe.scenario == "class":
        forget = f"classes {', '.join(map(str, recipe.data.forget_classes))}"
    elif recipe.scenario == "task":
        forget = f"task {recipe.data.dataset} (control {recipe.data.control or 'imagenet'})"
    else:
        forget = f"a random {recipe.data.forget_fraction:.0%} of the training data"
    pre = (
        f"from {recipe.model.pretrained}"
        if recipe.model.pretrained
        else f"pre-trained for {recipe.pretrain.epochs} epochs"
    )
    if recipe.model.arch == "clip":
        pre = f"{recipe.model.name} ({recipe.model.finetune} fine-tuning) {pre}"
    lams = recipe.tune.lambdas
    kept = "control" if recipe.scenario == "task" else "retain"
    return "\n".join(
        [
            f"recipe {recipe.name!r} ({recipe.source}): {recipe.scenario} forgetting of {forget}",
            f"  model: {recipe.model.arch} {pre}",
            f"  sweep: {len(recipe.sweep.runs)} fine-tunes x {len(recipe.seeds)} seed(s) "
            f"{list(recipe.seeds)}",
            f"  tune: {', '.join(recipe.tune.methods)}; {len(lams)} lambdas in "
            f"[{min(lams):g}, {max(lams):g}]; {kept} >= {recipe.tune.retain_ratio:g} x pre-trained",
            f"  output: {recipe.output}",
        ]
    )
