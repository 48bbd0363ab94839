"""On-policy fitting (``objective="on_policy"``, the default): gates fitted on the lazy model's own runs.

The one-step objective blends in the full model's output of one step earlier, which is not
what a lazy model reuses: after a few skips its cache is older, and a forecast extrapolates
it. Here the fit unrolls the lazy model itself (:class:`LazyRun`): the soft program with
hard decisions, fed the cache state the inference graph keeps (a row's cache is written only
where it computed; age, validity, the pooled ``Z`` of the drift and the forecast inputs
follow ``insert_gates`` exactly, the forecast and drift are computed by the same graph code),
so its decisions are those of ``lazypass.apply``'s model at the same threshold.

Each round samples one batch of noise (``sample_fn``) along the *behaviour* policy (round 0:
every unit skips on evenly spread steps at the target ratio; later rounds: the gates fitted so
far, their threshold set by bisection so they skip the target ratio on that batch), and, for every step ``i >= 1`` and decision unit ``u`` (``LazyConfig.granularity``: one
per call with ``"step"``), measures the counterfactual effect of the decision on the final
sample: unit ``u`` forced to skip at step ``i``, or forced to compute, both continued by the
behaviour policy to the end; ``A = err(skip) - err(compute)``, ``err`` the mean squared error
of the final sample against the full model's sample from the same noise. So each step is
weighted by its effect on the final sample by construction (the teacher is the full model,
run from the student's own states). The gates are then fitted by a cost-sensitive logistic
regression (DAgger-style, on all rounds' data) on what they read at step ``i`` (token sums of
``Z``, cache age, input drift): label "skip" where ``A < lambda * MACs(u)``, weighted by the
clipped margin, ``lambda`` set so the labels hit ``target_ratio`` in MACs (without a target:
``lambda`` = the rho penalty of the unit's sites). Features are standardised for the fit and
folded back into the linear gate; the L2 of the ``Z`` weights is chosen from ``RIDGES`` by
cross-validation over the collected trajectories. Cost per round: about ``U * L**2`` model calls of the batch
for ``L`` calls per trajectory and ``U`` units, without gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lazypass.config import LazyConfig
from lazypass.fitting.sampler import Schedule, Trajectory, guide, guided_inputs
from lazypass.fitting.soft import SoftModel
from lazypass.fitting.source import BatchSource
from lazypass.passes.gating import DRIFT_CAP, EPS

MARGIN_CAP = 3.0
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # L2 of the standardised Z weights, chosen by cross-validation
FOLDS = 4  # folds of the cross-validation, split by sample (trajectory)


@dataclass
class RunState:
    """Cache state of one lazy run, per site (rows of the model batch), as ``insert_gates`` keeps it.

    ``insert_gates`` keeps valid, age and the forecast timesteps once per decision group; here
    every site of a group holds the same values (its skip is the group's, and its valid the AND
    over the group's sites), so the per-site layout mirrors it."""

    caches: list[list[Tensor]]
    prevs: list[list[Tensor]]
    tfill: Tensor  # (sites, B) f32
    tprev: Tensor
    hasprev: Tensor  # (sites, B) bool
    valid: Tensor  # (sites, B) bool
    age: Tensor  # (sites, B) f32
    pools: list[Tensor]  # token means of Z when the cache was filled, per deciding site stream

    def clone(self) -> "RunState":
        return RunState(
            [[c.clone() for c in cs] for cs in self.caches], [[p.clone() for p in ps] for ps in self.prevs],
            self.tfill.clone(), self.tprev.clone(), self.hasprev.clone(), self.valid.clone(), self.age.clone(),
            [p.clone() for p in self.pools],
        )  # fmt: skip


@dataclass
class Features:
    """What the gate of each unit read at one call: token sums of ``Z`` (per stream), age, drift, may."""

    sums: list[list[Tensor]]  # per unit, per stream (B, D)
    age: Tensor  # (units, B)
    drift: Tensor  # (units, B)
    may: Tensor  # (units, B) bool


def _rows(flags: Tensor, like: Tensor) -> Tensor:
    """(B,) per-sample flags or factors as a mask over a site output's rows (sample-major)."""
    if like.shape[0] != flags.shape[0]:
        flags = flags.repeat_interleave(like.shape[0] // flags.shape[0])
    return flags.reshape((-1,) + (1,) * (like.dim() - 1))


class LazyRun:
    """The lazy model's sampling calls with inference semantics, through the soft program.

    ``start(x, t, cond)`` is the first call (every row computes) and returns the prediction
    and a fresh :class:`RunState`; ``call(state, x, t, cond, thresholds, compute)`` is any
    later call: a row of site ``i`` skips where its deciding site's score is above
    ``thresholds[i]`` and it may (valid cache, ``max_age``, not ``compute[i]``); the state is
    updated in place. Returns the prediction, ``skip`` (sites, B) and the gates' features.
    """

    def __init__(self, soft: SoftModel, cfg: LazyConfig):
        self.soft, self.cfg = soft, cfg
        self.n_sites = 0

    def _layout(self) -> None:
        prog = self.soft.program
        self.n_sites = len(prog.sites)
        self.leaders = self.cfg.group_of(self.n_sites)
        self.units = sorted(set(self.leaders))
        self.unit_sites = [[i for i, lead in enumerate(self.leaders) if lead == u] for u in self.units]
        self.streams = [len(s.dims) for s in prog.sites]
        self.forecast = any(spec.name.startswith("lazy_tfill_") for spec in prog.state_specs)
        macs = torch.tensor([float(s.macs) for s in prog.sites], dtype=torch.float64)
        self.site_macs = macs / macs.sum()  # share of a call's branch MACs
        self.unit_macs = torch.stack([self.site_macs[ss].sum() for ss in self.unit_sites])
        self.kinds = [s.kind for s in prog.sites]
        # offsets of each unit's streams in the flat lists of token means / sums
        self.unit_slices, k = [], 0
        for u in self.units:
            self.unit_slices.append(slice(k, k + self.streams[u]))
            k += self.streams[u]

    @torch.no_grad()
    def start(self, x: Tensor, t: Tensor, cond) -> tuple[Tensor, RunState]:
        full = self.soft.full(x, t, cond)
        if self.n_sites == 0:
            self._layout()
        fz = self._per_site(full.branch_outputs)
        dtype = self.cfg.cache_torch_dtype
        caches = [[f.to(dtype or f.dtype) for f in fs] for fs in fz]
        B = x.shape[0]  # rows of the model batch (both halves with guidance)
        finite = torch.stack([self._finite([caches[k] for k in self.unit_sites[self.units.index(lead)]])
                              for lead in self.leaders])  # per group, as insert_gates
        tg = full.t if full.t is not None else torch.zeros(B, device=x.device)
        zeros = torch.zeros(self.n_sites, B, device=x.device)
        state = RunState(
            caches, [[torch.zeros_like(c) for c in cs] for cs in caches], tg.expand(self.n_sites, B).clone(),
            zeros.clone(), torch.zeros_like(finite), finite, zeros.clone(), [p.clone() for p in full.pooled],
        )  # fmt: skip
        return full.prediction, state

    @torch.no_grad()
    def call(self, state: RunState, x: Tensor, t: Tensor, cond, thresholds: Tensor, compute: Tensor):
        natural = state.valid.clone()  # where inference may skip: the gates' features and training rows
        if self.cfg.max_age is not None:
            natural = natural & (state.age < self.cfg.max_age)
        may = natural & ~compute[:, None]  # where this call may skip (forced computes removed)
        out_dtypes = self._out_dtypes
        reuse = [c.to(d) for c, d in zip((c for cs in state.caches for c in cs), out_dtypes)]
        prev = [p for ps in state.prevs for p in ps]
        forecast = None
        if self.forecast:
            forecast = dict(prev=[p.to(d) for p, d in zip(prev, out_dtypes)], tfill=state.tfill, tprev=state.tprev,
                            hasprev=state.hasprev)
        out = self.soft.soft(x, t, cond, reuse, may=may, age=state.age, pools=state.pools, hard=True,
                             threshold=thresholds, forecast=forecast)
        skip = (out.scores > thresholds.to(out.scores.device)[:, None]) & may
        feats = self._features(out, state, natural)
        self._update(state, self._per_site(out.branch_outputs), out, skip)
        return out.prediction, skip, feats

    # -- internals ---------------------------------------------------------------------------
    @property
    def _out_dtypes(self):
        return [d for ds in self._dtypes for d in ds]

    def _per_site(self, flat: list[Tensor]) -> list[list[Tensor]]:
        out, k = [], 0
        for n in self.streams:
            out.append(list(flat[k : k + n]))
            k += n
        self._dtypes = [[f.dtype for f in fs] for fs in out]
        return out

    @staticmethod
    def _finite(sites: list[list[Tensor]]) -> Tensor:
        """(B,) bool: the group's rows are finite, checked as ``insert_gates`` does (fp32 sums per
        row, added per site, summed over the group's sites, and the total finite)."""
        totals = []
        for outs in sites:
            site = None
            for o in outs:
                s = o.reshape(o.shape[0], -1).sum(1, dtype=torch.float32)
                site = s if site is None else site + s
            totals.append(site)
        return torch.isfinite(totals[0] if len(totals) == 1 else torch.stack(totals).sum(0))

    def _features(self, out, state: RunState, may: Tensor) -> Features:
        sums, ages, drifts, mays = [], [], [], []
        for u, sl in zip(self.units, self.unit_slices):
            sums.append([s.float() for s in out.sums[sl]])
            ages.append(state.age[u])
            total = 0.0
            for mean, pool in zip(out.pooled[sl], state.pools[sl] if state.pools else out.pooled[sl]):
                total = total + (mean - pool).norm(dim=1) / (pool.norm(dim=1) + EPS)
            drift = (total / max(sl.stop - sl.start, 1)).clamp(max=DRIFT_CAP)
            drifts.append(torch.where(may[u], drift, torch.zeros_like(drift)))
            mays.append(may[u])
        return Features(sums, torch.stack(ages), torch.stack(drifts), torch.stack(mays))

    def _update(self, state: RunState, fz: list[list[Tensor]], out, skip: Tensor) -> None:
        t = out.t
        dtype = self.cfg.cache_torch_dtype
        new = [[f.to(dtype or f.dtype) for f in fs] for fs in fz]
        # a decision group shares one row state: a row is valid where every site of the group
        # computed finite values for it (insert_gates)
        finite = {}
        for sites in self.unit_sites:
            ok = self._finite([new[i] for i in sites])
            finite.update((i, ok) for i in sites)
        for i in range(self.n_sites):
            sk = skip[i]
            for j, f in enumerate(new[i]):
                old = state.caches[i][j]
                mask = _rows(sk, old)
                if self.forecast:  # as the inference graph: an invalid old cache is not a prev
                    before = torch.where(_rows(state.valid[i], old), old, f)
                    state.prevs[i][j] = torch.where(mask, state.prevs[i][j], before)
                state.caches[i][j] = torch.where(mask, old, f)
            if self.forecast:
                state.tprev[i] = torch.where(sk, state.tprev[i], state.tfill[i])
                state.tfill[i] = torch.where(sk, state.tfill[i], t)
                state.hasprev[i] = torch.where(sk, state.hasprev[i], state.valid[i])
            state.valid[i] = torch.where(sk, state.valid[i], finite[i])
            state.age[i] = torch.where(sk, state.age[i] + 1, torch.zeros_like(state.age[i]))
        # pools: the deciding sites' token means where the row computed
        for u, sl in zip(self.units, self.unit_slices):
            for k in range(sl.start, sl.stop):
                if state.pools:
                    state.pools[k] = torch.where(skip[u][:, None], state.pools[k], out.pooled[k])


@dataclass
class Decisions:
    """How one call decides: a threshold per site (-1: skip where it may) and forced computes."""

    thresholds: Tensor
    compute: Tensor


@dataclass
class Collected:
    """Training points: per unit, features and counterfactual costs of the rows that may skip."""

    sums: list[list[list[Tensor]]] = field(default_factory=list)  # unit -> chunks -> streams
    age: list[list[Tensor]] = field(default_factory=list)
    drift: list[list[Tensor]] = field(default_factory=list)
    cost: list[list[Tensor]] = field(default_factory=list)
    sample: list[list[Tensor]] = field(default_factory=list)  # which trajectory each point comes from
    total_rows: float = 0.0  # rows of every decision, valid or not (the budget counts them all)


class OnPolicy:
    """The on-policy fit: rollouts of the lazy model, counterfactual costs, cost-sensitive gates."""

    def __init__(self, soft: SoftModel, cfg: LazyConfig, source: BatchSource, schedule: Schedule,
                 guidance_scale: float, target: float | None, rhos: tuple[float, float]):
        self.soft, self.cfg, self.source, self.schedule = soft, cfg, source, schedule
        self.scale, self.guided = guidance_scale, guidance_scale != 1.0
        self.target, self.rhos = target, rhos
        self.run = LazyRun(soft, cfg)
        self.L = schedule.calls
        self.data: Collected | None = None
        self.logit_threshold: float | None = None  # behaviour of later rounds (gate logit)
        self.samples = 0  # trajectories collected so far (the cross-validation's groups)
        self.ridges: list[float] = []  # the L2 the cross-validation chose, per fit

    # -- sampling ------------------------------------------------------------------------------
    def _inputs(self, traj: Trajectory, x: Tensor, i: int, batch: dict):
        t = traj.timesteps[i].to(x.device).expand(x.shape[0])
        return guided_inputs(traj.model_input(x, i), t, batch.get("cond"), batch.get("null_cond"), self.guided)

    def _spread(self, i: int) -> bool:
        r = 0.5 if self.target is None else self.target
        return math.floor((i + 1) * r + 1e-9) > math.floor(i * r + 1e-9)

    def _behaviour(self, i: int, device) -> Decisions:
        S = self.run.n_sites
        if self.logit_threshold is None:  # round 0: fixed spread schedule
            skip = self._spread(i)
            return Decisions(torch.full((S,), -1.0 if skip else 2.0, device=device),
                             torch.full((S,), not skip, dtype=torch.bool, device=device))
        thr = torch.sigmoid(torch.tensor(self.logit_threshold, dtype=torch.float32))
        return Decisions(thr.expand(S).clone().to(device), torch.zeros(S, dtype=torch.bool, device=device))

    def _forced(self, d: Decisions, u: int, skip: bool) -> Decisions:
        thr, comp = d.thresholds.clone(), d.compute.clone()
        sites = self.run.unit_sites[u]
        if skip:
            thr[sites], comp[sites] = -1.0, False
        else:
            comp[sites] = True
        return Decisions(thr, comp)

    def _step(self, state, traj, x, i, batch, d: Decisions):
        xi, ti, ci = self._inputs(traj, x, i, batch)
        pred, skip, feats = self.run.call(state, xi, ti, ci, d.thresholds, d.compute)
        return traj.step(guide(pred, self.guided, self.scale), i, x), skip, feats

    def _continue(self, state, traj, x, i0, batch, override=None) -> Tensor:
        for i in range(i0, self.L):
            d = self._behaviour(i, x.device)
            if i == i0 and override is not None:
                d = self._forced(d, *override)
            x, _, _ = self._step(state, traj, x, i, batch, d)
        return x

    @torch.no_grad()
    def full_sample(self, batch: dict) -> Tensor:
        traj = self.schedule.trajectory()
        x = batch["noise"] * traj.init_noise_sigma
        for i in range(self.L):
            xi, ti, ci = self._inputs(traj, x, i, batch)
            x = traj.step(guide(self.soft.full(xi, ti, ci).prediction, self.guided, self.scale), i, x)
        return x

    @torch.no_grad()
    def behaviour_ratio(self, batch: dict) -> float:
        """Lazy ratio (in MACs) of the behaviour policy sampling ``batch``."""
        traj = self.schedule.trajectory()
        x = batch["noise"] * traj.init_noise_sigma
        xi, ti, ci = self._inputs(traj, x, 0, batch)
        pred, state = self.run.start(xi, ti, ci)
        x = traj.step(guide(pred, self.guided, self.scale), 0, x)
        skipped = 0.0
        for i in range(1, self.L):
            x, skip, _ = self._step(state, traj, x, i, batch, self._behaviour(i, x.device))
            skipped += float((skip.double().mean(1).cpu() * self.run.site_macs).sum())
        return skipped / self.L

    def aim(self, batch: dict, tries: int = 8) -> None:
        """Set the behaviour's logit threshold so it skips ``target_ratio`` on ``batch`` (bisection):
        the rollouts then visit the states the calibrated gates will visit at inference."""
        if self.target is None or self.logit_threshold is None:
            return
        lo, hi = -30.0, 30.0  # logit thresholds giving too many / too few skips
        best = None
        for _ in range(tries):
            mid = self.logit_threshold
            r = self.behaviour_ratio(batch)
            if best is None or abs(r - self.target) < abs(best[1] - self.target):
                best = (mid, r)
            if abs(r - self.target) <= 0.01:
                break
            if r > self.target:
                lo = mid
            else:
                hi = mid
            self.logit_threshold = 0.5 * (lo + hi)
        self.logit_threshold = best[0]

    @torch.no_grad()
    def collect(self, batch: dict) -> tuple[float, float]:
        """One round's rollouts on ``batch``; returns (final-sample error, lazy ratio in MACs) of the behaviour."""
        self.aim(batch)
        ref = self.full_sample(batch)
        traj = self.schedule.trajectory()
        x = batch["noise"] * traj.init_noise_sigma
        xi, ti, ci = self._inputs(traj, x, 0, batch)
        pred, state = self.run.start(xi, ti, ci)
        x = traj.step(guide(pred, self.guided, self.scale), 0, x)
        U = len(self.run.units)
        if self.data is None:
            self.data = Collected(*([[] for _ in range(U)] for _ in range(5)))
        rows = x.shape[0] * (2 if self.guided else 1)  # a guided sample has a row in each half
        sample = self.samples + torch.arange(rows, device=x.device) % x.shape[0]
        self.samples += x.shape[0]
        skipped = 0.0
        for i in range(1, self.L):
            costs = []
            for u in range(U):
                err = {}
                for skip in (True, False):
                    xe = self._continue(state.clone(), copy.deepcopy(traj), x.clone(), i, batch, (u, skip))
                    err[skip] = _error(xe, ref)
                cost = err[True] - err[False]
                costs.append(torch.cat([cost, cost]) if self.guided else cost)
            x, skip, feats = self._step(state, traj, x, i, batch, self._behaviour(i, x.device))
            skipped += float((skip.double().mean(1).cpu() * self.run.site_macs).sum())
            for u in range(U):
                m = feats.may[u]
                self.data.sums[u].append([s[m] for s in feats.sums[u]])
                self.data.age[u].append(feats.age[u][m])
                self.data.drift[u].append(feats.drift[u][m])
                self.data.cost[u].append(costs[u].to(m.device)[m])
                self.data.sample[u].append(sample.to(m.device)[m])
            self.data.total_rows += float(feats.may.shape[1])
        return float(_error(x, ref).mean()), skipped / self.L

    # -- the gate fit --------------------------------------------------------------------------
    def fit(self, steps: int, lr: float, gates) -> list[float]:
        """Cost-sensitive logistic fit of every unit's gate on all data so far; writes ``gates``."""
        data, run = self.data, self.run
        U = len(run.units)
        macs = run.unit_macs.float()
        use_age, use_drift = "age" in self.cfg.gate_inputs, "drift" in self.cfg.gate_inputs
        Z = [torch.cat([torch.cat(list(s), 1) for s in data.sums[u]]) if data.sums[u] else None for u in range(U)]
        A = [torch.cat(data.age[u]) for u in range(U)]
        Dr = [torch.cat(data.drift[u]) for u in range(U)]
        C = [torch.cat(data.cost[u]).double() for u in range(U)]
        n = [len(c) for c in C]
        if sum(n) == 0:
            raise RuntimeError("on-policy fit: no call had a valid cache to skip; use more num_inference_steps")
        M = torch.cat([macs[u].double().expand(n[u]) for u in range(U)])
        Call = torch.cat(C)
        if self.target is not None:
            target = min(self.target * self.L / (self.L - 1), 1.0)  # the first call never skips
            key = Call / M
            order = torch.argsort(key)
            cum = torch.cumsum(M[order], 0) / max(data.total_rows, 1.0)
            k = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
            lam = float(key[order[min(max(k, 0), len(order) - 1)]]) if k > 0 else float(key[order[0]]) - 1.0
            price = lam * M
        else:  # the penalty of the unit's sites, as in the paper's loss
            per_site = torch.tensor([self.rhos[0] if kd == "attn" else self.rhos[1] for kd in run.kinds],
                                    dtype=torch.float64)
            price = torch.cat([per_site[run.unit_sites[u]].sum().expand(n[u]) for u in range(U)])
        scale = float((price - Call).abs().median()) + 1e-30
        margin = ((price - Call) / scale).float()
        y = (margin > 0).float()
        wt = margin.abs().clamp(max=MARGIN_CAP) + 0.05
        # standardised features, one linear model per unit
        norms, offs = [], [0]
        for u in range(U):
            offs.append(offs[-1] + n[u])
            z = Z[u] if Z[u] is not None else torch.zeros(0, 1)
            mu, sd = (z.mean(0), z.std(0).clamp_min(1e-4)) if n[u] > 1 else (torch.zeros(z.shape[1]), torch.ones(z.shape[1]))
            a_sd = A[u].std().clamp_min(0.5) if n[u] > 1 else torch.tensor(1.0)
            d_sd = Dr[u].std().clamp_min(1e-3) if n[u] > 1 else torch.tensor(1.0)
            norms.append((mu, sd, a_sd, d_sd))
        feats = [((Z[u] - norms[u][0]) / norms[u][1], A[u] / norms[u][2], Dr[u] / norms[u][3]) for u in range(U)]

        def logits(params, u):
            w, b, a, d = params[u]
            z, ag, dr = feats[u]
            out = z @ w + b
            if use_age:
                out = out + a * ag
            if use_drift:
                out = out + d * dr
            return out

        def weighted_bce(params, u, weight):
            sl = slice(offs[u], offs[u + 1])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits(params, u), y[sl], reduction="none")
            return (weight[sl] * bce).sum()

        def train(ridge: float, keep: Tensor | None) -> tuple[list, list[float]]:
            """The weighted logistic fit on the rows in ``keep`` (all if None), L2 ``ridge`` on the Z weights."""
            weight = wt if keep is None else wt * keep
            norm = weight.sum().clamp_min(1e-30)
            params = [[torch.zeros(feats[u][0].shape[1], requires_grad=True)]
                      + [torch.zeros((), requires_grad=True) for _ in range(3)] for u in range(U)]
            opt = torch.optim.Adam([p for ps in params for p in ps], lr=lr)
            log = []
            for _ in range(steps):
                total = 0.0
                for u in range(U):
                    if n[u] == 0:
                        continue
                    total = total + weighted_bce(params, u, weight) / norm + ridge * params[u][0].pow(2).sum()
                opt.zero_grad()
                total.backward()
                opt.step()
                log.append(float(total.detach()))
            return params, log

        ridge = self._ridge(train, weighted_bce, torch.cat([torch.cat(data.sample[u]) for u in range(U)]), wt, n)
        self.ridges.append(ridge)
        params, log = train(ridge, None)
        with torch.no_grad():
            lg = torch.cat([logits(params, u) for u in range(U)])
            theta = 0.0
            if self.target is not None:  # behaviour threshold: the logit quantile that skips the target MACs
                order = torch.argsort(lg, descending=True)
                cum = torch.cumsum(M[order], 0) / max(data.total_rows, 1.0)
                k = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
                theta = float(lg[order[min(max(k, 0), len(order) - 1)]]) if k > 0 else float(lg.max()) + 1.0
            # centre the decision on logit 0 and bring the logits to a range where fp32 scores stay distinct
            spread = float((lg - theta).std()) if len(lg) > 1 else 1.0
            shrink = max(spread / 2.0, 1.0) if math.isfinite(spread) else 1.0
            self._write(gates, params, norms, theta, shrink, use_age, use_drift)
        self.logit_threshold = 0.0
        return log

    @staticmethod
    def _ridge(train, weighted_bce, sample: Tensor, wt: Tensor, n: list[int]) -> float:
        """The L2 of ``RIDGES`` with the least held-out weighted loss, folds split by sample.

        A few trajectories give few points per feature (a batch of 4 samples, 5 decisions each,
        against 2 x 16 token-sum features): with a weak L2 the gate then keys on what tells the
        training samples apart (their noise, their prompt), which sets each sample's decisions
        on all its steps at once and does not carry over to other samples.
        """
        groups = torch.unique(sample)
        if len(RIDGES) == 1 or len(groups) < 2:
            return RIDGES[0]
        folds = min(FOLDS, len(groups))
        fold = torch.searchsorted(groups, sample) % folds
        losses = []
        for ridge in RIDGES:
            held = 0.0
            for k in range(folds):
                test = fold == k
                params, _ = train(ridge, (~test).float())
                with torch.no_grad():
                    held += sum(float(weighted_bce(params, u, wt * test)) for u in range(len(n)) if n[u])
            losses.append(held)
        return RIDGES[min(range(len(RIDGES)), key=losses.__getitem__)]

    def _write(self, gates, params, norms, theta, shrink, use_age, use_drift) -> None:
        run = self.run
        for u, site in enumerate(run.units):
            w, b, a, d = (p.detach() for p in params[u])
            mu, sd, a_sd, d_sd = norms[u]
            W = w / sd
            bias = b - (mu * W).sum() - theta
            k = 0
            for j in range(run.streams[site]):
                p = gates.weight(site, j)
                dim = p.shape[0]
                p.copy_((W[k : k + dim] / shrink).to(p.dtype))
                k += dim
            gates.bias[site] = float(bias) / shrink
            if use_age:
                gates.age[site] = float(a / a_sd) / shrink
            if use_drift:
                gates.drift[site] = float(d / d_sd) / shrink


def _error(x: Tensor, ref: Tensor) -> Tensor:
    """Mean squared error per sample, fp32."""
    return (x.float() - ref.float()).pow(2).flatten(1).mean(1)
