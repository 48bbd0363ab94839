"""``LazyConfig``: every option of lazypass in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LazyConfig:
    """Options of the lazy pass (LazyDiT, Shen et al., AAAI 2025, arXiv 2412.12444).

    Args:
        rho: lazy-penalty weight of the paper's eq. (5), used for both kinds of site
            unless ``rho_attn`` / ``rho_ffn`` are given.
        rho_attn: penalty for attention sites (defaults to ``rho``).
        rho_ffn: penalty for MLP sites (defaults to ``rho``).
        threshold: a sample skips a branch when its gate score is above this (0.5 in the
            paper). Above 1 nothing skips; below 0 everything skips once caches are valid.
        calls_per_step: how many model calls may share one timestep with their own
            caches (2 covers pipelines that run the conditional and unconditional
            passes separately). Further calls at the same timestep compute in full.
        timestep_arg: name of the forward argument that carries the timestep; by default
            the input that feeds the sinusoidal timestep embedding is found in the graph.
        cache_dtype: dtype caches are kept in ("float16", "bfloat16"), default the
            branch output dtype.
        min_site_macs: branches with fewer multiply-accumulates per call are left alone.
        max_age: a row may reuse a branch's cache for at most this many calls in a row (a
            per-row counter of calls at its cache slot since it last computed); ``1`` never
            reuses a cache twice in a row; ``None``: no cap (the paper's rule).
        reuse: what a skipped branch returns: ``"copy"``, its cached output (the paper), or
            ``"forecast"`` (default, measured better on the digits DiT: docs/digits.md), a first-order extrapolation from the row's last two computed
            outputs and their timesteps (TaylorSeer-style; a copy until the row has computed
            twice, and for models without a timestep input).
        granularity: which branches share one decision: ``"site"`` (every branch has its
            own gate), ``"step"`` (default, measured better on the digits DiT: the first
            site's gate decides for every site of the call),
            or an int ``k`` (groups of ``k`` consecutive sites, decided by the first of each
            group). A site whose cache is not valid computes whatever its group decides.
        gate_inputs: what a gate reads besides ``Z``: ``"age"`` (the row's cache age) and
            ``"drift"`` (the relative change of the token-mean of ``Z`` since the row's cache
            was filled), each with one learned weight per site.
        sync_decisions: make every rank of a ``torch.distributed`` group take the same
            skip decision, so no rank waits forever in a collective inside a branch that
            another rank skipped. ``"sharded"`` (or ``True``): ranks hold different token
            shards (sequence parallel, as xDiT does); the gate's token sums are summed over
            the ranks, so the scores are those of the unsharded model, and a sample skips
            only where every rank may skip. ``"replicated"``: every rank sees all tokens
            (tensor parallel); only the skip flags are combined. ``False``: never.
            ``None`` (default): ``"sharded"`` when the process group is initialised with
            more than one rank *and* the traced model itself holds collectives (its ranks
            already run in lockstep); otherwise off, since data-parallel ranks that sample
            independently must not wait for each other.
        batch_compute: what a branch computes when some samples of the batch skip it and others
            do not: ``"full"`` runs it on the whole batch and the samples that skip take their
            cached rows; ``"compact"`` gathers the samples that compute, runs the branch on
            those rows alone and scatters them back, so compute saved follows per-sample
            decisions (rows are padded up to a few fixed counts, ``passes.insert_gates.buckets``:
            quarters of the batch and powers of two below the first, so compiled graphs hold a
            fixed number of variants whatever the decisions); ``"auto"`` (default): compact at
            4 samples per call or more, where it measured faster (``benchmarks/overhead.py
            --parts 3``), full below. Either way a sample's result does not depend on the rest
            of its batch.
        sync_group: name of the process group to synchronise over (``group.group_name``,
            e.g. xDiT's sequence-parallel group); default the world group.

    Example:
        >>> LazyConfig(rho=1e-2).rho_attn
        0.01
    """

    rho: float = 1e-2
    rho_attn: float | None = None
    rho_ffn: float | None = None
    threshold: float = 0.5
    calls_per_step: int = 2
    timestep_arg: str | None = None
    cache_dtype: str | None = None
    min_site_macs: int = 0
    max_age: int | None = None
    reuse: str = "forecast"
    granularity: str | int = "step"
    gate_inputs: tuple[str, ...] = ("age", "drift")
    sync_decisions: bool | str | None = None
    sync_group: str | None = None
    batch_compute: str = "auto"

    def __post_init__(self):
        if self.rho_attn is None:
            object.__setattr__(self, "rho_attn", self.rho)
        if self.rho_ffn is None:
            object.__setattr__(self, "rho_ffn", self.rho)
        for name in ("rho", "rho_attn", "rho_ffn"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        check_threshold(self.threshold)
        if self.max_age is not None and (isinstance(self.max_age, bool) or not isinstance(self.max_age, int)
                                         or self.max_age < 1):
            raise ValueError(f"max_age must be None (no cap) or an int >= 1, got {self.max_age!r}")
        if self.reuse not in REUSE:
            raise ValueError(f"reuse must be one of {REUSE}, got {self.reuse!r}")
        g = self.granularity
        if not (g in ("site", "step") or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)):
            raise ValueError(f'granularity must be "site", "step" or an int >= 1 (sites per group), got {g!r}')
        inputs = tuple(self.gate_inputs)
        if not set(inputs) <= set(GATE_INPUTS) or len(set(inputs)) != len(inputs):
            raise ValueError(f"gate_inputs must be distinct names among {GATE_INPUTS}, got {self.gate_inputs!r}")
        object.__setattr__(self, "gate_inputs", tuple(x for x in GATE_INPUTS if x in inputs))
        if not isinstance(self.calls_per_step, int) or self.calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an int >= 1, got {self.calls_per_step!r}")
        if self.cache_dtype is not None and self.cache_dtype not in _DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(_DTYPES)} or None, got {self.cache_dtype!r}")

        if self.batch_compute not in BATCH_COMPUTE:
            raise ValueError(
                f"batch_compute must be one of {BATCH_COMPUTE} (what a branch computes when only some samples "
                f"skip it), got {self.batch_compute!r}"
            )
        if self.sync_decisions not in (None, True, False, "sharded", "replicated"):
            raise ValueError(
                f"sync_decisions must be None (auto), True, False, 'sharded' or 'replicated', got "
                f"{self.sync_decisions!r}"
            )
        if self.sync_group is not None and not isinstance(self.sync_group, str):
            raise ValueError(
                f"sync_group must be a process group's name (group.group_name), got {self.sync_group!r}"
            )

    def compacts(self, batch: int) -> bool:
        """Whether branches compute only the rows that need them, for ``batch`` samples per call."""
        return self.batch_compute == "compact" or (self.batch_compute == "auto" and batch >= COMPACT_FROM)

    @property
    def cache_torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.cache_dtype) if self.cache_dtype else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gate_inputs"] = list(self.gate_inputs)
        return d

    def group_of(self, n_sites: int) -> list[int]:
        """The site that decides for each site (itself with ``granularity="site"``)."""
        g = self.granularity
        size = 1 if g == "site" else n_sites if g == "step" else g
        return [(i // size) * size for i in range(n_sites)]

    @classmethod
    def from_options(cls, **options) -> "LazyConfig":
        """Build a config from keyword options, refusing unknown ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        if "max_reuse" in options:
            raise TypeError("max_reuse was replaced by max_age (max_reuse=1 is max_age=1)")
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown lazypass option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)


# Options that change what a gate's score means or when a cache may be used: gates fitted
# under one value are refused under another (``load_gates``).
GATE_OPTIONS = ("max_age", "reuse", "granularity", "gate_inputs")
GATE_INPUTS = ("age", "drift")
REUSE = ("copy", "forecast")
BATCH_COMPUTE = ("auto", "full", "compact")
COMPACT_FROM = 4  # batch_compute="auto" compacts from this many samples per call


def check_threshold(threshold) -> float:
    """Thresholds are compared with sigmoid scores in (0, 1); values outside [-1, 2] are typos."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not -1.0 <= threshold <= 2.0:
        raise ValueError(
            f"threshold {threshold} is outside [-1, 2]: gate scores lie in (0, 1), so use a value in "
            "(0, 1) to gate, > 1 (e.g. 1.5) to never skip, or < 0 (e.g. -0.5) to always skip"
        )
    return float(threshold)
