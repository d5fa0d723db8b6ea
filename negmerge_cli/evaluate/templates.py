"""Prompt templates for the zero-shot heads: a generic set plus a few per dataset.

Each template has one ``{}`` for the class name. The zero-shot head of a dataset averages
the normalised text embeddings of all its templates per class, so a handful of varied
phrasings is enough; these lists are short on purpose and written for negmerge.
"""

from __future__ import annotations

GENERIC = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
    "a blurry photo of a {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of the {}.",
)

PER_DATASET: dict[str, tuple[str, ...]] = {
    "cars": (
        "a photo of a {}, a type of car.",
        "a photo of the {}, a car.",
        "a picture of my {}.",
        "a photo of a {} on the road.",
        "a side view of a {}.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a close-up of a {} surface.",
        "a {} texture.",
        "something with a {} look.",
    ),
    "eurosat": (
        "a satellite photo of {}.",
        "an aerial view of {}.",
        "a centered satellite image of {}.",
        "land use seen from above: {}.",
    ),
    "gtsrb": (
        'a photo of the traffic sign "{}".',
        'a road sign meaning "{}".',
        'a zoomed in photo of a "{}" traffic sign.',
        'a blurry photo of the "{}" sign.',
    ),
    "mnist": (
        'a photo of the number "{}".',
        'an image of the handwritten digit "{}".',
        'the digit "{}" written by hand.',
    ),
    "resisc45": (
        "a satellite image of {}.",
        "an aerial photo of the {}.",
        "remote sensing imagery of {}.",
        "a top-down view of a {}.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}, a kind of place.",
        "a scene showing a {}.",
        "inside or outside a {}.",
    ),
    "svhn": (
        'a photo of the number "{}".',
        'a house number sign showing "{}".',
        'a street number "{}" in a photo.',
    ),
    "cifar10": (
        "a small photo of a {}.",
        "a tiny picture of the {}.",
        "a pixelated photo of a {}.",
    ),
    "imagenet": GENERIC,
}


def templates_for(dataset: str) -> tuple[str, ...]:
    """The dataset's own templates, or the generic set for a dataset without any."""
    return PER_DATASET.get(dataset, GENERIC)
