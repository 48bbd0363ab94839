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
        max_reuse: ``1``: a branch output may be reused for one step at most, then the branch
            must compute again (a cache is never reused twice in a row). ``None``: no limit
            (the paper's rule). Chained reuse is where learned gates lose quality (see
            docs/digits.md).
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
    max_reuse: int | None = None
    sync_decisions: bool | str | None = None
    sync_group: str | None = None

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
        if self.max_reuse not in (None, 1):
            raise ValueError(f"max_reuse must be None (no limit) or 1, got {self.max_reuse!r}")
        if not isinstance(self.calls_per_step, int) or self.calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an int >= 1, got {self.calls_per_step!r}")
        if self.cache_dtype is not None and self.cache_dtype not in _DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(_DTYPES)} or None, got {self.cache_dtype!r}")

        if self.sync_decisions not in (None, True, False, "sharded", "replicated"):
            raise ValueError(
                f"sync_decisions must be None (auto), True, False, 'sharded' or 'replicated', got "
                f"{self.sync_decisions!r}"
            )
        if self.sync_group is not None and not isinstance(self.sync_group, str):
            raise ValueError(
                f"sync_group must be a process group's name (group.group_name), got {self.sync_group!r}"
            )

    @property
    def cache_torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.cache_dtype) if self.cache_dtype else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, **options) -> "LazyConfig":
        """Build a config from keyword options, refusing unknown ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown lazypass option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)


# Options that change what a gate's score means or when a cache may be used: gates fitted
# under one value are refused under another (``load_gates``).
GATE_OPTIONS = ("max_reuse",)


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
