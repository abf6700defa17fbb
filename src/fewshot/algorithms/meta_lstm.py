"""The Meta-Learner LSTM (Ravi & Larochelle, ICLR 2017, "Optimization as a model for few-shot learning").

The paper: a learner (Conv4 with 32 filters and max-pool, cross-entropy) is trained on a task's support set by a
meta-learner, a coordinate-wise two-layer LSTM whose second layer's cell state IS the learner's parameter vector:

    c_t = sigmoid(f_t) * c_{t-1} - sigmoid(i_t) * grad_t
    f_t = W_F . [h_t, c_{t-1}, f_{t-1}] + b_F        i_t = W_I . [h_t, c_{t-1}, i_{t-1}] + b_I

where grad_t is the gradient of the support loss at c_{t-1} and h_t the hidden state of the first layer, an
ordinary LSTM (20 units) reading the preprocessed loss and gradient of its coordinate (Andrychowicz et al. 2016:
x -> (log|x| / p, sign x) if |x| >= e^-p else (-1, e^p x), with p = 10). Every coordinate has its own states and
shares the LSTM's weights. b_F starts in U(4, 5) and b_I in U(-5, -4), so at initialisation the update is SGD with
a small learning rate sigmoid(b_I) and a decay sigmoid(b_F) close to 1. The initial parameters c_0 are learned too.
After T updates the query loss at c_T trains everything with Adam; the loss and gradient inputs are treated as
constants (no second derivatives of the learner), as the paper does. The same T updates run at test.

fewshot's choices, where the paper or the authors' code (twitter/meta-learning-lstm, Lua) leave room:
- c_0 is the learner net's own parameters (self.net), so a checkpoint holds c_0 like any other algorithm's weights.
- f_{t-1} and i_{t-1} fed back to the gates are the pre-activations, as the formula above and the authors' code's
  c_t = sigmoid(f_t) ... reads; they start at 0. (The paper writes the gate values; a monotone squash apart.)
- BatchNorm: the backbones normalise with the current batch's statistics (track_running_stats=False), and
  BatchNorm's scale and shift are coordinates of c like every other weight. In meta-training the queries are
  normalised as one batch per task, as the authors' code does. At validation and test (test_bn="support", the
  default) they are normalised with the support set's statistics under the same weights, not with their own
  batch's: the authors' code resets the learner's running statistics for each task, gathers them over the
  support passes and normalises the queries with them (learner.set('evaluate'), model/lstm/meta-learner-lstm.lua).
  Its running statistics are an average over the passes (BN momentum 0.9 for 1-shot, 0.95 for 5-shot: mostly the
  last pass, at the weights before the last update); here they are the support set's at the weights tested, which
  needs no per-task buffers in the functional learner; its BatchNorm eps is 1e-3 (model/lstm-classifier.lua),
  PyTorch's 1e-5 here. test_bn="batch" normalises the queries as one batch
  (transductive, as fewshot's MAML and the PyTorch port markdtw/meta-learning-lstm-pytorch, which never switches
  to eval mode).
- Each update uses the whole support set: the authors' inner batch (5 for 1-shot, 25 for 5-shot) is the whole
  5-way support set in both settings. The authors' code divides the gradient by the batch size once more; here
  grad_t is the gradient of the mean support loss.
- Tasks of a meta-batch share nothing: the meta-learner runs over all their coordinates at once, and the learner's
  gradients come from a loop over tasks (CPU) or torch.func.vmap (CUDA), see `strategy`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import STRATEGIES, _StatelessCall, resolve_strategy
from fewshot.data.base import Episode


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s input scaling, elementwise: (...,) -> (..., 2).

    (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x): magnitudes spanning many orders of magnitude become
    O(1) inputs, and tiny values keep a linear (not log) code so that 0 is not -inf."""
    big = x.abs() >= math.exp(-p)
    log = torch.log(x.abs().clamp_min(math.exp(-p))) / p  # the clamp only touches the unselected branch
    return torch.stack(
        [torch.where(big, log, torch.full_like(x, -1.0)), torch.where(big, torch.sign(x), math.exp(p) * x)], -1
    )


class MetaLSTM(Algorithm):
    """Ravi & Larochelle's meta-learner LSTM over a meta-batch of tasks; see the module docstring.

    backbone: factory; backbone(out_features=ways) is the learner, its parameters the learned c_0.
    updates: meta-learner updates of the learner on the support set in meta-training (12 for 1-shot, 8 for 5-shot).
    eval_updates: updates at validation/test; None: the same as `updates`. The query accuracy before the first
        and after every update is reported (step_acc).
    hidden_size: units of the first LSTM layer (20 in the paper).
    preprocess_p: p of the log/sign preprocessing (10 in the paper).
    strategy: how the learner's support gradients are taken over tasks: "loop", "vmap" or "auto" (vmap on CUDA,
        loop elsewhere, as fewshot's MAML decides).
    test_bn: how BatchNorm normalises the queries at validation and test: "support" (the support set's statistics
        under the same weights, as the authors' code's running statistics) or "batch" (the queries' own batch).
    """

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        updates: int = 12,
        eval_updates: Optional[int] = None,
        hidden_size: int = 20,
        preprocess_p: float = 10.0,
        strategy: str = "auto",
        test_bn: str = "support",
    ) -> None:
        super().__init__()
        if test_bn not in ("support", "batch"):
            raise ValueError(f"MetaLSTM test_bn must be 'support' or 'batch', got {test_bn!r}")
        if updates < 1 or (eval_updates is not None and eval_updates < 1):
            raise ValueError(
                f"MetaLSTM needs updates >= 1 and eval_updates >= 1 (or null), got {updates}, {eval_updates}"
            )
        if hidden_size < 1:
            raise ValueError(f"MetaLSTM hidden_size must be >= 1, got {hidden_size}")
        if not (math.isfinite(preprocess_p) and preprocess_p > 0):
            raise ValueError(f"MetaLSTM preprocess_p must be a positive number, got {preprocess_p}")
        if strategy not in STRATEGIES:
            raise ValueError(f"MetaLSTM strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.net = backbone(out_features=ways)
        if any(b is not None for b in self.net.buffers()):
            # Running statistics would be updated in place on every learner pass, which the functional learner
            # (one flat vector swapped in per task) does not carry from update to update.
            raise ValueError("MetaLSTM needs a backbone without buffers (BatchNorm with batch statistics)")
        self.ways = ways
        self.fixed_ways = ways  # the learner's head has exactly `ways` outputs
        self.updates = int(updates)
        self.eval_updates = self.updates if eval_updates is None else int(eval_updates)
        self.hidden_size = int(hidden_size)
        self.preprocess_p = float(preprocess_p)
        self.strategy = strategy
        self.test_bn = test_bn
        # Layer 1: an ordinary LSTM over (preprocessed loss, preprocessed gradient) of one coordinate.
        self.lstm = nn.LSTMCell(4, hidden_size)
        # Layer 2: the gates of the cell whose state is the learner, reading [h_t, c_{t-1}, own gate_{t-1}].
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        for gate, (lo, hi) in ((self.forget_gate, (4.0, 5.0)), (self.input_gate, (-5.0, -4.0))):  # bF, bI there
            nn.init.uniform_(gate.weight, -0.01, 0.01)  # as the authors' code: small, so it starts as SGD
            nn.init.uniform_(gate.bias, lo, hi)
        self._layout = [(name, p.shape, p.numel()) for name, p in self.net.named_parameters()]

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, updates={self.updates}, eval_updates={self.eval_updates}, "
            f"hidden_size={self.hidden_size}, preprocess_p={self.preprocess_p}, strategy={self.strategy!r}, "
            f"test_bn={self.test_bn!r}, "
            f"learner_parameters={self.num_learner_parameters}"
        )

    @property
    def num_learner_parameters(self) -> int:
        return sum(n for _, _, n in self._layout)

    # ---- the learner as a function of its flat parameter vector ---------------------------------------------

    def flat_parameters(self) -> torch.Tensor:
        """c_0: the learner's parameters as one vector (P,), differentiable w.r.t. them."""
        return torch.cat([p.reshape(-1) for p in self.net.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P,) -> {parameter name: tensor of its shape}, views of `flat`."""
        out, offset = {}, 0
        for name, shape, n in self._layout:
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out

    def _resolve(self, device: torch.device) -> str:
        return resolve_strategy(self.strategy, device)

    def _learner_call(self, call: _StatelessCall, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return call(self.unflatten(flat), x)

    def _support_gradients(self, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Support loss (T,) and its gradient (T, P) at the learner weights c (T, P), as constants (detached)."""
        call = _StatelessCall(self.net)

        def loss(flat: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._learner_call(call, flat, xt), yt)

        c = c.detach()
        with torch.enable_grad():
            if self._resolve(c.device) == "vmap":
                grads, losses = torch.func.vmap(torch.func.grad_and_value(loss), randomness="error")(c, x, y)
                return losses.detach(), grads.detach()
            losses, grads = [], []
            for t in range(c.shape[0]):
                flat = c[t].clone().requires_grad_()
                value = loss(flat, x[t], y[t])
                grads.append(torch.autograd.grad(value, flat)[0])
                losses.append(value.detach())
        return torch.stack(losses), torch.stack(grads)

    def query_logits(self, c: torch.Tensor, x: torch.Tensor, support_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The learner with weights c (T, P) on x (T, N, C, H, W) -> logits (T, N, ways); differentiable in c.
        With support_x (T, S, C, H, W), BatchNorm normalises x with the support images' statistics."""
        rows = None if support_x is None else support_x.shape[1]
        if rows is not None:
            x = torch.cat([support_x, x], 1)
        call = _StatelessCall(self.net, stats_rows=rows)
        if self._resolve(c.device) == "vmap":
            out = torch.func.vmap(lambda flat, xt: self._learner_call(call, flat, xt), randomness="error")(c, x)
        else:
            out = torch.stack([self._learner_call(call, c[t], x[t]) for t in range(c.shape[0])])
        return out if rows is None else out[:, rows:]

    # ---- the meta-learner ---------------------------------------------------------------------------------

    def step(
        self, c: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, state: Optional[tuple] = None
    ) -> tuple[torch.Tensor, tuple]:
        """One meta-learner update of the learner weights c (T, P) from the support loss (T,) and gradient (T, P).

        state: (h, cell) of layer 1, each (T*P, hidden), and the previous gate pre-activations f, i (T, P);
        None at the first update. Returns c_t and the new state."""
        tasks, params = c.shape
        if state is None:
            zeros = c.new_zeros(tasks, params)
            state = (None, zeros, zeros)
        lstm_state, f_prev, i_prev = state
        p = self.preprocess_p
        inputs = torch.cat([preprocess(loss, p).unsqueeze(1).expand(tasks, params, 2), preprocess(grad, p)], -1)
        h, cell = self.lstm(inputs.reshape(tasks * params, 4), lstm_state)
        hidden = h.view(tasks, params, self.hidden_size)
        f = self.forget_gate(torch.cat([hidden, c.unsqueeze(-1), f_prev.unsqueeze(-1)], -1)).squeeze(-1)
        i = self.input_gate(torch.cat([hidden, c.unsqueeze(-1), i_prev.unsqueeze(-1)], -1)).squeeze(-1)
        return torch.sigmoid(f) * c - torch.sigmoid(i) * grad, ((h, cell), f, i)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, updates: int, query_x: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """c_updates for a meta-batch (support (T, S, C, H, W), (T, S)), differentiable w.r.t. the meta-parameters
        when autograd is on; with query_x, also the query logits before the first and after every update
        (BatchNorm as test_bn says)."""
        tasks = support_x.shape[0]
        c = self.flat_parameters().unsqueeze(0).expand(tasks, -1)
        state, logits = None, []
        stats = support_x if self.test_bn == "support" else None  # whose statistics normalise the queries
        for _ in range(updates):
            if query_x is not None:
                logits.append(self.query_logits(c, query_x, stats))
            loss, grad = self._support_gradients(c, support_x, support_y)
            c, state = self.step(c, loss, grad, state)
        if query_x is not None:
            logits.append(self.query_logits(c, query_x, stats))
        return c, logits

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        if train:
            c, _ = self.adapt(episode.support_x, episode.support_y, self.updates)
            logits = self.query_logits(c, episode.query_x)
            loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
            return AlgoOutput(loss=loss, score=accuracy(logits.detach(), episode.query_y))
        with torch.no_grad():  # no meta-gradient at test; the learner's support gradients enable their own graph
            _, logits = self.adapt(episode.support_x, episode.support_y, self.eval_updates, episode.query_x)
            loss = F.cross_entropy(logits[-1].flatten(0, 1), episode.query_y.flatten())
        steps = torch.stack([accuracy(z, episode.query_y) for z in logits], 1)  # (T, eval_updates + 1)
        return AlgoOutput(loss=loss, score=steps[:, -1], step_score=steps)
