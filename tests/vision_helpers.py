"""Tiny stand-ins for the paper's settings: an open_clip config, image folders, weights.

Nothing here downloads: the CLIP model is a 2-layer ViT of width 32 with a 2-layer text
tower registered under :data:`TINY_CLIP`, its "pre-trained" weights are a random
initialisation saved to a file, and the datasets are a few generated PNGs per class whose
colour depends on the class (so a few steps of training do learn them).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TINY_CLIP = "negmerge-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_registered = False


def register_tiny_clip() -> str:
    """Register the tiny config with open_clip once per process; returns its name."""
    global _registered
    if not _registered:
        import open_clip

        folder = Path(tempfile.mkdtemp(prefix="negmerge-tiny-clip-"))
        path = folder / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
        _registered = True
    return TINY_CLIP


def save_tiny_clip_weights(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny CLIP saved as open_clip would read a checkpoint."""
    import logging

    import open_clip

    from negmerge_cli.io import save_state_dict

    register_tiny_clip()
    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 230), (230, 220, 30), (200, 40, 220)]


def write_images(
    folder: Path, classes: Sequence[str], per_class: int, size: int = 32, seed: int = 0
) -> None:
    """``folder/<class>/<i>.png``: noisy images whose colour is the class's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        colour = np.array(COLOURS[label % len(COLOURS)], dtype=np.float64)
        for i in range(per_class):
            noise = rng.normal(0, 25, (size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")


def write_dataset(
    root: Path,
    name: str,
    classes: Sequence[str],
    train_per_class: int = 6,
    test_per_class: int = 3,
    size: int = 32,
    test_folder: str = "test",
) -> Path:
    """``root/name/{train,test}/<class>/*.png`` in the image-folder layout."""
    write_images(root / name / "train", classes, train_per_class, size, seed=1)
    write_images(root / name / test_folder, classes, test_per_class, size, seed=2)
    return root / name
