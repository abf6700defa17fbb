"""device.channels_last: convolution weights in NHWC where it was measured faster (scripts/bench_channels_last.py),
the same numbers to float rounding, and runs that resume and re-test across the two layouts."""

from __future__ import annotations

import pytest
import torch

from conftest import straight_and_resumed
from fewshot import engine
from fewshot.checkpoint import load_checkpoint
from fewshot.eval import run as eval_run
from fewshot.train import run as train_run
from test_engine import TINY


def nhwc(algo: torch.nn.Module) -> bool:
    """Whether the backbone's second convolution (16 -> 16 channels: NHWC and NCHW strides differ) is NHWC."""
    convs = [m for m in algo.modules() if isinstance(m, torch.nn.Conv2d)]
    w = convs[1].weight
    assert w.is_contiguous() != w.is_contiguous(memory_format=torch.channels_last)
    return w.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "algo, setting, expected",
    [
        ("protonet", "null", True),  # measured faster on a CPU
        ("reptile", "null", True),
        ("anil", "null", True),
        ("maml", "null", False),  # measured no faster (1.02x): stays as it was
        ("matching", "null", True),
        ("siamese", "null", True),
        ("meta_sgd", "null", False),
        ("maml", "true", True),
        ("protonet", "false", False),
    ],
)
def test_the_setting_picks_the_layout(compose_cfg, algo, setting, expected):
    run = engine.build(compose_cfg("train", [*TINY, f"algo={algo}", f"device.channels_last={setting}"]))
    assert nhwc(run.algo) is expected


def test_the_auto_choice_is_off_on_cuda_and_true_is_refused_there():
    from fewshot.device import use_channels_last

    assert use_channels_last(None, torch.device("cpu"), True)
    assert not use_channels_last(None, torch.device("cuda"), True)
    assert not use_channels_last(None, torch.device("cpu"), False)
    assert not use_channels_last(False, torch.device("cuda"), True)
    with pytest.raises(engine.ConfigError, match="device.channels_last=true is not measured on CUDA"):
        use_channels_last(True, torch.device("cuda"), True)


PRE_BATCH_NORM_BIASES = {f"net.features.{3 * i}.bias" for i in range(4)}  # Conv4: [conv, BatchNorm, ReLU] x 4


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("protonet", []),
        ("protonet", ["backbone.running_stats=true"]),  # as its presets: a task per call in training
        ("reptile", ["backbone.flatten=true"]),  # as its presets, transductive
        ("reptile", ["backbone.flatten=true", "algo.transductive=false"]),  # each query beside the support, vmap
        ("maml", []),
        ("anil", []),
        ("matching", []),
        ("siamese", []),
    ],
)
def test_either_layout_gives_the_same_step_to_float_rounding(compose_cfg, algo, extra):
    """From the same weights and task: the training loss and every gradient agree to rounding, and so do the test
    step's per-task scores; the layouts really differ (else this would compare a thing with itself)."""
    out = {}
    for setting in ("false", "true"):
        cfg = compose_cfg("train", [*TINY, f"algo={algo}", *extra, f"device.channels_last={setting}", "seed=3"])
        engine.seed_everything(cfg.seed)
        run = engine.build(cfg)
        assert nhwc(run.algo) is (setting == "true")
        episode = engine.make_sampler(run, "train", seed=11).sample(cfg.trainer.meta_batch_size)
        test_episode = engine.make_sampler(run, "test", seed=12).sample(4)
        run.algo.train()
        loss = run.algo(episode).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in run.algo.named_parameters() if p.grad is not None}
        run.algo.eval()
        score = run.algo(test_episode, train=False).score
        out[setting] = (loss.detach(), grads, score)
    (loss_a, grads_a, score_a), (loss_b, grads_b, score_b) = out["false"], out["true"]
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        if algo == "reptile" and k in PRE_BATCH_NORM_BIASES:
            # BatchNorm cancels these biases, so their gradient is 0 up to rounding; Adam (Reptile's inner loop,
            # every algorithm's meta-optimizer) scales that rounding up to steps of its learning rate.
            continue
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-3, atol=1e-5, msg=k)
    torch.testing.assert_close(score_b, score_a, rtol=0, atol=1e-6)


def test_a_nhwc_run_resumes_bit_for_bit(compose_cfg, tmp_path):
    straight_and_resumed(compose_cfg, tmp_path, [*TINY, "algo=protonet", "device.channels_last=true"])


def test_a_run_resumes_and_retests_in_the_other_layout(compose_cfg, tmp_path):
    """A NHWC run stopped at 3 resumes with NCHW weights (another machine's choice) and ends where the NHWC run
    does, to rounding; its checkpoint re-tested in NCHW gives the training run's test."""
    common = [*TINY, "algo=protonet"]
    straight = train_run(compose_cfg("train", [*common, "device.channels_last=true"]), tmp_path / "straight")
    train_run(compose_cfg("train", [*common, "device.channels_last=true", "trainer.iterations=3"]), tmp_path / "split")
    train_run(compose_cfg("train", [*common, "device.channels_last=false"]), tmp_path / "split")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("straight", "split"))
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        if k not in PRE_BATCH_NORM_BIASES:  # Adam's steps on their rounding-level gradients (see above)
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    best = tmp_path / "straight" / "checkpoints" / "best.pt"
    assert straight["channels_last"] is True
    ecfg = compose_cfg("eval", [f"checkpoint={best}", "device=cpu", "device.channels_last=false"])
    assert not nhwc(engine.build_from_checkpoint(ecfg)[0].algo)  # the re-test really runs the other layout
    retest = eval_run(ecfg, tmp_path / "eval")
    assert retest["channels_last"] is False
    again = retest["test"]
    assert again["episodes"] == straight["test"]["episodes"]
    assert again["acc_mean"] == pytest.approx(straight["test"]["acc_mean"], abs=1e-6)
