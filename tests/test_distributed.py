"""Rank-consistent decisions: two gloo processes on loopback, each holding half of the tokens.

The tiny model is sequence parallel the way xDiT is: every rank keeps its own token shard
and the attention all-gathers keys and values from the other ranks (a functional
collective, inside the attention branch).  If one rank skipped that branch while the other
computed it, the second would wait in the all-gather forever; lazypass reduces the
decisions across ranks in the graph so both always agree.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lazypass
from tests.archs import assert_batch_close, random_gates

TOKENS, DIM, BATCH = 8, 16, 3
TIMESTEPS = (900, 700, 500, 300)


def _embed_t(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _Block(nn.Module):
    def __init__(self, dim: int, sequence_parallel: bool):
        super().__init__()
        self.sp = sequence_parallel
        self.ada = nn.Linear(dim, 4 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attn(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if self.sp:  # keys and values of all ranks' tokens
            from torch.distributed import _functional_collectives as funcol

            k = funcol.all_gather_tensor(k.contiguous(), gather_dim=1, group=dist.group.WORLD)
            v = funcol.all_gather_tensor(v.contiguous(), gather_dim=1, group=dist.group.WORLD)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v))

    def forward(self, x, c):
        s1, b1, s2, b2 = self.ada(c)[:, None].chunk(4, dim=-1)
        x = x + self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class ShardedDiT(nn.Module):
    """Token-sequence transformer with adaLN; ``sequence_parallel`` all-gathers K/V across ranks."""

    def __init__(self, sequence_parallel: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.t_mlp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(_Block(DIM, sequence_parallel) for _ in range(2))
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x, t):
        c = self.t_mlp(_embed_t(t, DIM))
        for block in self.blocks:
            x = block(x, c)
        return self.out(x)


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(step))


def _set_gates(model: nn.Module) -> None:
    random_gates(model, seed=5, std=0.3)


def _trajectory(model, shard: slice):
    outs = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x = _inputs(step)[:, shard]
            outs.append(model(x, torch.full((BATCH,), t)))
    st = lazypass.stats(model)
    return outs, st


MODES = ("off", "sharded", "auto")


def _run_mode(rank: int, world: int, mode: str) -> dict:
    shard = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    sp = mode == "auto"  # the model itself communicates; lazypass syncs on its own
    options = {} if mode == "auto" else {"sync_decisions": {"off": False, "sharded": "sharded"}[mode]}
    model = lazypass.apply(ShardedDiT(sequence_parallel=sp).eval(), **{"granularity": "site", **options})
    x0 = _inputs(0)[:, shard]
    lazypass.report(model, x0, torch.full((BATCH,), TIMESTEPS[0]), print_table=False)
    _set_gates(model)
    outs, st = _trajectory(model, shard)
    core = lazypass.runtime.traced_program(model).core
    graphs = [m.graph for m in core.modules() if isinstance(m, torch.fx.GraphModule)]
    ops = sorted({str(n.target) for g in graphs for n in g.nodes if "c10d" in str(n.target)})
    return {"skipped": st.skipped.tolist(), "scores": st.scores.tolist(), "ops": ops,
            "out": torch.stack(outs).tolist()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = {mode: _run_mode(rank, world, mode) for mode in MODES}
        with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, world: int = 2, timeout: float = 240.0) -> list[dict]:
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks did not finish within {timeout:.0f}s: a rank is stuck in a collective")
    out = []
    for r in range(world):
        with open(tmp_path / f"rank_{r}.json") as f:
            out.append(json.load(f))
    return out


def _single_process_reference():
    """The same model and gates on one process, all tokens: the decisions sharding must reproduce."""
    model = lazypass.apply(ShardedDiT(sequence_parallel=False).eval(), granularity="site")
    lazypass.report(model, _inputs(0), torch.full((BATCH,), TIMESTEPS[0]), print_table=False)
    _set_gates(model)
    return _trajectory(model, slice(None))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    results = _spawn(tmp_path_factory.mktemp("ranks"))
    return {mode: [r[mode] for r in results] for mode in MODES}


def test_unsynced_shards_disagree_synced_shards_agree(ranks):
    off = ranks["off"]
    # without syncing, the local gates (each sees half of the tokens) disagree somewhere,
    # which is exactly what would hang a sequence-parallel model
    assert off[0]["skipped"] != off[1]["skipped"], "gates agreed without sync; the test proves nothing"
    assert not off[0]["ops"]

    synced = ranks["sharded"]
    assert synced[0]["skipped"] == synced[1]["skipped"]
    assert synced[0]["scores"] == synced[1]["scores"]
    assert any("all_reduce" in op for op in synced[0]["ops"])
    # the first site reads the same Z as the unsharded model (this model's attention does not
    # gather, so later sites differ): its summed score is the single-process score
    _, ref = _single_process_reference()
    assert_batch_close(torch.tensor(synced[0]["scores"])[:, 0], torch.from_numpy(ref.scores)[:, 0])
    skipped = torch.tensor(synced[0]["skipped"])
    assert skipped.any() and not skipped.all()


def test_sequence_parallel_model_syncs_by_itself_and_matches_one_process(ranks):
    ranks = ranks["auto"]
    assert ranks[0]["skipped"] == ranks[1]["skipped"]
    assert any("all_reduce" in op for op in ranks[0]["ops"])
    assert any("all_gather" in op for op in ranks[0]["ops"])
    ref_outs, ref = _single_process_reference()
    assert ranks[0]["skipped"] == ref.skipped.tolist()
    # the two shards put together are the single-process output at every step
    full = torch.cat([torch.tensor(ranks[0]["out"]), torch.tensor(ranks[1]["out"])], dim=2)
    assert_batch_close(full, torch.stack(ref_outs))
    assert torch.tensor(ranks[0]["skipped"]).any()
