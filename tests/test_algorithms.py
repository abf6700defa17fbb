"""Algorithm tests on CPU with small random tasks: MAML's properties (as learn2learn's
tests/unit/algorithms/maml_test.py), parity of our functional MAML with learn2learn's MAML, Matching
Networks and ProtoNet against hand computations, and a short real learning run for each algorithm."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import load_script
from fewshot.algorithms.anil import ANIL
from fewshot.algorithms.functional import CONV_FORMS
from fewshot.algorithms.grouped import GroupedCall
from fewshot.algorithms.grouped import supports as supports_grouped
from fewshot.algorithms.maml import MAML, resolve_strategy
from fewshot.algorithms.maml_l2l import MAMLL2L
from fewshot.algorithms.maml_pp import MAMLPlusPlus
from fewshot.algorithms.matching import MatchingNetworks
from fewshot.algorithms.meta_sgd import MetaSGD
from fewshot.algorithms.protonet import ProtoNet, embed_tasks
from fewshot.algorithms.vmap_forms import PLAIN, VmapForms
from fewshot.data.base import Episode
from fewshot.models.backbones import MLP, Conv4

WAYS, SHOTS, QUERIES, TASKS = 5, 1, 3, 3


def conv4(**kw) -> functools.partial:
    return functools.partial(Conv4, in_channels=1, image_size=28, hidden=16, **kw)


def random_episode(
    tasks=TASKS, ways=WAYS, shots=SHOTS, queries=QUERIES, size=28, dtype=torch.float32, seed=0
) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()  # noqa: E731
    return Episode(
        torch.randn(tasks, ways * shots, 1, size, size, generator=g).to(dtype),
        labels(shots),
        torch.randn(tasks, ways * queries, 1, size, size, generator=g).to(dtype),
        labels(queries),
    )


@contextlib.contextmanager
def intra_op_threads(n: int):
    """MAML's CPU loop spreads tasks over worker threads only when torch has more than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def meta_grads(algo: nn.Module, episode: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    algo.zero_grad(set_to_none=True)
    out = algo(episode, train=True)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in algo.named_parameters()}


def assert_grads_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    """Per-parameter closeness, atol relative to the largest gradient entry overall."""
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in b.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol * scale, msg=lambda m: f"{k}: {m}")


def bias_before_batch_norm(net: nn.Module) -> set[str]:
    """Names of biases of layers that feed a batch-statistics BatchNorm: their gradient is zero exactly
    (the normalisation subtracts them out again), so no test can ask it to be non-zero."""
    names = set()
    for prefix, module in net.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (name, layer), (_, following) in zip(children, children[1:]):
                if isinstance(following, nn.modules.batchnorm._BatchNorm) and getattr(layer, "bias", None) is not None:
                    names.add(f"{prefix}.{name}.bias".lstrip("."))
    return names


def assert_every_parameter_learns(algo: nn.Module, net_attr: str = "net") -> None:
    """Every parameter has a finite gradient; every one that can influence the loss a non-zero one."""
    cancelled = {f"{net_attr}.{n}" for n in bias_before_batch_norm(getattr(algo, net_attr))}
    assert cancelled, "expected Conv4's conv biases to be found"
    for name, p in algo.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if name in cancelled:
            assert p.grad.abs().max() < 1e-5, f"{name} feeds BatchNorm, its gradient should vanish"
        else:
            assert p.grad.abs().max() > 1e-8, f"{name} got a zero gradient"


# ---- MAML properties -------------------------------------------------------------------------------


def test_one_inner_step_lowers_the_support_loss():
    torch.manual_seed(0)
    algo = MAML(conv4(), WAYS, inner_lr=0.4)
    episode = random_episode(tasks=4)
    meta = {k: v.clone() for k, v in algo.state_dict().items()}
    for t in range(4):
        x, y = episode.support_x[t], episode.support_y[t]
        before = F.cross_entropy(algo.net(x), y)
        adapted = algo.adapt(x, y, steps=1)
        after = F.cross_entropy(functional_call(algo.net, adapted, (x,)), y)
        assert after < before - 0.05, (before.item(), after.item())
    # adapt() returns new weights and leaves the meta-parameters alone
    assert all(not torch.equal(adapted[k], p) for k, p in algo.net.named_parameters() if k.endswith("weight"))
    assert all(torch.equal(v, meta[k]) for k, v in algo.state_dict().items())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_meta_gradients_reach_every_initial_parameter(strategy, first_order):
    torch.manual_seed(0)
    algo = MAML(conv4(), WAYS, inner_steps=2, first_order=first_order, strategy=strategy)
    meta_grads(algo, random_episode())
    assert_every_parameter_learns(algo)


def test_meta_gradients_reach_every_parameter_of_a_net_without_batch_norm():
    class Plain(nn.Module):  # conv -> relu -> mean -> linear: every parameter matters
        def __init__(self, out_features=WAYS, **_):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Linear(8, out_features)

        def forward(self, x):
            return self.head(self.conv(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    algo = MAML(Plain, WAYS)
    meta_grads(algo, random_episode())
    for name, p in algo.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 1e-8, name


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_first_and_second_order_meta_gradients_differ(strategy):
    torch.manual_seed(0)
    second = MAML(conv4(), WAYS, first_order=False, strategy=strategy)
    first = MAML(conv4(), WAYS, first_order=True, strategy=strategy)
    first.load_state_dict(second.state_dict())
    episode = random_episode()
    loss2, g2 = meta_grads(second, episode)
    loss1, g1 = meta_grads(first, episode)
    torch.testing.assert_close(loss1, loss2)  # the same forward value
    diff = max(((g1[k] - g2[k]).norm() / g2[k].norm()).item() for k in g2 if k.endswith("weight"))
    assert diff > 1e-2, diff


def _strategy_variants():
    # (strategy, chunk_size, intra-op threads): the threaded loop runs when threads > 1.
    return [("loop", None, 1), ("loop", None, 2), ("loop", 2, 1), ("vmap", None, 1), ("vmap", 2, 1), ("vmap", 1, 2)]


@pytest.mark.parametrize(
    "first_order,steps", [(False, 1), (False, 3), (True, 2)], ids=["second-order-1", "second-order-3", "first-order-2"]
)
def test_strategies_and_chunking_give_the_same_loss_and_gradients(first_order, steps):
    torch.manual_seed(0)
    episode = random_episode(tasks=4, dtype=torch.float64)
    reference = None
    for strategy, chunk_size, threads in _strategy_variants():
        algo = MAML(
            conv4(), WAYS, inner_steps=steps, first_order=first_order, strategy=strategy, chunk_size=chunk_size
        ).double()
        if reference is None:
            state = algo.state_dict()
        algo.load_state_dict(state)
        with intra_op_threads(threads):
            loss, grads = meta_grads(algo, episode)
        if reference is None:
            reference = (loss, grads)
            continue
        torch.testing.assert_close(loss, reference[0], rtol=1e-12, atol=0)
        assert_grads_close(grads, reference[1], rtol=1e-9, atol=1e-11)


def test_threaded_loop_restores_the_thread_count_and_is_deterministic():
    torch.manual_seed(0)
    algo = MAML(conv4(), WAYS, strategy="loop")
    episode = random_episode(tasks=5)
    with intra_op_threads(2):
        _, g1 = meta_grads(algo, episode)
        _, g2 = meta_grads(algo, episode)
        assert torch.get_num_threads() == 2
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_auto_strategy_per_device():
    assert resolve_strategy("auto", "cuda") == "vmap"
    assert resolve_strategy("auto", "cpu") == "loop"
    assert resolve_strategy("vmap", "cpu") == "vmap"
    with pytest.raises(ValueError):
        MAML(conv4(), WAYS, strategy="fast")


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_eval_reports_step_accuracy_and_leaves_the_weights_alone(strategy):
    torch.manual_seed(0)
    algo = MAML(conv4(), WAYS, inner_steps=1, eval_inner_steps=4, strategy=strategy)
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    episode = random_episode(tasks=3)
    out = algo(episode, train=False)
    assert out.step_acc.shape == (3, 4 + 1)
    assert out.acc.shape == (3,) and ((out.acc >= 0) & (out.acc <= 1)).all()
    torch.testing.assert_close(out.step_acc[:, -1], out.acc)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)
    assert all(p.grad is None for p in algo.parameters())
    assert all(torch.equal(before[k], v) for k, v in algo.state_dict().items())
    # the inner loop needs autograd: it still runs when the caller evaluates under no_grad
    with torch.no_grad():
        again = algo(episode, train=False)
    torch.testing.assert_close(again.step_acc, out.step_acc)


def test_eval_step_zero_is_the_unadapted_net_and_adaptation_fits_the_support():
    torch.manual_seed(0)
    algo = MAML(conv4(), WAYS, inner_lr=0.4, eval_inner_steps=5)
    episode = random_episode(tasks=2)
    # with the support set as the query set, the last step must classify it (5 images, 5 steps)
    fit = Episode(episode.support_x, episode.support_y, episode.support_x, episode.support_y)
    out = algo(fit, train=False)
    start = torch.stack([(algo.net(x).argmax(-1) == y).float().mean() for x, y in zip(fit.query_x, fit.query_y)])
    torch.testing.assert_close(out.step_acc[:, 0], start)
    assert (out.step_acc[:, -1] == 1).all(), out.step_acc


# ---- parity with learn2learn ---------------------------------------------------------------------


def test_maml_and_maml_l2l_share_state_dict_keys():
    ours, theirs = MAML(conv4(), WAYS), MAMLL2L(conv4(), WAYS)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3], ids=["1-step", "3-steps"])
@pytest.mark.parametrize(
    "strategy,threads", [("loop", 1), ("loop", 2), ("vmap", 1)], ids=["loop", "loop-threaded", "vmap"]
)
@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-4, 1e-5), (torch.float64, 1e-9, 1e-11)], ids=["float32", "float64"]
)
def test_meta_gradient_matches_learn2learn(first_order, steps, strategy, threads, dtype, rtol, atol):
    torch.manual_seed(0)
    kw = dict(inner_lr=0.4, inner_steps=steps, first_order=first_order)
    theirs = MAMLL2L(conv4(), WAYS, **kw).to(dtype)
    ours = MAML(conv4(), WAYS, strategy=strategy, **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    episode = random_episode(tasks=3, dtype=dtype, seed=1)
    with intra_op_threads(threads):
        loss_ours, g_ours = meta_grads(ours, episode)
        loss_theirs, g_theirs = meta_grads(theirs, episode)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=rtol, atol=atol)
    assert_grads_close(g_ours, g_theirs, rtol=rtol, atol=atol)


# The vmap step's forms (MAML.forms), as scripts/bench_maml.py --variants sets them; "default" is VmapForms().
FORMS = {
    "default": {},
    "plain": PLAIN,
    "batched-matmul": {**PLAIN, "batched_conv": "matmul"},
    "batched-split": {**PLAIN, "batched_conv": "split"},
    "batched-fprop": {**PLAIN, "batched_conv": "fprop"},
    "bn-function": {**PLAIN, "support_batch_norm": "function"},
    "grouped-query": {**PLAIN, "grouped_query": True},
    "default-fprop": {"batched_conv": "fprop"},  # the query pass grouped with fprop convolutions too
    "default-split-first": {"first_step_conv": "split"},
    "split-first": {**PLAIN, "first_step_conv": "split"},  # the later steps stay cudnn
}


def with_forms(algo: MAML, forms: dict) -> MAML:
    for knob, value in forms.items():
        setattr(algo.forms, knob, value)
    return algo


@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3], ids=["1-step", "3-steps"])  # the batched convs run after the first step
def test_vmap_step_forms_match_learn2learn(forms, first_order, steps):
    torch.manual_seed(0)
    kw = dict(inner_lr=0.4, inner_steps=steps, eval_inner_steps=2, first_order=first_order)
    theirs = MAMLL2L(conv4(), WAYS, **kw).double()
    ours = with_forms(MAML(conv4(), WAYS, strategy="vmap", **kw).double(), forms)
    ours.load_state_dict(theirs.state_dict())
    episode = random_episode(tasks=3, dtype=torch.float64, seed=1)
    loss_ours, g_ours = meta_grads(ours, episode)
    loss_theirs, g_theirs = meta_grads(theirs, episode)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-12, atol=0)
    assert_grads_close(g_ours, g_theirs, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours(episode, train=False).step_score, theirs(episode, train=False).step_score)


def test_a_form_that_does_not_exist_is_refused():
    algo = MAML(conv4(), WAYS, strategy="vmap")
    algo.forms.batched_conv = "winograd"
    with pytest.raises(
        ValueError, match=r"batched_conv must be one of \('cudnn', 'matmul', 'split', 'fprop'\), got 'winograd'"
    ):
        algo(random_episode(tasks=2), train=True)
    with pytest.raises(ValueError, match=r"support_batch_norm must be 'decomposed' or 'function', got 'fused'"):
        VmapForms(support_batch_norm="fused")
    with pytest.raises(ValueError, match=r"first_step_conv must be 'cudnn' or 'split', got 'fprop'"):
        VmapForms(first_step_conv="fprop")


def test_split_first_step_keeps_less_for_the_double_backward():
    """What first_step_conv="split" is for: vmap's per-task weight gradients of the first step copy their inputs
    into another layout, and a second-order step recorded op by op kept those copies; the split Functions do not.
    The same numbers (test_vmap_step_forms_match_learn2learn), less memory at the step's peak."""
    bench, peaks = load_script("bench_maml"), {}
    for form in ("cudnn", "split"):
        torch.manual_seed(0)
        algo = with_forms(MAML(conv4(), WAYS, inner_steps=1, strategy="vmap"), {"first_step_conv": form})
        episode = random_episode(tasks=8, queries=1, seed=1)
        step = lambda: algo(episode, train=True).loss.backward()  # noqa: E731
        step()  # the first call's one-time allocations aside
        peaks[form] = bench.cpu_step_memory(step)
    assert peaks["split"] < 0.95 * peaks["cudnn"], peaks


@pytest.mark.parametrize("form", ["matmul", "split", "fprop"])
@pytest.mark.parametrize(
    "stride,padding,dilation,size",
    [(1, 1, 1, 7), (2, 1, 1, 7), (2, 1, 1, 8), (2, 0, 1, 9), (1, 2, 2, 8), (3, 1, 1, 10)],
)
def test_conv_forms_equal_conv2d_to_the_second_derivative_with_per_task_weights(form, stride, padding, dilation, size):
    """Value, first and second derivatives (in x, weight and bias) of a vmapped convolution with per-task weights:
    strides that leave rows out (the split form's output_padding), padding and dilation."""
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation).double()
    _assert_form_is_conv2d(form, conv, size)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,groups",
    [((3, 2), (2, 1), (1, 0), (1, 2), 2), ((2, 3), (1, 3), (3, 1), (2, 1), 3), (1, 2, 0, 1, 6)],
)
def test_fprop_form_is_conv2d_with_groups_and_uneven_dims(kernel, stride, padding, dilation, groups):
    # the fprop form runs the grouped query pass (groups = tasks) and any Conv2d, not only square ungrouped ones
    conv = nn.Conv2d(6, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    _assert_form_is_conv2d("fprop", conv, 9)


def _assert_form_is_conv2d(form: str, conv: nn.Conv2d, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, conv.in_channels, size, size, dtype=torch.float64, requires_grad=True)  # 2 tasks, 5 images
    w = torch.randn(2, *conv.weight.shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, conv.out_channels, dtype=torch.float64, requires_grad=True)

    def derivatives(forward) -> tuple[torch.Tensor, ...]:
        def out(xt, wt, bt):
            return functional_call(conv, {"weight": wt, "bias": bt}, (xt,)) if forward is None else forward(xt, wt, bt)

        def task(xt, wt, bt):
            grads = torch.func.grad(lambda *a: out(*a).pow(2).sum(), argnums=(0, 1, 2))(xt, wt, bt)
            return out(xt, wt, bt).sum() + sum(g.pow(2).sum() for g in grads)

        y = torch.func.vmap(task)(x, w, b).sum()
        return (y, *torch.autograd.grad(y, (x, w, b)))

    def form_forward(xt, wt, bt):
        swapped = copy.copy(conv)  # a shallow copy whose parameter slots hold this task's tensors
        swapped._parameters = {"weight": wt, "bias": bt}
        return CONV_FORMS[form](swapped, xt)

    for got, want in zip(derivatives(form_forward), derivatives(None)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _meta_gradient_convolutions(forms: dict, inner_steps: int) -> list[tuple[str, tuple, Optional[int]]]:
    """(op, its arguments, a convolution's output width) of every convolution and convolution backward that one
    second-order meta-gradient of MAML with these forms dispatches (3 tasks): a convolution's args[6] says whether
    it is transposed, a convolution backward's args[10][0] whether it computes an input gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    algo = with_forms(MAML(conv4(), WAYS, inner_steps=inner_steps, strategy="vmap"), forms)
    calls = []
    ops = {torch.ops.aten.convolution: "convolution", torch.ops.aten.convolution_backward: "convolution_backward"}

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in ops:
                name = ops[func.overloadpacket]
                calls.append((name, args, out.shape[-1] if name == "convolution" else None))
            return out

    with Convolutions():
        algo(random_episode(tasks=3), train=True).loss.backward()
    return calls


@pytest.mark.parametrize("forms", [FORMS["batched-fprop"], FORMS["default-fprop"]], ids=["vmap-query", "grouped-query"])
def test_fprop_form_runs_no_input_gradient_convolution(forms):
    """What the form is for: in a second-order meta-gradient, no transposed convolution and no convolution
    backward that computes an input gradient (what cuDNN runs as one kernel per task when grouped)."""
    calls = _meta_gradient_convolutions(forms, inner_steps=2)
    seen = [(name, args[6] if name == "convolution" else args[10][0]) for name, args, _ in calls]
    assert ("convolution", False) in seen and ("convolution_backward", False) in seen  # the counter saw them
    assert ("convolution", True) not in seen and ("convolution_backward", True) not in seen


@pytest.mark.parametrize(
    "forms,images", [(FORMS["default"], 1), (FORMS["default-split-first"], 0)], ids=["default", "split-first"]
)
def test_split_form_computes_no_gradient_for_the_images(forms, images):
    """The split form's weight gradient, differentiated again, computes no input gradient where the input needs
    none: the first layer's, whose input is the images. torch's convolution double backward does, as one grouped
    transposed convolution: by default only in the first inner step (on the shared weights, torch's own), with the
    first step split too in none; before the split form's weight gradient was a Function, in every step."""
    calls = _meta_gradient_convolutions(forms, inner_steps=3)
    widths = [width for name, args, width in calls if name == "convolution" and args[6]]  # transposed: input grads
    assert {14, 7, 4} <= set(widths)  # the later layers' input gradients were seen
    assert widths.count(28) == images, widths  # the images' (28 wide)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's BatchNorm and grouped convs)")
@pytest.mark.parametrize("forms", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("steps", [1, 3], ids=["1-step", "3-steps"])
@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-3, 1e-4), (torch.float64, 1e-9, 1e-11)], ids=["float32", "float64"]
)
def test_vmap_meta_gradient_matches_learn2learn_on_cuda(steps, dtype, rtol, atol, forms):
    # On CUDA vmap batches cuDNN's kernels (the query pass's BatchNorm among them), which the CPU tests never run.
    torch.manual_seed(0)
    kw = dict(inner_lr=0.4, inner_steps=steps)
    theirs = MAMLL2L(conv4(), WAYS, **kw).to("cuda", dtype)
    ours = with_forms(MAML(conv4(), WAYS, strategy="vmap", **kw).to("cuda", dtype), forms)
    ours.load_state_dict(theirs.state_dict())
    episode = random_episode(tasks=4, dtype=dtype, seed=1).to("cuda")
    # TF32 rounds differently per algorithm; matmuls run in full fp32 unless asked (torch's default)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        loss_ours, g_ours = meta_grads(ours, episode)
        loss_theirs, g_theirs = meta_grads(theirs, episode)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=rtol, atol=atol)
    assert_grads_close(g_ours, g_theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "backbone",
    [conv4(), conv4(max_pool=True), functools.partial(MLP, in_channels=1, image_size=28, sizes=(32, 16))],
    ids=["conv4", "conv4-max-pool", "mlp"],
)
@pytest.mark.parametrize("conv", ["cudnn", "fprop"])
def test_grouped_call_is_each_tasks_own_forward(backbone, conv):
    torch.manual_seed(0)
    net = backbone(out_features=WAYS).double()
    tasks = 3
    weights = {
        k: (p.detach() + 0.1 * torch.randn(tasks, *p.shape, dtype=p.dtype)).requires_grad_()
        for k, p in net.named_parameters()
    }
    x = torch.randn(tasks, 7, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    got = GroupedCall(net, conv)(weights, x)
    probe = torch.randn_like(got)  # gradients of <got, probe> in the weights and images, task by task too
    got_grads = torch.autograd.grad((got * probe).sum(), [x, *weights.values()])
    for t in range(tasks):
        want = functional_call(net, {k: w[t] for k, w in weights.items()}, (x[t],))
        torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12)
        want_grads = torch.autograd.grad((want * probe[t]).sum(), [x, *weights.values()])
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a[t], b[t], rtol=1e-10, atol=1e-12)
    assert all(not p.requires_grad or p.grad is None for p in net.parameters())  # the net's own weights untouched
    assert "forward" not in net.features[0].__dict__  # the swapped forwards are gone


def test_grouped_call_refuses_what_it_cannot_group():
    running = conv4()(out_features=WAYS)
    running.features[1] = nn.BatchNorm2d(16)  # running statistics: not per task
    for net in (running, nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, WAYS)), conv4()(out_features=WAYS).features):
        assert not supports_grouped(net)
        with pytest.raises(ValueError, match="GroupedCall does not support"):
            GroupedCall(net)
    with pytest.raises(ValueError, match="GroupedCall's conv must be 'cudnn' or 'fprop', got 'split'"):
        GroupedCall(conv4()(out_features=WAYS), "split")


def test_grouped_query_regression_matches_the_vmap_step():
    # MAML's sinusoid net (MSE): the grouped query pass's per-task losses and scores are vmap's
    backbone = functools.partial(MLP, in_channels=1, image_size=1, sizes=(40, 40), batch_norm=False)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = lambda n: torch.rand(3, n, 1, generator=g, dtype=torch.float64)  # noqa: E731
    episode = Episode(x(5), x(5), x(10), x(10))
    plain, grouped = (MAML(backbone, 1, inner_lr=0.01, inner_steps=2, strategy="vmap").double() for _ in range(2))
    with_forms(plain, PLAIN)
    with_forms(grouped, FORMS["grouped-query"])
    grouped.load_state_dict(plain.state_dict())
    out_plain, out_grouped = plain(episode, train=True), grouped(episode, train=True)
    assert out_grouped.metric == "mse"
    torch.testing.assert_close(out_grouped.score, out_plain.score, rtol=1e-12, atol=0)
    loss_plain, g_plain = meta_grads(plain, episode)
    loss_grouped, g_grouped = meta_grads(grouped, episode)
    torch.testing.assert_close(loss_grouped, loss_plain, rtol=1e-12, atol=0)
    assert_grads_close(g_grouped, g_plain, rtol=1e-9, atol=1e-11)


def test_mlp_backbone_meta_gradient_matches_learn2learn():
    # BatchNorm1d under vmap takes the same decomposed path as BatchNorm2d
    backbone = functools.partial(MLP, in_channels=1, image_size=28, sizes=(32, 16))
    torch.manual_seed(0)
    theirs = MAMLL2L(backbone, WAYS, inner_steps=2).double()
    episode = random_episode(dtype=torch.float64)
    _, g_theirs = meta_grads(theirs, episode)
    for strategy in ("loop", "vmap"):
        ours = MAML(backbone, WAYS, inner_steps=2, strategy=strategy).double()
        ours.load_state_dict(theirs.state_dict())
        assert_grads_close(meta_grads(ours, episode)[1], g_theirs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_eval_matches_learn2learn(strategy):
    torch.manual_seed(0)
    theirs = MAMLL2L(conv4(), WAYS, eval_inner_steps=3).double()
    ours = MAML(conv4(), WAYS, eval_inner_steps=3, strategy=strategy).double()
    ours.load_state_dict(theirs.state_dict())
    episode = random_episode(dtype=torch.float64)
    a, b = ours(episode, train=False), theirs(episode, train=False)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.step_acc, b.step_acc)
    torch.testing.assert_close(a.acc, b.acc)


# ---- ProtoNet -------------------------------------------------------------------------------------


class FlattenEmbedding(nn.Module):
    """An embedding without parameters: the pixels themselves, for hand-computed examples."""

    def __init__(self, out_features=None, dim=2, **_):
        super().__init__()
        assert out_features is None
        self.embedding_dim = dim

    def forward(self, x):
        return x.flatten(1)


def points_episode(support, support_y, query, query_y) -> Episode:
    """One task whose 'images' are 2-d points: (N, 2) -> (1, N, 1, 1, 2)."""
    as_images = lambda p: torch.tensor(p, dtype=torch.float64).view(1, len(p), 1, 1, 2)  # noqa: E731
    return Episode(as_images(support), torch.tensor([support_y]), as_images(query), torch.tensor([query_y]))


def test_protonet_logits_equal_a_hand_computation():
    # class 0: (0,0), (2,0) -> prototype (1,0); class 1: (0,2), (0,4) -> prototype (0,3)
    episode = points_episode([[0, 0], [0, 2], [2, 0], [0, 4]], [0, 1, 0, 1], [[1, 1], [0, 3]], [0, 1])
    algo = ProtoNet(FlattenEmbedding, ways=2)
    support, query = embed_tasks(algo.net, episode.support_x, episode.query_x)
    logits = algo.logits(support, episode.support_y, query)
    expected = -torch.tensor([[[0 + 1, 1 + 4], [1 + 9, 0 + 0]]], dtype=torch.float64)  # -||q - p||^2
    torch.testing.assert_close(logits, expected)
    out = algo(episode)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected[0], torch.tensor([0, 1])))
    torch.testing.assert_close(out.acc, torch.tensor([1.0]))


def test_protonet_shapes_gradients_and_no_grad_at_test():
    torch.manual_seed(0)
    algo = ProtoNet(conv4(), WAYS)
    episode = random_episode(tasks=2, shots=2)
    out = algo(episode, train=True)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.step_acc is None
    assert out.acc.shape == (2,)
    out.loss.backward()
    assert_every_parameter_learns(algo)
    test = algo(episode, train=False)
    assert not test.loss.requires_grad
    torch.testing.assert_close(test.loss, out.loss.detach())


def test_protonet_is_invariant_to_the_support_order():
    torch.manual_seed(0)
    algo = ProtoNet(conv4(), WAYS).double()
    episode = random_episode(tasks=2, shots=3, dtype=torch.float64)
    perm = torch.randperm(WAYS * 3)
    shuffled = Episode(episode.support_x[:, perm], episode.support_y[:, perm], episode.query_x, episode.query_y)
    a, b = algo(episode, train=False), algo(shuffled, train=False)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    sa, qa = embed_tasks(algo.net, episode.support_x, episode.query_x)
    sb, qb = embed_tasks(algo.net, shuffled.support_x, shuffled.query_x)
    torch.testing.assert_close(
        algo.logits(sa, episode.support_y, qa), algo.logits(sb, shuffled.support_y, qb), rtol=1e-12, atol=1e-12
    )


def test_running_statistics_train_task_by_task_and_test_with_the_averages():
    # backbone.running_stats (Snell et al.'s BatchNorm under model.eval()): training updates the running statistics
    # once per task, in turn, as the per-task loop; at test the net normalises with them, not with the batch.
    torch.manual_seed(0)
    net = functools.partial(Conv4, in_channels=1, image_size=28, hidden=8, running_stats=True)
    algo = ProtoNet(net, WAYS).double()
    reference = copy.deepcopy(algo.net)
    episode = random_episode(tasks=2, shots=2, dtype=torch.float64)
    out = algo(episode, train=True)
    for t in range(2):  # the reference's one episode per step, its images one batch
        reference(torch.cat([episode.support_x[t], episode.query_x[t]]))
    for (name, mine), theirs in zip(algo.net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    assert out.loss.requires_grad and algo.net.features[1].running_mean.abs().sum() > 0
    algo.eval()
    support, query = embed_tasks(algo.net, episode.support_x, episode.query_x)
    reference.eval()
    for t in range(2):
        expected = reference(torch.cat([episode.support_x[t], episode.query_x[t]]))
        torch.testing.assert_close(torch.cat([support[t], query[t]]), expected, rtol=1e-12, atol=1e-12)
        batch_stats = functools.partial(Conv4, in_channels=1, image_size=28, hidden=8)(out_features=None).double()
        batch_stats.load_state_dict(reference.state_dict(), strict=False)
        assert not torch.allclose(batch_stats(torch.cat([episode.support_x[t], episode.query_x[t]])), expected)


def count_calls(net: torch.nn.Module) -> list:
    """A list that grows by one per call of net (a forward hook): the loop calls it once per task, vmap once."""
    calls: list = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("per_task", [False, True])  # vmap over the tasks (CUDA's default), the loop (a CPU's)
def test_embed_tasks_keeps_batch_norm_statistics_per_task(per_task):
    torch.manual_seed(0)
    net = conv4()(out_features=None).double()
    episode = random_episode(tasks=3, dtype=torch.float64)
    calls = count_calls(net)
    support, query = embed_tasks(net, episode.support_x, episode.query_x, per_task=per_task)
    assert len(calls) == (3 if per_task else 1)  # the form asked for ran
    for t in range(3):
        z = net(torch.cat([episode.support_x[t], episode.query_x[t]]))
        torch.testing.assert_close(torch.cat([support[t], query[t]]), z)
    # and its gradients equal those of the per-task loop
    (support.sum() + query.square().sum()).backward()
    g_vmap = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    sum(
        net(torch.cat([s, q]))[: s.shape[0]].sum() + net(torch.cat([s, q]))[s.shape[0] :].square().sum()
        for s, q in zip(episode.support_x, episode.query_x)
    ).backward()
    assert_grads_close(g_vmap, {k: p.grad for k, p in net.named_parameters()}, rtol=1e-9, atol=1e-11)


def test_embed_tasks_loop_and_vmap_agree_with_running_statistics_at_test():
    """In eval() with running statistics (the ProtoNets presets' test), the per-task loop a CPU runs and vmap give
    the same embeddings; the running statistics are used (not the batch's)."""
    torch.manual_seed(0)
    net = conv4()(out_features=None, running_stats=True).double()
    episode = random_episode(tasks=3, dtype=torch.float64)
    net.train()
    embed_tasks(net, episode.support_x, episode.query_x)  # moves the running statistics off their start
    net.eval()
    calls = count_calls(net)
    loop = embed_tasks(net, episode.support_x, episode.query_x, per_task=True)
    vmapped = embed_tasks(net, episode.support_x, episode.query_x, per_task=False)
    assert len(calls) == 3 + 1
    default = embed_tasks(net, episode.support_x, episode.query_x)
    assert len(calls) == 3 + 1 + 3  # a CPU's default is the loop
    for a, b, c in zip(loop, vmapped, default):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        assert torch.equal(c, a)
    net.train()
    assert not torch.allclose(embed_tasks(net, episode.support_x, episode.query_x, per_task=True)[0], loop[0])
    with pytest.raises(ValueError, match="running statistics"):
        embed_tasks(net, episode.support_x, episode.query_x, per_task=False)


# ---- Matching Networks ----------------------------------------------------------------------------


def test_matching_prediction_equals_a_hand_computation():
    # support: class 0 at (1,0) and (1,1); class 1 at (0,1). query (2,1).
    episode = points_episode([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [[2, 1]], [0])
    algo = MatchingNetworks(FlattenEmbedding, ways=2, similarity="cosine")
    out = algo(episode)
    q = (2 / math.sqrt(5), 1 / math.sqrt(5))
    cos = [q[0], q[1], (q[0] + q[1]) / math.sqrt(2)]  # cosine to each support point
    e = [math.exp(c) for c in cos]
    p0 = (e[0] + e[2]) / sum(e)
    torch.testing.assert_close(out.loss, torch.tensor(-math.log(p0), dtype=torch.float64))
    support, query = embed_tasks(algo.net, episode.support_x, episode.query_x)
    probs = algo.probabilities(support, episode.support_y, query)
    torch.testing.assert_close(probs, torch.tensor([[[p0, 1 - p0]]], dtype=torch.float64))
    torch.testing.assert_close(out.acc, torch.tensor([1.0]))


def test_matching_support_cosine_and_scale_equal_a_hand_computation():
    # The default similarity divides by the support norms only: q.s/|s|. Query (2,1), |q| = sqrt(5).
    episode = points_episode([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [[2, 1]], [0])
    sims = [2.0, 1.0, 3 / math.sqrt(2)]
    for algo, scale in (
        (MatchingNetworks(FlattenEmbedding, ways=2), 1.0),
        (MatchingNetworks(FlattenEmbedding, ways=2, similarity="cosine", scale=3.0), 3.0 / math.sqrt(5)),
    ):  # the cosine times 3 = q.s/|s| * 3/sqrt(5)
        e = [math.exp(scale * c) for c in sims]
        p0 = (e[0] + e[2]) / sum(e)
        torch.testing.assert_close(algo(episode).loss, torch.tensor(-math.log(p0), dtype=torch.float64))


def test_matching_support_cosine_predicts_as_the_cosine_with_one_shot():
    # |q| is one positive factor per query: the argmax over the support set, the 1-shot prediction, is the cosine's.
    torch.manual_seed(0)
    net = conv4()(out_features=None)
    episode = random_episode(tasks=3, shots=1)
    default, cosine = (
        MatchingNetworks(lambda **_: net, WAYS),
        MatchingNetworks(lambda **_: net, WAYS, similarity="cosine"),
    )
    a, b = default(episode, train=False), cosine(episode, train=False)
    torch.testing.assert_close(a.acc, b.acc)
    assert not torch.isclose(a.loss, b.loss)  # the probabilities differ: only the sharpness


def test_matching_learned_scale_is_a_parameter_and_bad_settings_are_refused():
    algo = MatchingNetworks(FlattenEmbedding, ways=2, similarity="cosine", scale=10.0, learn_scale=True)
    assert "log_scale" in dict(algo.named_parameters())
    torch.testing.assert_close(algo.log_scale.exp(), torch.tensor(10.0))
    episode = points_episode([[1, 0], [0, 1], [1, 1]], [0, 1, 0], [[2, 1]], [0])
    algo(episode).loss.backward()
    assert algo.log_scale.grad is not None and algo.log_scale.grad != 0
    assert "log_scale" not in dict(MatchingNetworks(FlattenEmbedding, ways=2).named_parameters())
    assert "log_scale" not in MatchingNetworks(FlattenEmbedding, ways=2).state_dict()  # old checkpoints still load
    with pytest.raises(ValueError, match="similarity='dot'"):
        MatchingNetworks(FlattenEmbedding, ways=2, similarity="dot")
    with pytest.raises(ValueError, match="scale=0"):
        MatchingNetworks(FlattenEmbedding, ways=2, scale=0)


@pytest.mark.parametrize("fce", [False, True])
def test_matching_shapes_probabilities_and_gradients(fce):
    torch.manual_seed(0)
    algo = MatchingNetworks(conv4(), WAYS, fce=fce)
    episode = random_episode(tasks=2, shots=2)
    support, query = embed_tasks(algo.net, episode.support_x, episode.query_x)
    if fce:
        support, query = algo.full_context(support, query)
    probs = algo.probabilities(support, episode.support_y, query)
    assert probs.shape == (2, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, WAYS * QUERIES))
    assert (probs > 0).all()
    out = algo(episode, train=True)
    torch.testing.assert_close(out.loss, F.nll_loss(probs.log().flatten(0, 1), episode.query_y.flatten()))
    assert out.acc.shape == (2,) and out.step_acc is None
    out.loss.backward()
    assert_every_parameter_learns(algo)
    if fce:
        lstm_names = [n for n, _ in algo.named_parameters() if n.startswith(("support_lstm", "query_lstm"))]
        assert len(lstm_names) >= 6  # biLSTM both directions + attention LSTM
    assert not algo(episode, train=False).loss.requires_grad


def test_matching_without_fce_is_invariant_to_the_support_order():
    torch.manual_seed(0)
    algo = MatchingNetworks(conv4(), WAYS).double()
    episode = random_episode(tasks=2, shots=3, dtype=torch.float64)
    perm = torch.randperm(WAYS * 3)
    shuffled = Episode(episode.support_x[:, perm], episode.support_y[:, perm], episode.query_x, episode.query_y)
    torch.testing.assert_close(
        algo(episode, train=False).loss, algo(shuffled, train=False).loss, rtol=1e-12, atol=1e-12
    )
    # the FCE support LSTM reads the support set as a sequence, so its output depends on the order
    fce = MatchingNetworks(conv4(), WAYS, fce=True).double()
    assert not torch.allclose(fce(episode, train=False).loss, fce(shuffled, train=False).loss, rtol=1e-9, atol=0)


def test_matching_fce_steps_default_to_the_support_size():
    torch.manual_seed(0)
    default = MatchingNetworks(conv4(), WAYS, fce=True).double()
    explicit = MatchingNetworks(conv4(), WAYS, fce=True, fce_steps=WAYS * 2).double()
    one = MatchingNetworks(conv4(), WAYS, fce=True, fce_steps=1).double()
    explicit.load_state_dict(default.state_dict())
    one.load_state_dict(default.state_dict())
    episode = random_episode(shots=2, dtype=torch.float64)
    torch.testing.assert_close(default(episode).loss, explicit(episode).loss)
    assert not torch.allclose(default(episode).loss, one(episode).loss)


def test_matching_fce_embeddings_equal_appendix_a_written_out():
    # Appendix A with every weight set (float64, D = 3, 3 support and 2 query points per task, 2 tasks), written
    # out vector by vector: g(x_i) = h_fwd_i + h_bwd_i + g'(x_i) from a bidirectional LSTM over the support in its
    # order (h_bwd_i from the LSTM run from the last item back to i, zero initial states, PyTorch's gate order
    # i, f, g, o and its two biases); f(x, S) = h_K from the attention LSTM: h_0 = f'(x), c_0 = 0, and for
    # k = 1..K: a = softmax over the support of h_{k-1}.g(x_i), r_{k-1} = sum_i a_i g(x_i), gates = W_x f'(x) + b
    # + W_h [h_{k-1}, r_{k-1}] (one bias), c_k = s(f) c_{k-1} + s(i) tanh(g), h_k = s(o) tanh(c_k) + f'(x).
    # Then P(y | x, S) with the default support cosine f.g/|g|. g' = f' = the (parameter-free) pixel embedding.
    dim, shots, queries, tasks = 3, 3, 2, 2
    gen = torch.Generator().manual_seed(7)
    points = lambda n: torch.randn(tasks, n, 1, 1, dim, generator=gen, dtype=torch.float64)  # noqa: E731
    support_y = torch.tensor([[0, 1, 0], [1, 1, 0]])
    episode = Episode(points(shots), support_y, points(queries), torch.tensor([[0, 1], [1, 0]]))
    sig = torch.sigmoid

    def cell(gates, c):  # PyTorch's gate order
        i, f, g, o = gates[:dim], gates[dim : 2 * dim], gates[2 * dim : 3 * dim], gates[3 * dim :]
        c = sig(f) * c + sig(i) * torch.tanh(g)
        return sig(o) * torch.tanh(c), c

    for fce_steps, steps in ((2, 2), (None, shots)):  # None: K = the number of support examples
        algo = MatchingNetworks(functools.partial(FlattenEmbedding, dim=dim), ways=2, fce=True, fce_steps=fce_steps)
        algo = algo.double()
        with torch.no_grad():  # distinct non-zero values, moderate so that no gate saturates
            for _, p in sorted(algo.named_parameters()):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 1.6 - 0.8)
        w = dict(algo.named_parameters())
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        assert sorted(w) == sorted(
            [f"support_lstm.{kind}_l0{d}" for kind in kinds for d in ("", "_reverse")]
            + ["query_lstm.input.weight", "query_lstm.input.bias", "query_lstm.recurrent.weight"]
        )  # every weight is in the hand computation below

        def lstm_step(x, h, c, d):
            gates = w[f"support_lstm.weight_ih_l0{d}"] @ x + w[f"support_lstm.bias_ih_l0{d}"]
            return cell(gates + w[f"support_lstm.weight_hh_l0{d}"] @ h + w[f"support_lstm.bias_hh_l0{d}"], c)

        base_s, base_q = embed_tasks(algo.net, episode.support_x, episode.query_x)
        torch.testing.assert_close(base_s, episode.support_x.flatten(2), rtol=0, atol=0)
        expected_g = torch.zeros(tasks, shots, dim, dtype=torch.float64)
        expected_f = torch.zeros(tasks, queries, dim, dtype=torch.float64)
        expected_p = torch.zeros(tasks, queries, 2, dtype=torch.float64)
        for t in range(tasks):
            x = [base_s[t, i] for i in range(shots)]
            zero = torch.zeros(dim, dtype=torch.float64)
            fwd, bwd = [None] * shots, [None] * shots
            h, c = zero, zero
            for i in range(shots):  # h_fwd_i from h_fwd_{i-1}
                h, c = lstm_step(x[i], h, c, "")
                fwd[i] = h
            h, c = zero, zero
            for i in reversed(range(shots)):  # h_bwd_i from h_bwd_{i+1}
                h, c = lstm_step(x[i], h, c, "_reverse")
                bwd[i] = h
            g = [fwd[i] + bwd[i] + x[i] for i in range(shots)]
            for i in range(shots):
                expected_g[t, i] = g[i]
            for q in range(queries):
                fq = base_q[t, q]
                h, c = fq, zero
                for _ in range(steps):
                    e = [torch.exp(h @ g[i]) for i in range(shots)]
                    r = sum(e[i] / sum(e) * g[i] for i in range(shots))  # r_{k-1}, read with h_{k-1}
                    gates = w["query_lstm.input.weight"] @ fq + w["query_lstm.input.bias"]
                    gates = gates + w["query_lstm.recurrent.weight"] @ torch.cat([h, r])
                    h_hat, c = cell(gates, c)
                    h = h_hat + fq  # the skip connection
                expected_f[t, q] = h
                e = [torch.exp(h @ g[i] / torch.sqrt(g[i] @ g[i])) for i in range(shots)]
                for i in range(shots):
                    expected_p[t, q, support_y[t, i]] += e[i] / sum(e)

        support, query = algo.full_context(base_s, base_q)
        torch.testing.assert_close(support, expected_g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(query, expected_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(algo.probabilities(support, support_y, query), expected_p, rtol=1e-12, atol=1e-12)
        out = algo(episode, train=False)
        picked = expected_p.gather(-1, episode.query_y.unsqueeze(-1))
        torch.testing.assert_close(out.loss, -picked.log().mean(), rtol=1e-12, atol=1e-12)
        assert (expected_p - 0.5).abs().min() > 0.02  # not a flat attention that many bugs would leave unchanged


# ---- learning on a small synthetic problem ---------------------------------------------------------


class PrototypeTasks:
    """Classes = fixed random 7x7 binary patterns upsampled to 28x28; an image = its pattern + noise."""

    def __init__(self, classes=60, noise=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        patterns = (torch.rand(classes, 1, 7, 7, generator=g) > 0.5).float()
        self.prototypes = F.interpolate(patterns, size=(28, 28), mode="nearest")
        self.noise, self.g = noise, g

    def episode(self, classes: range, tasks: int, ways=5, shots=1, queries=5) -> Episode:
        pick = torch.stack(
            [torch.tensor(classes)[torch.randperm(len(classes), generator=self.g)[:ways]] for _ in range(tasks)]
        )

        def images(n):
            x = self.prototypes[pick].unsqueeze(2).expand(-1, -1, n, -1, -1, -1)  # (T, ways, n, 1, 28, 28)
            x = x + self.noise * torch.randn(x.shape, generator=self.g)
            return x.flatten(1, 2), torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()

        return Episode(*images(shots), *images(queries))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: MAML(conv4(), WAYS, inner_lr=0.4), id="maml"),
        pytest.param(lambda: MAML(conv4(), WAYS, inner_lr=0.4, first_order=True, strategy="vmap"), id="fomaml-vmap"),
        # step sizes near MAML's 0.4: from the paper's U[0.005, 0.1], 50 steps reach 52%
        pytest.param(lambda: MetaSGD(conv4(), WAYS, init_lr_min=0.2, init_lr_max=0.4), id="meta-sgd"),
        pytest.param(lambda: MatchingNetworks(conv4(), WAYS), id="matching"),
        pytest.param(lambda: MatchingNetworks(conv4(), WAYS, fce=True), id="matching-fce"),
        pytest.param(lambda: ProtoNet(conv4(), WAYS), id="protonet"),
    ],
)
def test_each_algorithm_learns_a_small_synthetic_problem(make):
    torch.manual_seed(0)
    data = PrototypeTasks()
    algo = make()
    test_episode = data.episode(range(40, 60), tasks=20)  # held-out classes
    chance = algo(test_episode, train=False).acc.mean().item()
    optimizer = torch.optim.Adam(algo.parameters(), lr=3e-3)
    for _ in range(50):
        optimizer.zero_grad()
        algo(data.episode(range(40), tasks=4), train=True).loss.backward()
        optimizer.step()
    acc = algo(test_episode, train=False).acc.mean().item()
    print(f"{type(algo).__name__}: held-out query accuracy {chance:.2f} before, {acc:.2f} after 50 steps (chance 0.20)")
    assert acc > 0.6 and acc > chance + 0.3, (chance, acc)


def test_metric_methods_test_with_fewer_ways_than_they_train():
    """ProtoNets train 60-way and test 5-way: the episode's own ways decide the prototypes, not the constructor's."""
    from fewshot.algorithms.matching import MatchingNetworks
    from fewshot.algorithms.protonet import ProtoNet
    from fewshot.data.sampler import EpisodeSampler
    from fewshot.data.synthetic import load_synthetic

    bank = load_synthetic(noise=0.0).split("test")
    five = EpisodeSampler(bank, ways=5, shots=1, queries=3, seed=0).sample(4)
    for algo_cls in (ProtoNet, MatchingNetworks):
        torch.manual_seed(0)
        wide = algo_cls(lambda out_features=None: Conv4(1, 28, out_features, hidden=8), ways=20)
        torch.manual_seed(0)
        exact = algo_cls(lambda out_features=None: Conv4(1, 28, out_features, hidden=8), ways=5)
        a, b = wide(five, train=False), exact(five, train=False)
        assert torch.equal(a.acc, b.acc) and torch.allclose(a.loss, b.loss)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MAML(conv4(), WAYS, strategy="threads"), r"MAML strategy must be one of \('auto', 'vmap', 'loop'\)"),
        (lambda: MetaSGD(conv4(), WAYS, inner_steps=0), r"MetaSGD needs inner_steps >= 1 and eval_inner_steps >= 0"),
        (lambda: MAMLPlusPlus(conv4(), WAYS, inner_steps=0), r"MAML\+\+ needs inner_steps >= 1, got 0$"),
        (
            lambda: MAMLPlusPlus(conv4(), WAYS, msl_epochs=-1),
            r"MAML\+\+ needs epoch_iterations >= 1, .*, got 500, -1, 0$",
        ),
        (lambda: ANIL(conv4(), WAYS, strategy="threads"), r"ANIL strategy must be one of"),
        (
            lambda: ANIL(conv4(), WAYS, inner_steps=0),
            r"ANIL needs inner_steps >= 1 and eval_inner_steps >= 0, got 0, 10$",
        ),
    ],
)
def test_bad_inner_loop_settings_name_the_algorithm(make, message):
    with pytest.raises(ValueError, match=message):
        make()
