"""The lazy penalties: their values, and their control toward a target lazy ratio."""

from __future__ import annotations

import math

from lazypass.config import LazyConfig


def resolve_rhos(cfg: LazyConfig, rho: float | None, rho_attn: float | None, rho_ffn: float | None) -> tuple[float, float]:
    """(rho_attn, rho_ffn): the ones given to fit, else those given to ``apply``."""
    base_a, base_f = (cfg.rho_attn, cfg.rho_ffn) if rho is None else (rho, rho)
    a = base_a if rho_attn is None else rho_attn
    f = base_f if rho_ffn is None else rho_ffn
    for name, v in (("rho_attn", a), ("rho_ffn", f)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(a), float(f)


class RhoController:
    """PI control of log rho toward a lazy ratio, measured on the training rows (fraction of scores above the threshold).

    ``calls`` is the number of model calls of a trajectory: the first never skips at
    inference, so the training rows (which all have a previous step) aim a little higher.
    Without a rho from the user (``auto``), :meth:`start` sets the start from the first
    fidelity so that the lazy loss starts at a tenth of it (the useful rho depends on the
    model's output scale: the paper sweeps 1e-7 to 1e-2); starting higher overshoots, the
    gates lagging behind rho.
    """

    def __init__(self, target: float, calls: int, rhos: tuple[float, float], auto: bool, sites: int):
        self.target = target * calls / (calls - 1)
        base = max(rhos[0], rhos[1])
        self.share = (rhos[0] / base, rhos[1] / base) if base > 0 else (1.0, 1.0)
        self.log_rho = math.log(base) if base > 0 else None
        self.integral = self.log_rho
        self.auto, self.sites = auto or base == 0, sites
        self.ema: float | None = None

    @property
    def rhos(self) -> tuple[float, float]:
        r = math.exp(self.log_rho) if self.log_rho is not None else 0.0
        return r * self.share[0], r * self.share[1]

    def start(self, fidelity: float) -> None:
        self.auto = False
        self.log_rho = self.integral = math.log(max(fidelity, 1e-12) / (5.0 * self.sites))

    def update(self, frac: float) -> None:
        self.ema = frac if self.ema is None else 0.9 * self.ema + 0.1 * frac
        err = self.target - self.ema
        # The integral is slow on purpose: the gates follow rho with a lag (Adam momentum),
        # and AdamW's second moment remembers old gradient sizes, so jumps of rho by orders
        # of magnitude stall the gates; the proportional term reacts at once without winding up.
        self.integral = min(max(self.integral + 0.05 * err, math.log(1e-12)), math.log(1e3))
        self.log_rho = self.integral + 2.0 * err
