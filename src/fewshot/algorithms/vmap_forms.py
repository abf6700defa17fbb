"""The forms MAML's vmap step can run its passes in: the same numbers (tests/test_algorithms.py checks each against
learn2learn in float64), other kernels and other memory. scripts/bench_maml.py --variants times each against the
default in the same process (and measures memory on a CPU with --memory); a form becomes the default once it has
won on a GPU."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from fewshot.algorithms.conv_forms import CONV_FORMS
from fewshot.algorithms.functional import _StatelessCall

# vmap's own batching of every pass, no alternative form: what the forms are timed and tested against (the default
# until the H200 bench below).
PLAIN = MappingProxyType(
    {
        "native_query_batch_norm": True,
        "support_batch_norm": "decomposed",
        "batched_conv": "cudnn",
        "grouped_query": False,
        "first_step_conv": "cudnn",
    }
)


@dataclass
class VmapForms:
    """native_query_batch_norm: second order, the query pass runs BatchNorm's fused kernel (False: the first
        support pass's call, its BatchNorm and convolutions). The query pass is differentiated once, which the
        fused kernel gets right under vmap.
    support_batch_norm: second order, how the support passes run BatchNorm, "decomposed" or "function"
        (functional._StatelessCall): "function" keeps less for the double backward and launches more small kernels.
    batched_conv: second order, how the support passes after the first inner step run their convolutions, a key of
        conv_forms.CONV_FORMS. There the weights differ per task, so each conv is one grouped convolution over the
        tasks, and the meta-gradient differentiates it twice: torch's convolution double backward then runs one
        small convolution per task. "matmul" (unfold + batched matmul) and "split" (the input gradient as a
        transposed convolution, all in cuDNN) never reach it; "fprop" neither, and runs every input gradient as
        a forward convolution, where cuDNN runs a grouped dgrad as one kernel per task (conv_forms); it applies to
        the first step and the query pass too. Otherwise the first step, on the shared weights, runs
        first_step_conv.
    first_step_conv: second order, how the first inner step's support pass (shared weights) runs its convolutions,
        "cudnn" or "split" (unless batched_conv is "fprop"). Its weight gradients are per task, which vmap computes
        in an (images, tasks·channels) layout it copies the input and output gradient into; recorded op by op for
        the double backward, those copies are kept. conv_forms' split Functions keep the tensors as they come:
        on a CPU, Omniglot 5w1s (1 query) peaks at 95.6 MiB in place of 108.5 (learn2learn 91.5), 20w1s at 530.3
        in place of 556.1 (504.3).
    grouped_query: meta-training, the query pass outside vmap as one network grouped by task
        (fewshot.algorithms.grouped), which keeps what a per-task pass keeps where vmap's batching copies every
        convolution's input."""

    # The defaults won on an NVIDIA H200 (scripts/bench_maml.py --device cuda --variants, captured step, same
    # process), against PLAIN: Omniglot 20w1s 20.4 ms in place of 24.5 with 618 MiB of graph pool in place of 862
    # (1 query per class), 24.3 in place of 30.0 with 1,950 MiB in place of 2,754 (15 queries); 5w1s 3.45 in place
    # of 3.50 ms (184 MiB, 216) and 6.70 in place of 7.67 (754, 976). PLAIN's memory is that of its second capture
    # in the process: the first graph captured carried up to 66 MiB more for the same step.
    native_query_batch_norm: bool = True
    support_batch_norm: str = "function"
    batched_conv: str = "split"
    grouped_query: bool = True
    first_step_conv: str = "cudnn"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError for a form that does not exist (the fields may be set after construction)."""
        if self.support_batch_norm not in ("decomposed", "function"):
            raise ValueError(f"support_batch_norm must be 'decomposed' or 'function', got {self.support_batch_norm!r}")
        if self.batched_conv not in CONV_FORMS:
            raise ValueError(f"batched_conv must be one of {tuple(CONV_FORMS)}, got {self.batched_conv!r}")
        if self.first_step_conv not in ("cudnn", "split"):
            raise ValueError(f"first_step_conv must be 'cudnn' or 'split', got {self.first_step_conv!r}")

    def calls(self, net: nn.Module, second_order: bool) -> tuple[_StatelessCall, _StatelessCall, _StatelessCall]:
        """(first, later, query): the calls of the first inner step's support pass, of the later ones, and of the
        query passes. A second-order support pass needs a decomposed BatchNorm: see functional._StatelessCall."""
        self.check()
        support_bn = self.support_batch_norm if second_order else "native"
        # fprop runs every pass: the first step's weights are shared, but the meta-gradient's cotangents are per
        # task, and torch's double backward turns them into grouped dgrads
        conv = "fprop" if self.fprop(second_order) else "cudnn"
        first_conv = self.first_step_conv if second_order and conv == "cudnn" else conv
        first = _StatelessCall(net, batch_norm=support_bn, conv=first_conv)
        later = first
        if second_order and self.batched_conv not in ("fprop", first_conv):
            later = _StatelessCall(net, batch_norm=support_bn, conv=self.batched_conv)
        query = _StatelessCall(net, conv=conv) if second_order and self.native_query_batch_norm else first
        return first, later, query

    def fprop(self, second_order: bool) -> bool:
        """Whether every pass runs conv_forms' fprop convolutions (the query pass, grouped or not, included)."""
        return second_order and self.batched_conv == "fprop"
