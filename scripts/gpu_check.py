"""Time the CLIP pipeline's hot paths on one GPU, offline: a table, in well under 5 minutes.

Builds ViT-B-32 through open_clip with random weights (no download), synthetic images
and labels, and times: building a zero-shot head (text tower), a few full fine-tuning
steps and a few linearized (jvp) steps at batch 128 with bf16 autocast, an evaluation
pass over cached uint8 images, and a NegMerge merge of 8 image-encoder checkpoints on
the device through the merge engine. ``--device cpu --tiny`` runs the same code on a
2-layer model in seconds, to check the script itself without a GPU.

    python scripts/gpu_check.py                     # on the GPU machine
    python scripts/gpu_check.py --device cpu --tiny # dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (dry run)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed fine-tuning steps")
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)

    import open_clip
    import torch

    from negmerge_cli import merge
    from negmerge_cli.evaluate.templates import GENERIC
    from negmerge_cli.io import save_state_dict
    from negmerge_cli.recipes import TrainConfig
    from negmerge_cli.train.clip import (
        ImageClassifier,
        Normalizer,
        build_head,
        encoder_state,
        finetune_encoder,
        image_size,
        image_stats,
    )
    from negmerge_cli.train.linearize import LinearizedModel
    from negmerge_cli.train.loop import autocast

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (use --device cpu --tiny for a dry run)")
        return 2
    device = torch.device(args.device)
    name = args.model
    if args.tiny:
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        (folder / "gpu-check-tiny.json").write_text(json.dumps(TINY))
        open_clip.add_model_config(folder / "gpu-check-tiny.json")
        name = "gpu-check-tiny"
        args.batch = min(args.batch, 8)
        args.steps = min(args.steps, 3)
        args.eval_images = min(args.eval_images, 64)
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    rows: list[tuple[str, float, str]] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(label: str, fn, unit: str = "") -> float:  # type: ignore[no-untyped-def]
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - start
        rows.append((label, seconds, unit.format(s=seconds, out=out) if unit else ""))
        return seconds

    start_all = time.perf_counter()
    model = None

    def build():  # type: ignore[no-untyped-def]
        nonlocal model
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).float()
        model = model.to(device).eval()
        return sum(p.numel() for p in model.parameters())

    timed(f"build {name} (random weights)", build, "{out:,} parameters")
    assert model is not None
    size = image_size(model)
    mean, std = image_stats(model)
    classes = [f"class {i}" for i in range(10)]
    head = None

    def make_head():  # type: ignore[no-untyped-def]
        nonlocal head
        head = build_head(model, classes, GENERIC, device, name).to(device)

    timed(f"zero-shot head ({len(classes)} classes x {len(GENERIC)} templates)", make_head)
    assert head is not None
    normalizer = Normalizer(mean, std, device)
    count = args.batch * (args.steps + 1)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, len(classes), (count,))
    dataset = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, pin_memory=device.type == "cuda"
    )
    params = TrainConfig(lr=1e-5, epochs=1, batch_size=args.batch, optimizer="adamw",
                         weight_decay=0.1, schedule="cosine", warmup_steps=500)  # fmt: skip
    base = encoder_state(model.visual)
    encoder = model.visual
    precision = "bf16" if device.type == "cuda" else "fp32"
    steps = len(loader)
    # The first step pays for kernel selection; each timed pass is a full epoch of steps.
    seconds = timed(
        f"fine-tune: {steps} steps, batch {args.batch}, {precision}",
        lambda: finetune_encoder(encoder, head, loader, params, normalizer, precision),
    )
    rows[-1] = (*rows[-1][:2], f"{steps * args.batch / seconds:,.1f} images/s")
    tuned = encoder_state(encoder)
    encoder.load_state_dict(base)
    linear = LinearizedModel(encoder)
    small = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(min(count, args.batch * 3))),
        batch_size=args.batch, pin_memory=device.type == "cuda",
    )  # fmt: skip
    seconds = timed(
        f"linearized fine-tune: {len(small)} steps (jvp)",
        lambda: finetune_encoder(linear, head, small, params, normalizer, precision),
    )
    rows[-1] = (*rows[-1][:2], f"{len(small) * args.batch / seconds:,.1f} images/s")
    encoder.load_state_dict(base)

    cached = torch.randint(0, 256, (args.eval_images, 3, size, size), dtype=torch.uint8)
    cached = cached.to(device)
    cached_labels = torch.randint(0, len(classes), (args.eval_images,), device=device)
    classifier = ImageClassifier(encoder, head).eval()

    @torch.no_grad()
    def evaluate() -> float:
        correct = torch.zeros((), dtype=torch.long, device=device)
        for first in range(0, args.eval_images, 256):
            with autocast(device, precision):
                logits = classifier(normalizer(cached[first : first + 256]))
            correct += (logits.argmax(-1) == cached_labels[first : first + 256]).sum()
        return int(correct) / args.eval_images

    evaluate()  # warm-up
    seconds = timed(f"eval pass: {args.eval_images} cached images", evaluate)
    rows[-1] = (*rows[-1][:2], f"{args.eval_images / seconds:,.1f} images/s")

    with tempfile.TemporaryDirectory(prefix="gpu-check-merge-") as temp:
        folder = Path(temp)
        save_state_dict(base, folder / "base.safetensors")
        runs = []
        generator = torch.Generator().manual_seed(1)
        delta = {k: tuned[k] - base[k] for k in base}
        for i in range(args.checkpoints):
            state = {
                k: v
                + delta[k] * (0.5 + torch.rand((), generator=generator))
                + 1e-4 * torch.randn(v.shape, generator=generator)
                for k, v in base.items()
            }
            save_state_dict(state, folder / f"run{i}.safetensors")
            runs.append(folder / f"run{i}.safetensors")
        merge_device = "cuda" if device.type == "cuda" else "cpu"
        seconds = timed(
            f"NegMerge of {args.checkpoints} checkpoints on {merge_device}",
            lambda: merge(folder / "base.safetensors", runs, folder / "out.safetensors",
                          method="negmerge", device=merge_device, quiet=True),
        )  # fmt: skip
        total_bytes = sum(v.numel() * v.element_size() for v in base.values())
        rate = total_bytes * (args.checkpoints + 2) / seconds / 1e9  # read n + 1, write 1
        rows[-1] = (*rows[-1][:2], f"{rate:.2f} GB/s")

    total = time.perf_counter() - start_all
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = f"torch {torch.__version__}, open_clip {open_clip.__version__}"
    print(f"gpu_check: {name} on {gpu}, {versions}")
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  rate")
    for label, seconds, note in rows:
        print(f"{label:<{width}}  {seconds:>8.2f}  {note}")
    print(f"{'total':<{width}}  {total:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "total": total, "device": gpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
