"""The learned gates: one weight vector per site stream and one bias per site."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


class LazyGates(nn.Module):
    """Gate parameters of all sites of a model (``model.lazy_gates``).

    Site ``i`` scores a sample with ``sigmoid(logit)``,
    ``logit = sum_j sum_tokens(Z_j) . weight(i, j) + bias[i] + age[i] * a + drift[i] * d``,
    where ``a`` is the row's cache age and ``d`` the drift of its input since the cache was
    filled (the last two terms only for the ``inputs`` named). Zero parameters give a score
    of exactly 0.5, which never passes the default threshold (a branch skips when the score
    is *above* it), so a fresh model is unchanged. ``layout`` lists ``(kind, dims)`` per
    site; it is the fingerprint saved with the gates.
    """

    def __init__(self, layout: list[tuple[str, tuple[int, ...]]], inputs: tuple[str, ...] = ()):
        super().__init__()
        self.layout = [(kind, tuple(int(d) for d in dims)) for kind, dims in layout]
        self.inputs = tuple(inputs)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.zeros(d)) for _, dims in self.layout for d in dims]
        )
        self.bias = nn.Parameter(torch.zeros(len(self.layout)))
        for name in self.inputs:  # one weight per site for each extra input
            self.register_parameter(name, nn.Parameter(torch.zeros(len(self.layout))))
        self._offsets = []
        k = 0
        for _, dims in self.layout:
            self._offsets.append(k)
            k += len(dims)

    def weight(self, site: int, stream: int) -> nn.Parameter:
        return self.weights[self._offsets[site] + stream]

    def site_index(self, site: int) -> int:
        """Index of site ``site`` in ``bias`` and the per-site input weights (a program with
        fewer sites maps its own, see ``lazypass/sitemap.py``)."""
        return site

    @staticmethod
    def weight_name(site: int, stream: int) -> str:
        return f"lazy_gate_w_{site}_{stream}"

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.layout]

    def fingerprint(self) -> str:
        """Stable hash of the site layout (count, kinds, dims, order)."""
        text = json.dumps(self.layout)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"sites={len(self.layout)}, inputs={self.inputs}, fingerprint={self.fingerprint()}"
