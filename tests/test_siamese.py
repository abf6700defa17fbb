"""Siamese networks (Koch et al. 2015): the weighted-L1 head against hand-computed scores, the affine distortions,
the 105x105 tower, real learning on real Omniglot, fewshot-eval (test split and Lake's runs), one-line errors."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import group_choices
from fewshot import engine
from fewshot.algorithms.siamese import Siamese, affine_params, affine_theta, distort
from fewshot.data.base import Episode
from fewshot.eval import run as eval_run
from fewshot.models.koch import Koch
from fewshot.train import run as train_run

BIN = Path(sys.executable).parent


class _Identity(torch.nn.Module):
    """A 'backbone' whose embedding is its flattened input, so tests choose the embeddings exactly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _identity_siamese(dim: int = 3, **kwargs) -> Siamese:
    return Siamese(lambda out_features=None: _Identity(dim), ways=2, **kwargs)


# ---- (1) the distance head and the prediction, by hand --------------------------------------------------------


def test_pair_score_equals_hand_computed_weighted_l1():
    algo = _identity_siamese(augment=False)
    with torch.no_grad():
        algo.head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        algo.head.bias.fill_(0.25)
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([0.0, 4.0, -1.0])
    # |a - b| = (1, 2, 4): 1*1 - 2*2 + 0.5*4 + 0.25 = -0.75
    logit = algo.pair_logits(b.view(1, 1, 3), a.view(1, 1, 3))
    assert logit.item() == pytest.approx(-0.75, abs=1e-6)
    assert logit.sigmoid().item() == pytest.approx(1 / (1 + math.exp(0.75)), abs=1e-6)


def test_one_shot_prediction_and_balanced_loss_by_hand():
    algo = _identity_siamese(dim=1, augment=False)
    with torch.no_grad():
        algo.head.weight.fill_(-1.0)  # score = sigmoid(1 - |q - s|): nearer is more similar
        algo.head.bias.fill_(1.0)
    # Three classes, support embeddings 0, 10, 20; queries 1 (class 0), 7 (class 1) and 4 (class 1, but nearer 0).
    episode = Episode(
        support_x=torch.tensor([0.0, 10.0, 20.0]).view(1, 3, 1, 1, 1),
        support_y=torch.tensor([[0, 1, 2]]),
        query_x=torch.tensor([1.0, 7.0, 4.0]).view(1, 3, 1, 1, 1),
        query_y=torch.tensor([[0, 1, 1]]),
        ways=3,
    )
    out = algo(episode, train=False)
    assert out.acc.tolist() == pytest.approx([2 / 3])

    # Pair logits 1 - |q - s|: q=1: (0, -8, -18); q=7: (-6, -2, -12); q=4: (-3, -5, -15).
    def bce(z, y):
        return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))

    same = [bce(0, 1), bce(-2, 1), bce(-5, 1)]  # 3 same pairs, 6 different ones: each half weighs 0.5
    diff = [bce(z, 0) for z in (-8, -18, -6, -12, -3, -15)]
    assert out.loss.item() == pytest.approx(0.5 * sum(same) / 3 + 0.5 * sum(diff) / 6, rel=1e-5)


def test_k_shot_class_score_is_the_mean_pair_probability():
    logits = torch.tensor([[[2.0, -1.0, 0.0, 3.0]]])  # one query, 4 support items: classes 0, 0, 1, 1
    scores = Siamese.class_scores(logits, torch.tensor([[0, 0, 1, 1]]), ways=2)
    p = logits.sigmoid()[0, 0]
    torch.testing.assert_close(scores[0, 0], torch.stack([(p[0] + p[1]) / 2, (p[2] + p[3]) / 2]))


# ---- (2) the affine distortions ---------------------------------------------------------------------------


def test_distortion_parameters_stay_in_the_paper_ranges():
    g = torch.Generator().manual_seed(0)
    params = affine_params(20000, rotation=10, shear=0.3, scale=0.2, shift=2, p=0.5, generator=g)
    theta, rx, ry, sx, sy, tx, ty = params.unbind(-1)
    assert theta.abs().max() <= 10 and rx.abs().max() <= 0.3 and ry.abs().max() <= 0.3
    assert sx.min() >= 0.8 and sx.max() <= 1.2 and sy.min() >= 0.8 and sy.max() <= 1.2
    assert tx.abs().max() <= 2 and ty.abs().max() <= 2
    # Each of the seven components is drawn with probability 0.5, independently, else the identity's value.
    active = params != torch.tensor([0.0, 0, 0, 1, 1, 0, 0])
    assert torch.allclose(active.float().mean(0), torch.full((7,), 0.5), atol=0.02)
    assert abs((active[:, 0] & active[:, 5]).float().mean().item() - 0.25) < 0.02
    # The drawn ones fill their ranges (uniform): not stuck at the identity or at the ends.
    assert theta[active[:, 0]].abs().mean().item() == pytest.approx(5, abs=0.3)


def test_known_distortions_move_pixels_as_stated():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    identity = torch.tensor([[0.0, 0, 0, 1, 1, 0, 0]])
    torch.testing.assert_close(distort(image, identity), image, atol=1e-6, rtol=0)
    # t = (+1, +2) px: the content moves right by one pixel and down by two.
    moved = distort(image, torch.tensor([[0.0, 0, 0, 1, 1, 1, 2]]))
    assert moved[0, 0, 6, 5].item() == pytest.approx(1.0, abs=1e-5) and moved.sum().item() == pytest.approx(1.0)
    # 90 degrees (beyond the paper's range, to check the direction exactly): x -> -y, y -> x about the centre.
    image[0, 0, 4, 4], image[0, 0, 4, 6] = 0.0, 1.0  # two pixels right of the centre
    turned = distort(image, torch.tensor([[90.0, 0, 0, 1, 1, 0, 0]]))
    assert turned[0, 0, 6, 4].item() == pytest.approx(1.0, abs=1e-5)
    # Scale 2 about the centre (again beyond the range): a pixel 1 right of the centre lands 2 right.
    image[0, 0, 4, 6], image[0, 0, 4, 5] = 0.0, 1.0
    assert distort(image, torch.tensor([[0.0, 0, 0, 2, 2, 0, 0]]))[0, 0, 4, 6].item() == pytest.approx(1.0)
    # affine_grid's matrix is the inverse map: for a pure shift, minus the shift in units of 2 / size.
    torch.testing.assert_close(
        affine_theta(torch.tensor([[0.0, 0, 0, 1, 1, 7, 0]]), 28)[0, :, 2], torch.tensor([-0.5, 0])
    )


def test_augmentation_only_in_training_and_shapes_kept(monkeypatch):
    import fewshot.algorithms.siamese as module

    seen = []

    def recording_embed(net, support_x, query_x):
        seen.append((support_x, query_x))
        return support_x.flatten(2), query_x.flatten(2)

    monkeypatch.setattr(module, "embed_tasks", recording_embed)
    torch.manual_seed(0)
    x = torch.rand(2, 6, 1, 28, 28)
    y = torch.arange(3).repeat(2).view(1, 6).expand(2, 6)
    episode = Episode(support_x=x[:, :3], support_y=y[:, :3], query_x=x[:, 3:], query_y=y[:, 3:], ways=3)
    for augment, train, changed in ((True, True, True), (True, False, False), (False, True, False)):
        seen.clear()
        _identity_siamese(dim=28 * 28, augment=augment)(episode, train=train)
        ((support, query),) = seen
        assert support.shape == (2, 3, 1, 28, 28) and query.shape == (2, 3, 1, 28, 28)
        for fed, original in ((support, x[:, :3]), (query, x[:, 3:])):
            assert (not torch.equal(fed, original)) == changed, (augment, train)
    # With every component drawn (augment_p=1) each image gets its own distortion.
    seen.clear()
    _identity_siamese(dim=28 * 28, augment_p=1.0)(episode, train=True)
    support = seen[0][0].flatten(0, 1)
    assert all(not torch.allclose(support[i], support[j]) for i in range(6) for j in range(i))


# ---- the 105x105 tower ------------------------------------------------------------------------------------


def test_koch_tower_matches_the_paper():
    algo = Siamese(partial(Koch, in_channels=1, image_size=105), ways=20)
    assert sum(p.numel() for p in algo.parameters()) == 38_951_745  # the paper's count, Section 3.1
    net = algo.net
    assert [m.kernel_size for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [
        (10, 10),
        (7, 7),
        (4, 4),
        (4, 4),
    ]
    assert net.fc[0].in_features == 256 * 6 * 6
    out = Koch(image_size=105, hidden=4, features=32)(torch.rand(2, 1, 105, 105))
    assert out.shape == (2, 32) and 0 < out.min() and out.max() < 1  # sigmoid features
    with pytest.raises(ValueError, match="image_size=28 is too small"):
        Koch(image_size=28)


# ---- (3) + (4) real learning on real Omniglot, then fewshot-eval -----------------------------------------------


@pytest.mark.slow
@pytest.mark.omniglot
def test_siamese_learns_omniglot_and_evaluates(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28):
    common = [
        "algo=siamese",
        "device=cpu",
        f"data_root={omniglot_root.parent}",
        f"cache_dir={omniglot_cache_dir}",
        "trainer.meta_batch_size=4",
        "trainer.val_episodes=20",
        "eval.episodes=300",
        "episode.queries=5",
    ]
    # Untrained: one iteration at a learning rate too small to move the weights, then the same 300 test tasks.
    before = train_run(
        compose_cfg("train", [*common, "trainer.iterations=1", "trainer.val_every=1", "trainer.meta_lr=1e-12"]),
        tmp_path / "untrained",
    )["test"]["acc_mean"]
    cfg = compose_cfg("train", [*common, "trainer.iterations=500", "trainer.val_every=500", "trainer.meta_lr=0.003"])
    trained = train_run(cfg, tmp_path / "trained")
    after = trained["test"]["acc_mean"]
    print(f"siamese 5-way 1-shot, Omniglot test: untrained {before:.3f}, 500 iterations {after:.3f}, chance 0.2")
    assert after > 0.7 and after > before + 0.3, (before, after)

    # fewshot-eval of the checkpoint: the same seed and tasks give the same number as the run's own test.
    best = tmp_path / "trained" / "checkpoints" / "best.pt"
    where = [f"data_root={omniglot_root.parent}", f"cache_dir={omniglot_cache_dir}", "device=cpu"]
    ev = eval_run(compose_cfg("eval", [f"checkpoint={best}", *where]), tmp_path / "eval")
    assert ev["test"]["acc_mean"] == pytest.approx(after, abs=1e-9)

    # Lake's 20 runs are 20-way: the same forward call answers them (no fixed head).
    def lake_error(run: str) -> float:
        best = tmp_path / run / "checkpoints" / "best.pt"
        cfg = compose_cfg("eval", [f"checkpoint={best}", "benchmark=lake_runs", *where])
        lake = eval_run(cfg, tmp_path / f"lake_{run}")
        assert len(lake["lake"]["error_per_run"]) == 20 and lake["test"]["episodes"] == 20
        return lake["lake"]["mean_error"]

    untrained, error = lake_error("untrained"), lake_error("trained")
    print(f"Lake's 20 runs (20-way 1-shot), mean error: untrained {untrained:.1f}%, trained {error:.1f}%, chance 95%")
    assert error < untrained - 10, (untrained, error)


# ---- (5) bad settings, presets ----------------------------------------------------------------------------

BAD = [
    (["algo.scale=1.5"], r"algo=siamese: Siamese scale=1.5: .* must be in \[0, 1\)"),
    (["algo.augment_p=2"], r"algo=siamese: Siamese augment_p=2(\.0)?: a probability"),
    (["algo.rotation=-5"], r"algo=siamese: Siamese rotation=-5(\.0)?: must be a finite number >= 0"),
    (["backbone=koch"], r"algo=siamese: Koch tower: image_size=28 is too small \(the paper uses 105\)"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_settings_are_one_clear_error(compose_cfg, overrides, message):
    with pytest.raises(engine.ConfigError, match=message):
        engine.build(compose_cfg("train", ["algo=siamese", "dataset=synthetic", "device=cpu", *overrides]))


def test_bad_setting_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [str(BIN / "fewshot-train"), "algo=siamese", "dataset=synthetic", "device=cpu", "algo.augment_p=-0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "no CUDA device" not in ln]
    assert lines == ["fewshot-train: error: algo=siamese: Siamese augment_p=-0.1: a probability, must be in [0, 1]"]


SIAMESE_PRESETS = [p for p in group_choices("experiment") if p.startswith("siamese_")]


def test_siamese_presets():
    cells = {f"siamese_omniglot_{w}w{k}s" for w in (5, 20) for k in (1, 5)}
    assert set(SIAMESE_PRESETS) == cells | {"siamese_omniglot_lake_20w1s"}


@pytest.mark.parametrize("preset", SIAMESE_PRESETS)
def test_siamese_preset_protocol(compose_cfg, preset):
    cfg = compose_cfg("train", [f"experiment={preset}"])
    assert cfg.name == preset and cfg.algo.name == "siamese" and cfg.algo.augment
    assert cfg.dataset.split == ("background" if "lake" in preset else "vinyals") and cfg.paper.acc is not None
    if "lake" in preset:
        assert (cfg.backbone.name, cfg.dataset.image_size, cfg.episode.ways, cfg.episode.shots) == ("koch", 105, 20, 1)
        assert cfg.paper.acc == 92.0 and "lake_runs" in cfg.paper.source
    else:
        assert (cfg.backbone.name, cfg.backbone.hidden, cfg.dataset.image_size) == ("conv4_pool", 64, 28)
        assert "Vinyals" in cfg.paper.source
