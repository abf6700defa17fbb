"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016).

P(y | x_query, S) = sum_i a(x_query, x_i) onehot(y_i), with a = softmax over the support set of a similarity
between the query embedding f(x_query) and each support embedding g(x_i). Without full context embeddings
f = g = the backbone. With them (Appendix A): g(x_i, S) = forward + backward hidden state of a bidirectional LSTM
over the support embeddings, plus the embedding itself; f(x_query, S) = an attention LSTM run for K steps over the
query embedding, reading from g(S).

The similarity (algo.similarity), and why the default is not the textbook cosine:
- "cosine": c(q, s) = q·s / (|q| |s|), the paper's words. The Conv4 embedding ends in ReLU and max-pool, so
  every cosine lies in [0, 1] and the softmax over the support set is nearly flat (at best e/(e + 4) for a
  5-way 1-shot task): the loss cannot sharpen it, and fewshot measured 88.7% against the paper's 98.1 on
  Omniglot 5-way 1-shot (H100, 20,000 episodes). `algo.scale` multiplies the similarities (a temperature) and
  `algo.learn_scale=true` learns it (metric scaling, Oreshkin et al. 2018).
- "support_cosine" (default): c(q, s) = q·s / |s|, only the support embeddings normalised, as the widely
  copied re-implementations of Matching Networks compute their "cosine" distance. For one query the factor |q|
  is the same for every support item, so the ranking, and with one shot the prediction, are exactly those of
  the cosine; |q| acts as a per-query sharpness the embedding learns, so the attention can become confident.
  It needs no extra parameter or hand-set temperature, and it reached the paper's Omniglot numbers in fewshot's
  own runs (RESULTS.md), which is why it is the default.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.protonet import embed_tasks, one_hot
from fewshot.data.base import Episode

# Probabilities are clamped before the log: a support set can leave a class with (numerically) zero mass.
_EPS = 1e-8


class AttentionLSTM(nn.Module):
    """Appendix A.1's f(x, S) = attLSTM(f'(x), g(S), K):

        h_hat_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k = h_hat_k + f'(x)
        r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)

    The LSTM's recurrent input is the concatenation [h, r] (2D wide) while its state and output are D wide,
    so the cell is written out rather than taken from nn.LSTMCell. Starts from h_0 = f'(x), c_0 = 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.input = nn.Linear(dim, 4 * dim)  # W_x f'(x) + b
        self.recurrent = nn.Linear(2 * dim, 4 * dim, bias=False)  # W_h [h, r]

    def forward(self, query: torch.Tensor, support: torch.Tensor, steps: int) -> torch.Tensor:
        """query (T, Q, D) = f'(x), support (T, S, D) = g(S) -> (T, Q, D) = h_K."""
        x_gates = self.input(query)  # (T, Q, 4D), the same at every step
        h, c = query, torch.zeros_like(query)
        for _ in range(steps):
            attention = (h @ support.transpose(1, 2)).softmax(-1)  # (T, Q, S)
            readout = attention @ support  # (T, Q, D)
            i, f, g, o = (x_gates + self.recurrent(torch.cat([h, readout], -1))).chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh() + query
        return h


SIMILARITIES = ("support_cosine", "cosine")


class MatchingNetworks(Algorithm):
    """Matching Networks with cosine attention.

    fce: full context embeddings (bidirectional LSTM g, attention LSTM f).
    fce_steps: the attention LSTM's processing steps K; None = the number of support examples.
    lstm_layers: layers of the bidirectional support LSTM.
    similarity: support_cosine (default: q·s/|s|) or cosine (q·s/(|q||s|)); see the module docstring.
    scale: the similarities are multiplied by it before the softmax (1 = none).
    learn_scale: learn the scale (stored as its log, so it stays positive), starting from `scale`.
    """

    running_stats_ok = True  # embed_tasks runs the backbone as a module
    # NHWC on a CPU: its tests 1.74-1.83x faster, training 1.11-1.27x (FCE 5w1s, 20w5s) but 0.90x at 5w1s, whose
    # whole run the step times put about 7% slower in NHWC (device.channels_last=false; bench_channels_last.py)
    cpu_channels_last = True

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        fce: bool = False,
        fce_steps: Optional[int] = None,
        lstm_layers: int = 1,
        similarity: str = "support_cosine",
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"MatchingNetworks similarity={similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"MatchingNetworks scale={scale}: must be a positive number")
        if fce_steps is not None and fce_steps < 1:
            raise ValueError(f"MatchingNetworks fce_steps must be >= 1 or None, got {fce_steps}")
        if lstm_layers < 1:
            raise ValueError(f"MatchingNetworks lstm_layers must be >= 1, got {lstm_layers}")
        self.net = backbone(out_features=None)
        self.ways = ways
        self.fce = bool(fce)
        self.fce_steps = fce_steps
        self.lstm_layers = lstm_layers
        self.similarity = similarity
        self.learn_scale = bool(learn_scale)
        log_scale = torch.tensor(math.log(scale))
        if self.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        if self.fce:
            dim = self.net.embedding_dim
            self.support_lstm = nn.LSTM(dim, dim, num_layers=lstm_layers, batch_first=True, bidirectional=True)
            self.query_lstm = AttentionLSTM(dim)

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, fce={self.fce}, fce_steps={self.fce_steps}, lstm_layers={self.lstm_layers}, "
            f"similarity={self.similarity}, scale={self.log_scale.exp().item():.4g}, learn_scale={self.learn_scale}"
        )

    def full_context(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(S) and f(queries, S) from the backbone embeddings (T, S, D), (T, Q, D)."""
        hidden, _ = self.support_lstm(support)  # (T, S, 2D): forward and backward hidden states
        forward, backward = hidden.chunk(2, -1)
        support = forward + backward + support
        steps = self.fce_steps if self.fce_steps is not None else support.shape[1]
        return support, self.query_lstm(query, support, steps)

    def similarities(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """c(query, support) times the scale: (T, S, D), (T, Q, D) -> (T, Q, S)."""
        if self.similarity == "cosine":
            query = F.normalize(query, dim=-1)
        return (query @ F.normalize(support, dim=-1).transpose(1, 2)) * self.log_scale.exp()

    def probabilities(
        self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: Optional[int] = None
    ) -> torch.Tensor:
        """Embeddings (T, S, D), labels (T, S), (T, Q, D) -> P(y | query, S) as (T, Q, ways).

        ways defaults to the constructor's."""
        ways = ways or self.ways
        attention = self.similarities(support, query).softmax(-1)  # (T, Q, S)
        return attention @ one_hot(support_y, ways, attention.dtype)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        with contextlib.nullcontext() if train else torch.no_grad():
            support, query = embed_tasks(self.net, episode.support_x, episode.query_x)
            if self.fce:
                support, query = self.full_context(support, query)
            probs = self.probabilities(support, episode.support_y, query, episode.num_ways())  # (T, Q, ways)
            loss = F.nll_loss(probs.clamp_min(_EPS).log().flatten(0, 1), episode.query_y.flatten())
        return AlgoOutput(loss=loss, score=accuracy(probs.detach(), episode.query_y))
