"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra, Lillicrap, ICML 2016).

The paper: an episode is a sequence. The images of a few classes (5 classes x 10 instances, 20x20 Omniglot) are
shown one per time step in random order, each with the one-hot label of the *previous* step, so the label of an
image is revealed only after the network has answered for it; labels are shuffled per episode, so the class-label
binding must be held in memory, not in the weights. An LSTM controller (200 units) reads an external memory
(128 slots x 40) with 4 heads, by a softmax over the cosine similarities between each head's key k_t and the slots,
and writes with Least Recently Used Access (LRUA):

    usage         w_u(t)  = gamma * w_u(t-1) + w_r(t) + w_w(t)                           (gamma = 0.95)
    write weights w_w(t)  = sigmoid(alpha) * w_r(t-1) + (1 - sigmoid(alpha)) * w_lu(t-1)
    memory        M_t(i)  = M_{t-1}(i) + w_w(t)(i) k_t, the least-used slot zeroed first
    read          r_t     = sum_i w_r(t)(i) M_t(i),  w_r(t) = softmax_i cos(k_t, M_t(i))

and answers from the controller's output and the read vectors. The baseline of the paper's Table 1 is the same
LSTM without the memory (`memory=False`, conf/algo/lstm_baseline.yaml). The paper reports the accuracy at the
1st, 2nd, ..., 10th instance of each class: AlgoOutput.step_score holds it per task (step_kind "instance"), and
fewshot writes it to results.json as `instance_acc` (index 0 = the 1st instance).

Where fewshot differs, and why:
- The episode comes from fewshot's sampler (episode.shots + episode.queries = instances per class: the presets use
  1 + 9); forward() joins its support and query images into one sequence in random order. In training the order
  comes from the global torch RNG (seeded and checkpointed by the engine). At validation and test it is the order
  of a hash of each image's ink pattern: a random order that is the same on every call, so the fixed
  validation/test tasks score the same every time, and that depends on the task's images only (a generator
  reseeded per call would give the j-th task of every meta-batch the same order, and the same label sequence).
- The paper's w_lu marks the n least-used slots (n = number of reads) for every head, and zeroes the least-used
  one. Here head h writes to the h-th least-used slot, and those slots are zeroed: the heads never write into the
  same fresh slot, and with one head it is the paper's rule exactly.
- The controller's input is [image, previous label, previous reads] and the output layer sees [h_t, reads], as in
  the NTM-style controllers this work builds on; keys pass through tanh, which keeps memory contents bounded.
- AlgoOutput.score, which validation selects on, is the accuracy over instances >= 2: the 1st instance of a class
  comes before its label was ever shown, so it can only be guessed (at best by excluding labels already seen) and
  only dilutes the measure of what the memory does.
- The paper reads raw pixels, and so does this module: the configured backbone is not used.
- add_vector=True (off by default, as the paper's equation) writes a separate add vector a_t (tanh) in place of
  the key, as the public re-implementations snowkylin/ntm (its default) and tristandeleu/ntm-one-shot do: with the
  key written, each head's read after the write finds its own key in the slot it has just written (at cosine 1
  with one head; with more, the other heads' small writes there blur it).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory
from fewshot.data.base import Episode
from fewshot.errors import ConfigError

_HASH_PRIME = 2**31 - 1  # eval order: ink pattern hashed mod a prime (sums stay far below 2**63)


# ---- LRUA memory access (batched over tasks: memory (T, N, W), heads (T, H, .)) ---------------------------------


def least_used(usage: torch.Tensor, heads: int) -> torch.Tensor:
    """usage (T, N) -> (T, heads, N): head h one-hot on the h-th least-used slot."""
    return F.one_hot(usage.topk(heads, dim=-1, largest=False).indices, usage.shape[-1]).to(usage.dtype)


def lrua_write(
    memory: torch.Tensor, usage: torch.Tensor, read_prev: torch.Tensor, keys: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LRUA write from the previous step's usage (T, N) and read weights (T, H, N), the vectors to write
    `keys` (T, H, W; the keys themselves, or the add vectors) and the gates' logits alpha (T, H): the heads'
    least-used slots are zeroed, then each vector is added with its weights
    w_w = sigmoid(alpha) w_r(t-1) + (1 - sigmoid(alpha)) w_lu(t-1). Returns the memory and w_w (T, H, N)."""
    lu = least_used(usage, keys.shape[1])  # (T, H, N)
    memory = memory * (1 - lu.sum(1)).unsqueeze(-1)  # slots are distinct, so the sum is a 0/1 mask
    gate = alpha.sigmoid().unsqueeze(-1)  # (T, H, 1)
    write = gate * read_prev + (1 - gate) * lu
    return memory + write.transpose(1, 2) @ keys, write


def cosine_read(memory: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read weights softmax_i cos(k, M(i)) (T, H, N) and read vectors (T, H, W); an all-zero slot has cosine 0."""
    weights = (F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)).softmax(-1)
    return weights, weights @ memory


def update_usage(usage: torch.Tensor, read: torch.Tensor, write: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_u(t) = gamma w_u(t-1) + w_r(t) + w_w(t), the heads' weights summed: (T, N)."""
    return gamma * usage + read.sum(1) + write.sum(1)


def lrua_step(
    h: torch.Tensor,
    mem: torch.Tensor,
    usage: torch.Tensor,
    read_w: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    gamma: float,
) -> tuple[torch.Tensor, ...]:
    """One LRUA write and read from the controller's h (T, C), through the interface layer (weight, bias): per head
    [key (W), add vector (W, only where the layer is that wide), write gate], keys and add vectors through tanh.
    Without add vectors the keys are written, as the paper's equation. Returns the new memory, usage, read weights
    and reads (T, heads * W)."""
    width = mem.shape[-1]
    interface = F.linear(h, weight, bias).view(h.shape[0], heads, -1)
    per_head = interface.shape[-1]
    assert per_head in (width + 1, 2 * width + 1), f"interface of {weight.shape[0]} for {heads} heads"
    keys, alpha = interface[..., :width].tanh(), interface[..., -1]
    values = interface[..., width:-1].tanh() if per_head > width + 1 else keys
    mem, write_w = lrua_write(mem, usage, read_w, values, alpha)
    read_w, read = cosine_read(mem, keys)
    return mem, update_usage(usage, read_w, write_w, gamma), read_w, read.flatten(1)


def recurrence(
    step: torch.Tensor,
    recurrent: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    memory: tuple[torch.Tensor, ...],
    interface: Optional[tuple[torch.Tensor, torch.Tensor]],
    heads: int,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One step of the controller: the LSTM cell (LSTMCell's gate order) from `step`, the part of its
    pre-activation that comes from the sequence (both biases included), and `recurrent`, the weights of
    [reads, h] transposed; then, with a memory (mem, usage, read weights, reads; () for the baseline), one
    lrua_step through `interface` (weight, bias). Returns h, c and the memory after the step."""
    state = torch.cat([memory[-1], h], -1) if memory else h
    i, f, g, o = torch.addmm(step, state, recurrent).chunk(4, -1)
    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
    h = o.sigmoid() * c.tanh()
    if memory:
        assert interface is not None
        memory = lrua_step(h, *memory[:3], *interface, heads, gamma)
    return h, c, memory


@functools.cache
def compiled_recurrence() -> Callable[..., tuple]:
    """`recurrence` through torch.compile (inductor), built once per process: it fuses the step's few dozen small
    ops, and their backward, into a few kernels (scripts/bench_mann.py measures what it saves); equal to the eager
    step up to float rounding. Static shapes: a graph per meta-batch size and sequence length, with or without
    memory (and add vectors), and per grad mode (training's first step, whose zero state needs no gradient, is
    one more). A preset run builds three; past torch's recompile limit (8 per process, which a multirun in one
    process shares) new shapes run eagerly. Where inductor cannot build the forward (no C++ compiler, say), the
    error says what to change; the backward is built at the first loss.backward(), after the forward has
    compiled."""
    compiled = torch.compile(recurrence, dynamic=False)

    @functools.wraps(recurrence)
    def step(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler for inductor's CPU kernels
            inner = getattr(e, "inner_exception", None) or e
            reason = f"{type(inner).__name__}: {str(inner).strip().splitlines()[0][:200]}"
            raise ConfigError(
                f"algo.compile_step=true: torch.compile could not build MANN's step ({reason}); "
                "set algo.compile_step=false (fewshot-eval: eval.compile_step=false) to run it eagerly"
            ) from e

    return step


# ---- the episode as a sequence ------------------------------------------------------------------------------------


def eval_order(x: torch.Tensor) -> torch.Tensor:
    """(T, L, D) images -> (T, L) a fixed random order: argsort of a hash of each image's ink (its pixels above the
    image's minimum, an exact comparison), so it depends on the images only, not on the batch or the device."""
    ink = (x > x.amin(-1, keepdim=True)).long()
    return ((ink * _hash_weights(x.shape[-1], x.device)).sum(-1) % _HASH_PRIME).argsort(dim=-1, stable=True)


@functools.lru_cache(maxsize=8)
def _hash_weights(pixels: int, device: torch.device) -> torch.Tensor:
    """eval_order's fixed random weight per pixel (seed 0), drawn once per image size and device."""
    return torch.randint(0, _HASH_PRIME, (pixels,), generator=torch.Generator().manual_seed(0)).to(device)


def make_sequence(
    episode: Episode, order: torch.Tensor, ways: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The episode's support and query images as one sequence per task, in `order` (T, L).

    Returns the flattened images x (T, L, D), their labels y (T, L), the previous step's one-hot label
    (T, L, ways; zeros at the first step) and each step's instance index (T, L): 0 for the 1st image of its class
    in the sequence, 1 for the 2nd, ..."""
    x = torch.cat([episode.support_x, episode.query_x], 1).flatten(2)
    y = torch.cat([episode.support_y, episode.query_y], 1)
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))
    y = y.gather(1, order)
    onehot = F.one_hot(y, ways).to(x.dtype)
    previous = torch.cat([torch.zeros_like(onehot[:, :1]), onehot[:, :-1]], 1)
    instance = (onehot.cumsum(1) * onehot).sum(-1).long() - 1
    return x, y, previous, instance


class MANN(Algorithm):
    """LSTM controller + LRUA memory over a sequence episode; memory=False gives the paper's LSTM baseline.

    controller: LSTM units. slots x width: the memory. read_heads: heads (each reads and writes).
    gamma: usage decay. add_vector: write a separate add vector per head instead of the key.
    compile_step: run each step of the recurrence through torch.compile (the same function up to float rounding,
    in fused kernels; needs a C++ compiler on a CPU, Triton on CUDA, where it is unmeasured). The CPU's LSTM
    baseline is one torch.lstm call and ignores it.
    """

    fused_lstm_devices = ("cpu",)  # where logits() runs the LSTM baseline as one torch.lstm call

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        memory: bool = True,
        controller: int = 200,
        slots: int = 128,
        width: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        add_vector: bool = False,
        compile_step: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("controller", controller), ("slots", slots), ("width", width), ("read_heads", read_heads)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"MANN {key}={value}: must be a positive integer")
        if memory and read_heads > slots:
            raise ValueError(f"MANN read_heads={read_heads} exceeds slots={slots}: each head writes its own slot")
        if not 0 <= gamma <= 1:
            raise ValueError(f"MANN gamma={gamma}: the usage decay must lie in [0, 1]")
        kw = getattr(backbone, "keywords", None) or {}
        if "in_channels" not in kw or "image_size" not in kw:
            raise ValueError("MANN reads raw pixels: its backbone factory must bind in_channels and image_size")
        self.pixels = kw["in_channels"] * kw["image_size"] ** 2
        self.ways = self.fixed_ways = ways  # the label input and the output are `ways` wide
        self.memory, self.slots, self.width, self.heads, self.gamma = bool(memory), slots, width, read_heads, gamma
        self.compile_step, self.add_vector = bool(compile_step), bool(add_vector)
        reads = read_heads * width if self.memory else 0
        self.cell = nn.LSTMCell(self.pixels + ways + reads, controller)
        if self.memory:
            # per head: key, add vector (with add_vector), write gate alpha; lrua_step reads the layout off the shape
            per_head = width * (2 if self.add_vector else 1) + 1
            self.interface = nn.Linear(controller, read_heads * per_head)
        self.out = nn.Linear(controller + reads, ways)

    def extra_repr(self) -> str:
        memory = f"slots={self.slots}, width={self.width}, read_heads={self.heads}, gamma={self.gamma}"
        memory += ", add_vector=True" if self.add_vector else ""
        return f"ways={self.ways}, memory={self.memory}" + (f", {memory}" if self.memory else "")

    def initial_memory(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Empty memory, usage, read weights and reads for x's (T, ...) tasks."""
        tasks = x.shape[0]
        mem = x.new_zeros(tasks, self.slots, self.width)
        # A tiny ramp breaks the first steps' ties, so the fresh slots are 0, 1, 2, ... on every device.
        usage = torch.arange(self.slots, dtype=x.dtype, device=x.device).expand(tasks, -1) * 1e-6
        read_w = x.new_zeros(tasks, self.heads, self.slots)
        return mem, usage, read_w, x.new_zeros(tasks, self.heads * self.width)

    def memory_step(self, h: torch.Tensor, mem, usage, read_w) -> tuple[torch.Tensor, ...]:
        """One LRUA write and read from the controller's h: the new memory, usage, read weights and reads (T, H*W)."""
        return lrua_step(h, mem, usage, read_w, self.interface.weight, self.interface.bias, self.heads, self.gamma)

    def logits(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Images (T, L, D) and previous labels (T, L, ways) -> logits (T, L, ways).

        The same LSTM cell as self.cell step by step, arranged for speed: the part of its input that comes from the
        sequence (image and previous label) does not depend on the recurrence, so it is one matmul over all steps,
        as is the output layer; only the reads and the hidden state are multiplied step by step. On a CPU the LSTM
        baseline, with no reads, is one torch.lstm call (oneDNN, fp32; not on CUDA, where cuDNN's RNN rounds in
        TF32 by default). Per-step matmuls and their per-step weight gradients were most of a meta-batch's time on
        a CPU (scripts/bench_mann.py times this against the step-by-step cell); the rest is the per-step ops'
        overhead, which compile_step cuts by fusing them."""
        tasks = x.shape[0]
        cell = self.cell
        h = x.new_zeros(tasks, cell.hidden_size)
        c = torch.zeros_like(h)
        sequence = torch.cat([x, previous], -1)
        if not self.memory and x.device.type in self.fused_lstm_devices:
            weights = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
            # train=: its kernels by whether a gradient is wanted (dropout is 0), as oneDNN itself decides
            hidden = torch.lstm(
                sequence, (h[None], c[None]), weights, True, 1, 0.0, torch.is_grad_enabled(), False, True
            )
            return self.out(hidden[0])
        w_sequence, w_reads = cell.weight_ih.split(
            [sequence.shape[-1], cell.weight_ih.shape[1] - sequence.shape[-1]], 1
        )
        # unbind, not [:, t]: its backward stacks the steps' gradients once instead of a zero-filled copy per step
        inputs = F.linear(sequence, w_sequence, cell.bias_ih + cell.bias_hh).unbind(1)
        recurrent = (torch.cat([w_reads, cell.weight_hh], 1) if self.memory else cell.weight_hh).t()
        memory = self.initial_memory(x) if self.memory else ()
        interface = (self.interface.weight, self.interface.bias) if self.memory else None
        step_fn = compiled_recurrence() if self.compile_step else recurrence
        states = []
        for step in inputs:
            h, c, memory = step_fn(step, recurrent, h, c, memory, interface, self.heads, self.gamma)
            states.append(torch.cat([h, memory[-1]], -1) if self.memory else h)
        return self.out(torch.stack(states, 1))

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        if episode.num_ways() != self.ways:
            raise ValueError(f"MANN was built for {self.ways} ways, the episode has {episode.num_ways()}")
        with contextlib.nullcontext() if train else torch.no_grad():
            tasks, length = episode.tasks, episode.support_x.shape[1] + episode.query_x.shape[1]
            images = torch.cat([episode.support_x, episode.query_x], 1).flatten(2)
            if train:
                order = torch.rand(tasks, length, device=images.device).argsort(-1)
            else:
                order = eval_order(images)
            x, y, previous, instance = make_sequence(episode, order, self.ways)
            logits = self.logits(x, previous)  # (T, L, ways)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        correct = (logits.detach().argmax(-1) == y).to(x.dtype)  # (T, L)
        instances = length // self.ways
        per_instance = correct.new_zeros(tasks, instances).scatter_add_(1, instance, correct)
        counts = correct.new_zeros(tasks, instances).scatter_add_(1, instance, torch.ones_like(correct))
        later = instance >= 1
        score = (correct * later).sum(1) / later.sum(1).clamp_min(1)
        return AlgoOutput(loss=loss, score=score, step_score=per_instance / counts.clamp_min(1), step_kind="instance")
