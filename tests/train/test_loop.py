"""The training loop: reproducible in its seed; augmentations do what they say."""

from __future__ import annotations

import torch

from negmerge_cli.recipes import ModelConfig, TrainConfig
from negmerge_cli.train.loop import augment, random_shift, train_model
from negmerge_cli.train.models import SmallCNN, build_model


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(seed: int, params: TrainConfig) -> dict[str, torch.Tensor]:
    x, y = _data()
    model = build_model(ModelConfig(), seed=1)
    train_model(model, x, y, params, seed)
    return model.state_dict()


def test_the_same_seed_gives_the_same_weights_bit_for_bit():
    params = TrainConfig(lr=0.05, epochs=2, batch_size=16, augment="shift+noise")
    a, b = _train(7, params), _train(7, params)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _train(8, params)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_fits_a_small_set_and_reports_its_metrics():
    x, y = _data(32)
    model = build_model(ModelConfig(), seed=0)
    seen = []
    result = train_model(
        model, x, y, TrainConfig(lr=0.01, epochs=40, optimizer="adam", batch_size=8), 0,
        progress=lambda epoch, epochs, loss: seen.append((epoch, epochs)),
    )  # fmt: skip
    assert result.accuracy == 1.0
    assert result.loss < 0.1
    assert seen[0] == (1, 40) and seen[-1] == (40, 40)


def test_the_model_has_the_documented_shape():
    model = SmallCNN((16, 32), 64)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    params = sum(p.numel() for p in model.parameters())
    assert params == (16 * 9 + 16) + (32 * 16 * 9 + 32) + (512 * 64 + 64) + (64 * 10 + 10)


def test_random_shift_moves_each_image_by_at_most_one_pixel_filling_zeros():
    x = torch.zeros(200, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0
    shifted = random_shift(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    positions = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 8, positions % 8
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {3, 4, 5}
    assert torch.all(shifted.sum((1, 2, 3)) == 1.0)  # the pixel moved, nothing else appeared
    # A pixel on the border falls off when shifted outwards.
    edge = torch.zeros(50, 1, 8, 8)
    edge[:, 0, 0, 0] = 1.0
    sums = random_shift(edge, torch.Generator().manual_seed(1)).sum((1, 2, 3))
    assert set(sums.tolist()) == {0.0, 1.0}


def test_augment_none_is_the_identity_and_noise_stays_in_range():
    x, _ = _data(16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, "none", g, 0.1), x)
    noisy = augment(x, "noise", g, 0.5)
    assert not torch.equal(noisy, x)
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0
