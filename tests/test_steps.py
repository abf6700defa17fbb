"""The CUDA-graph step (trainer.cuda_graph): the static-buffer iteration computes exactly the eager one.

On a CPU GraphStep runs its static-buffer code eagerly (capture needs CUDA); the CUDA tests capture for real and
are skipped without a GPU. What a graph would change besides launches (where the inputs live, where loss and
accuracy are summed, when divergence is noticed, the optimizer's state form) is all exercised here."""

from __future__ import annotations

import copy
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from fewshot import engine
from fewshot.checkpoint import load_checkpoint
from fewshot.data.base import SplitBank
from fewshot.data.sampler import EpisodeSampler
from fewshot.data.sinusoid import SinusoidSampler
from fewshot.engine import loop, steps
from fewshot.engine.builder import build, make_sampler
from fewshot.engine.checkpoints import optimizer_state
from fewshot.engine.evaluation import evaluate
from fewshot.engine.graphs import EvalGraphs
from fewshot.engine.loop import Progress
from fewshot.train import run as train_run
from test_engine import TINY as ENGINE_TINY

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graph is captured there)")

# test_engine's tiny synthetic runs, on the device each test names.
TINY = [o for o in ENGINE_TINY if not o.startswith("device=")]


def test_in_place_fill_equals_the_allocating_draw():
    bank = SplitBank(torch.randint(0, 256, (12, 20, 1, 6, 6), dtype=torch.uint8), [str(i) for i in range(12)], True)
    sampler = EpisodeSampler(bank, ways=5, shots=2, queries=3, seed=7, mean=(0.2,), std=(0.5,))
    drawn = [sampler.sample(4) for _ in range(3)]
    sampler.generator.manual_seed(7)
    static = sampler.sample(4)
    buffers = (static.support_x.data_ptr(), static.query_x.data_ptr())
    for want in drawn[1:]:
        got = sampler.sample(4, out=static)
        assert got is static and (got.support_x.data_ptr(), got.query_x.data_ptr()) == buffers
        for a, b in zip(got.tensors(), want.tensors()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="holds"):
        sampler.sample(3, out=static)


def test_sinusoid_fill_equals_its_draw():
    kwargs = dict(shots=5, queries=7, amplitude=(0.1, 5.0), phase=(0.0, 3.14), x_range=(-5.0, 5.0), seed=3)
    a, b = SinusoidSampler(**kwargs), SinusoidSampler(**kwargs)
    static = b.sample(4)
    a.sample(4)
    want, got = a.sample(4), b.sample(4, out=static)
    assert got is static and all(torch.equal(x, y) for x, y in zip(got.tensors(), want.tensors()))


def _stepper(cfg, kind, tmp_path):
    torch.manual_seed(0)
    run = build(cfg)
    progress = Progress()
    optimizer = run.optimizer(run.algo.parameters())
    scheduler = run.scheduler(optimizer)
    t = run.settings
    args = (run.algo, make_sampler(run, "train"), optimizer, scheduler, t.meta_batch_size, t.grad_clip, progress)
    if kind == "eager":
        return run, optimizer, steps.EagerStep(*args, tmp_path)
    return run, optimizer, steps.GraphStep(*args, tmp_path, capture=kind == "graph")


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml", "algo.inner_steps=2", "trainer.grad_clip=0.5"],
        ["algo=protonet", "schedule=step", "schedule.step_size=2", "optim=adamw"],
        ["algo=matching"],
        ["algo=matching_fce"],
        ["algo=fomaml"],
        ["algo=siamese"],
        ["algo=mann", "algo.slots=16"],
        ["algo=lstm_baseline"],
        ["algo=lstm_baseline", "optim=rmsprop", "optim.alpha=0.9"],
        ["algo=meta_lstm"],
        ["algo=meta_sgd"],
        ["algo=maml_pp", "algo.inner_steps=2", "algo.epoch_iterations=3", "algo.msl_epochs=2"],
        ["algo=anil", "algo.inner_steps=2"],
    ],
    ids=lambda o: (
        o[0].removeprefix("algo=")
        + ("-clipped" if "grad_clip" in str(o) else "")
        + "".join("-" + x.removeprefix("optim=") for x in o if x.startswith("optim="))
    ),
)
def test_static_buffer_step_is_the_eager_step(compose_cfg, tmp_path, overrides):
    """Eight iterations (past the warm-up, where a GPU would start replaying): the same losses, scores, weights
    and optimizer state, bit for bit, for every family. The two run one after the other from the same seed, so
    the algorithms that draw their own randomness (siamese distortions, MANN's order) draw the same."""
    cfg = compose_cfg("train", [*TINY, "device=cpu", *overrides])
    run_a, opt_a, eager = _stepper(cfg, "eager", tmp_path)
    want = [eager(it) for it in range(1, 9)]
    run_b, opt_b, static = _stepper(cfg, "static", tmp_path)  # reseeds
    for it, (la, sa) in enumerate(want, 1):
        lb, sb = static(it)
        assert torch.equal(la, lb) and torch.equal(sa, sb), it
    for (name, a), b in zip(run_a.algo.state_dict().items(), run_b.algo.state_dict().values()):
        assert torch.equal(a, b), name
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa and sa.keys() == sb.keys()
    for k in sa:  # Adam's moments, RMSprop's square averages, the step counters
        assert sa[k].keys() == sb[k].keys() and all(torch.equal(v, sb[k][n]) for n, v in sa[k].items()), k
    assert eager.progress.first_loss == static.progress.first_loss


@cuda
@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml"],
        ["algo=meta_sgd"],
        ["algo=maml_pp", "algo.inner_steps=2", "algo.epoch_iterations=2", "algo.msl_epochs=3"],
        ["algo=protonet", "schedule=step", "schedule.step_size=2"],
        ["algo=anil", "algo.inner_steps=2"],
    ],
    ids=lambda o: o[0].removeprefix("algo="),
)
def test_captured_graph_replays_the_eager_update_on_cuda(compose_cfg, tmp_path, overrides):
    """Captured for real: one replay computes, from the same weights, optimizer state and static inputs, the loss,
    gradients and Adam update that the eager code computes. (Two CUDA runs are not compared iteration by iteration:
    cuDNN's backward kernels are not bitwise deterministic, and Adam's first steps, lr * g / |g|, turn that noise in
    near-zero gradients into lr-sized differences.) TF32 off: cuDNN may pick other algorithms when capturing than
    when running eagerly, and TF32 rounds each differently."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _captured_graph_replays_the_eager_update(compose_cfg, tmp_path, overrides)


@cuda
def test_maml_pp_is_captured_again_when_msl_ends_on_cuda(compose_cfg, tmp_path):
    """MSL over iterations 1-4: captured at 4, dropped at 5, captured again at 8 without the intermediate query
    passes; a replay of that graph is the eager update."""
    overrides = ["algo=maml_pp", "algo.inner_steps=2", "algo.epoch_iterations=2", "algo.msl_epochs=2"]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        graph = _captured_graph_replays_the_eager_update(compose_cfg, tmp_path, overrides, iterations=9)
    assert graph.captures == 2 and graph.phase == (False, True), (graph.captures, graph.phase)


def _captured_graph_replays_the_eager_update(compose_cfg, tmp_path, overrides, iterations=steps.WARMUP + 2):
    cfg = compose_cfg("train", [*TINY, "device=cuda", *overrides])
    run, optimizer, graph = _stepper(cfg, "graph", tmp_path)
    for it in range(1, iterations + 1):
        graph(it)
    assert graph.graph is not None, "the step was never captured"
    assert 0 < graph.peak_bytes <= graph.pool_bytes, (graph.peak_bytes, graph.pool_bytes)  # tensors within the pool
    algo = run.algo
    reference = copy.deepcopy(algo)
    state = optimizer_state(optimizer)  # portable: CPU step counters, not capturable
    assert all(v["step"].device.type == "cpu" for v in state["state"].values())
    assert all(v["step"].device.type == "cuda" for v in optimizer.state.values()), "the live state was changed"
    loss, _ = graph(iterations + 1)  # a replay, on the next tasks drawn into graph.static

    ref_optimizer = run.optimizer(reference.parameters())
    ref_optimizer.load_state_dict(state)
    out = reference(graph.static, train=True)
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for (name, p), q in zip(algo.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        q.grad.copy_(p.grad)  # the update from the very same gradient, so only the optimizer is compared
    ref_optimizer.step()
    for (name, p), q in zip(algo.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    return graph


class _FrozenFlowGraph:
    """A stand-in for a CUDA graph on the CPU: each replay reruns the captured function with the host-side flow
    frozen where the capture left it (MAML++ reads its phase from graph_iteration while "capturing"), which is
    what a real replay does and what a missed recapture would get wrong."""

    def __init__(self, fn, capturing):
        self.fn, self.capturing, self.outputs = fn, capturing, (torch.zeros(()), torch.zeros(()))

    def replay(self):
        self.capturing["on"] = True
        try:
            for out, value in zip(self.outputs, self.fn()):
                out.copy_(value.detach())
        finally:
            self.capturing["on"] = False

    def reset(self):
        self.fn = None


@pytest.mark.parametrize(
    "overrides, phases",
    [  # MSL for epochs 0 and 1 (iterations 1-6), then the final step's query loss alone
        (["algo.msl_epochs=2"], [(True, True), (False, True)]),
        # first order for epochs 0 and 1, then second: a graph replayed past its phase would stay first order
        (["algo.msl_epochs=0", "algo.first_order_epochs=2"], [(False, False), (False, True)]),
    ],
    ids=["msl-ends", "order-anneals"],
)
def test_graph_is_captured_again_when_the_flow_changes(compose_cfg, tmp_path, monkeypatch, overrides, phases):
    """MAML++'s step changes its host-side flow at an epoch (graph_phase): GraphStep drops its graph there, warms
    up again and captures the new flow, with the eager step's results bit for bit. On the CPU the capture is the
    frozen-flow stand-in above."""
    from fewshot.algorithms import maml_pp

    capturing = {"on": False}
    graphs = []

    def fake_capture(fn, device, setting):
        graphs.append(_FrozenFlowGraph(fn, capturing))
        return graphs[-1], graphs[-1].outputs, 0, 0

    monkeypatch.setattr(maml_pp, "_capturing", lambda t: capturing["on"])
    monkeypatch.setattr(steps, "try_capture", fake_capture)
    monkeypatch.setattr(steps, "on_side_stream", lambda fn, device: fn())
    flags = ["algo=maml_pp", "algo.inner_steps=2", "algo.epoch_iterations=3", *overrides]
    cfg = compose_cfg("train", [*TINY, "device=cpu", *flags])
    run_a, _, eager = _stepper(cfg, "eager", tmp_path)
    want = [eager(it) for it in range(1, 15)]
    run_b, _, step = _stepper(cfg, "static", tmp_path)
    step.capture = True  # capture=False on a CPU: the stand-in captures instead
    seen = []
    for it, (la, sa) in enumerate(want, 1):
        lb, sb = step(it)
        assert torch.equal(la, lb) and torch.equal(sa, sb), it
        seen.append((step.graph is not None, step.phase))
    for (name, a), b in zip(run_a.algo.state_dict().items(), run_b.algo.state_dict().values()):
        assert torch.equal(a, b), name
    # eager warm-up at 1-3, captured at 4; the flow changes at 7: eager again at 7-9, captured afresh at 10
    assert step.captures == 2 and graphs[0].fn is None, step.captures
    assert [g for g, _ in seen] == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 5
    assert seen[3][1] == phases[0] and seen[-1][1] == phases[1]
    assert run_b.algo.graph_iteration == 10


def test_divergence_is_recorded_on_the_device_and_raised_at_the_next_check(compose_cfg, tmp_path):
    """The eager step stops before the diverged update; the graph step records the same iteration and loss on the
    device and raises the same message at the loop's next check (the loop checks before it saves anything)."""
    cfg = compose_cfg("train", [*TINY, "device=cpu", "algo=maml", "trainer.meta_lr=1e9"])  # the head explodes
    eager = _stepper(cfg, "eager", tmp_path)[2]
    with pytest.raises(engine.FewshotError, match=r"the run diverged and stopped") as eager_error:
        for it in range(1, 41):
            eager(it)
    step = _stepper(cfg, "static", tmp_path)[2]
    for it in range(1, 41):
        step(it)  # no host read of the loss after the first iteration: nothing raised yet
    with pytest.raises(engine.FewshotError) as graph_error:
        step.check()
    assert str(graph_error.value) == str(eager_error.value)
    print(graph_error.value)


def test_cuda_graph_setting_is_checked(compose_cfg, tmp_path, monkeypatch):
    with pytest.raises(engine.ConfigError, match=r"trainer.cuda_graph=sometimes: choose off, on or auto"):
        train_run(compose_cfg("train", [*TINY, "device=cpu", "trainer.cuda_graph=sometimes"]), tmp_path / "a")
    with pytest.raises(engine.FewshotError, match=r"trainer.cuda_graph=on needs device=cuda"):
        train_run(compose_cfg("train", [*TINY, "device=cpu", "trainer.cuda_graph=on"]), tmp_path / "b")
    # auto on a CPU is the eager step (the static-buffer step gives the same numbers, so ask for its kind)
    made = []
    monkeypatch.setattr(loop, "make_step", lambda *a, **k: made.append(steps.make_step(*a, **k)) or made[-1])
    train_run(compose_cfg("train", [*TINY, "device=cpu", "trainer.cuda_graph=auto"]), tmp_path / "c")
    assert [type(s) for s in made] == [steps.EagerStep]


class _StopAt(steps.GraphStep):
    """The static-buffer step that sends this process SIGTERM during iteration `stop`."""

    stop = 4

    def __call__(self, it):
        if it == self.stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(it)


def test_graph_step_resumes_and_stops_on_signals_bit_for_bit(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM with the static-buffer step checkpoints at the end of its iteration; resuming it (with the eager
    step, since the checkpoint's optimizer state is portable) ends where an uninterrupted eager run ends."""
    common = [*TINY, "device=cpu", "algo=protonet", "schedule=step", "schedule.step_size=2"]
    train_run(compose_cfg("train", common), tmp_path / "straight")

    def static_step(mode, device, *args, **kwargs):
        return _StopAt(*args, capture=False, **kwargs)

    monkeypatch.setattr(loop, "make_step", static_step)
    with pytest.raises(engine.Interrupted, match=r"SIGTERM at iteration 4"):
        train_run(compose_cfg("train", common), tmp_path / "split")
    monkeypatch.undo()
    train_run(compose_cfg("train", common), tmp_path / "split")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("straight", "split"))
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_optim_rmsprop_is_torchs_at_the_meta_lr_and_runs_eagerly_under_graphs(compose_cfg, monkeypatch):
    """optim=rmsprop builds torch.optim.RMSprop at trainer.meta_lr with its settings; GraphStep captures only
    Adam and AdamW (measured on a GPU), so trainer.cuda_graph refuses RMSprop and SGD in one line (auto then
    runs them eagerly)."""
    cfg = compose_cfg("train", [*TINY, "device=cpu", "optim=rmsprop", "optim.alpha=0.9", "trainer.meta_lr=0.003"])
    run = build(cfg)
    opt = run.optimizer(run.algo.parameters())
    assert type(opt) is torch.optim.RMSprop
    assert opt.defaults["lr"] == 0.003 and opt.defaults["alpha"] == 0.9 and opt.defaults["momentum"] == 0
    params = [torch.nn.Parameter(torch.ones(2))]
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        steps.check_capturable(cls(params))
    for cls in (torch.optim.RMSprop, torch.optim.SGD):
        with pytest.raises(steps.CaptureUnsupported) as e:
            steps.check_capturable(cls(params, lr=0.1))
        assert f"torch.optim.{cls.__name__} is not captured" in str(e.value) and "\n" not in str(e.value)
    # GraphStep's capture path asks it (RMSprop has a capturable setting, which the old check let through) ...
    stub = SimpleNamespace(optimizer=torch.optim.RMSprop(params, lr=0.1), device=torch.device("cpu"))
    with pytest.raises(steps.CaptureUnsupported):
        steps.GraphStep._make_capturable(stub)
    stub.optimizer = torch.optim.Adam(params, lr=0.1)
    steps.GraphStep._make_capturable(stub)
    assert stub.optimizer.param_groups[0]["capturable"] is True
    # ... and make_step turns the refusal into eager steps (auto) or a one-line error (on), as on a GPU.
    real = steps.GraphStep

    class Refusing(real):  # a CUDA device's GraphStep, whose constructor makes the optimizer capturable
        def __init__(self, algo, sampler, optimizer, *args, **kwargs):
            real._make_capturable(SimpleNamespace(optimizer=optimizer, device=torch.device("cpu")))

    monkeypatch.setattr(steps, "GraphStep", Refusing)
    args = (run.algo, None, torch.optim.RMSprop(params, lr=0.1), None, 2, None, Progress(), None)
    assert type(steps.make_step("auto", torch.device("cuda"), *args)) is steps.EagerStep
    with pytest.raises(steps.FewshotError, match="^trainer.cuda_graph=on: torch.optim.RMSprop is not captured"):
        steps.make_step("on", torch.device("cuda"), *args)


def test_optimizer_state_leaves_the_live_optimizer_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    live = opt.state[p]["step"]
    state = optimizer_state(opt)
    assert opt.state[p]["step"] is live and state["param_groups"][0]["capturable"] is False
    # a snapshot: the next step (a graph replay updates the same tensors in place) leaves it as it was
    before = {k: v.clone() for k, v in state["state"][0].items()}
    opt.step()
    assert all(torch.equal(state["state"][0][k], before[k]) for k in before)


def _static_and_plain_evaluation(cfg) -> tuple[dict, EvalGraphs]:
    """The plain evaluation of 20 validation tasks in batches of 6, after asserting that EvalGraphs' static path
    (eagerly, as on a CPU) gives exactly its numbers twice in a row; and those graphs."""
    torch.manual_seed(0)
    run = build(cfg)
    plain = evaluate(run.algo, make_sampler(run, "val"), 20, 6, seed=5)
    graphs = EvalGraphs(run.algo, capture=False)
    for _ in range(2):
        assert evaluate(run.algo, make_sampler(run, "val"), 20, 6, seed=5, graphs=graphs) == plain
    return plain, graphs


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml"],
        ["algo=mann", "algo.slots=16"],
        ["algo=protonet"],
        ["algo=matching_fce"],
        ["algo=siamese"],
        ["algo=meta_lstm"],
        ["algo=meta_sgd", "algo.eval_inner_steps=2"],
        ["algo=maml_pp", "algo.inner_steps=2"],
        ["algo=reptile", "algo.eval_inner_steps=3", "episode.shots=2"],  # random inner batches: seeded alike
        ["algo=protonet", "backbone.running_stats=true"],  # BatchNorm's running statistics at test
        ["algo=anil", "algo.eval_inner_steps=3"],
    ],
    ids=[
        "maml-steps",
        "mann-instances",
        "protonet",
        "matching_fce",
        "siamese",
        "meta_lstm-steps",
        "meta_sgd-steps",
        "maml_pp-steps",
        "reptile",
        "protonet-running_stats",
        "anil-steps",
    ],
)
def test_eval_graphs_static_path_is_the_plain_evaluation(compose_cfg, overrides):
    """Validation/test through EvalGraphs' static tensors (eagerly, as on a CPU) gives exactly the plain loop's
    numbers, per-step (or per-instance) scores included, with a ragged last batch (20 tasks in batches of 6), twice
    in a row (the second call reuses the static tensors, as every validation after the first does)."""
    plain, graphs = _static_and_plain_evaluation(
        compose_cfg("train", [*TINY, "device=cpu", "eval.meta_batch_size=6", *overrides])
    )
    assert len(graphs.entries) == 2  # batches of 6 and the last one of 2


@pytest.mark.parametrize("experiment", ["maml_sinusoid_k5", "pretrain_sinusoid_k5"])
def test_eval_graphs_static_path_on_the_sinusoids(compose_cfg, experiment):
    """The regression samplers (MSE, no classes) fill the static tensors too."""
    plain, graphs = _static_and_plain_evaluation(
        compose_cfg("train", [f"experiment={experiment}", "device=cpu", "eval.meta_batch_size=6"])
    )
    assert plain["metric"] == "mse" and len(graphs.entries) == 2


@cuda
@pytest.mark.parametrize("algo", [["algo=maml"], ["algo=reptile", "algo.eval_inner_steps=3", "episode.shots=2"]])
def test_eval_graphs_replay_on_cuda(compose_cfg, algo):
    """Captured for real (MAML, 10 inner steps at test; Reptile, whose inner batches are drawn on the device inside
    the graph, from the generator evaluate seeds): replayed batches score what the eager loop scores."""
    cfg = compose_cfg("train", [*TINY, "device=cuda", *algo, "eval.meta_batch_size=5"])
    torch.manual_seed(0)
    run = build(cfg)
    plain = evaluate(run.algo, make_sampler(run, "val"), 20, 5, seed=5)
    graphs = EvalGraphs(run.algo)
    replayed = evaluate(run.algo, make_sampler(run, "val"), 20, 5, seed=5, graphs=graphs)
    assert all(entry[1] is not None for entry in graphs.entries.values()), "never captured"
    assert abs(replayed["acc_mean"] - plain["acc_mean"]) < 0.01, (replayed, plain)
