"""Cache writes for compiled calls: only the rows that computed are written.

``insert_gates`` writes every site's cache with ``index_copy_`` of ``where(skip, old row, new
output)`` after the site's ``cond``: a plain graph (torch.export, ONNX, TensorRT) has no way to
write a state only where a branch ran, since ``cond`` branches may not mutate their inputs. So
a call where every row skipped still reads the cache, the previous output and the branch
output and writes the cache and the previous output back unchanged: with Inductor that was
most of such a call's time on the CPU (DiT-S/2: ~7 MB moved per site and call), and it costs
as much on every computing call too.

This pass, for the graph dynamo traces (``lazypass/compiled.py``), replaces those writes by
one call per site of ``lazypass::put_rows``, an in-place op that Inductor leaves as it is
(auto-functionalized, then re-inplaced): it writes nothing when every row skipped, and moves
each written row once otherwise. The values the state holds afterwards are the same, row by
row, as those of the writes it replaces. It needs the slot and the row flags on the host: they
are packed into one int64 tensor per decision group, copied to the host once (a GPU's one
sync per group for its writes), and every site of the group reads that host tensor.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lazypass.ops import value
from lazypass.passes.insert_gates import WRITE


# torch.library.custom_op would cost ~65 us per call in Python wrappers, 24 times per DiT-S/2 call;
# a plain definition with a CompositeExplicitAutograd kernel costs ~5 us
_LIB = torch.library.Library("lazypass", "DEF")
_LIB.define("put_rows(Tensor(a!) cache, Tensor(b!)? prev, Tensor flags, Tensor new) -> ()")


def put_rows(cache: torch.Tensor, prev: torch.Tensor | None, flags: torch.Tensor, new: torch.Tensor) -> None:
    """Rows that computed of ``cache[slot]`` take ``new``; with ``prev``, their old cache row
    first goes to ``prev[slot]`` where valid (``new`` where not).

    ``flags`` (int64, on the host) is ``[slot, skip_0 .. skip_B-1]``, then ``valid_0 .. valid_B-1``
    with ``prev``: packed once per decision group (``host_flags``), so that the sites of a group
    share one device-to-host read and each reads a host tensor.
    """
    host = flags.tolist()
    s = host[0]
    batch = (len(host) - 1) // (2 if prev is not None else 1)
    skips, fresh = host[1:1 + batch], host[1 + batch:]
    if all(skips):
        return
    row, rows_per_sample = cache[s], cache.shape[1] // batch
    if prev is not None:
        if not any(skips) and all(fresh):
            prev[s].copy_(row)
        else:
            keep = _mask(skips, row, rows_per_sample)
            prev[s].copy_(torch.where(keep, prev[s], torch.where(_mask(fresh, row, rows_per_sample), row, new)))
    if not any(skips):
        row.copy_(new)
    else:
        row.copy_(torch.where(_mask(skips, row, rows_per_sample), row, new))


_LIB.impl("put_rows", put_rows, "CompositeExplicitAutograd")


@torch.library.register_fake("lazypass::put_rows")
def _(cache, prev, flags, new) -> None:
    return None


def _mask(flags: list, row: torch.Tensor, per_sample: int) -> torch.Tensor:
    """B host flags over a cache row's rows (samples' frames folded into the leading dim, sample-major)."""
    mask = torch.tensor([bool(f) for f in flags for _ in range(per_sample)], device=row.device)
    return mask.reshape(-1, *[1] * (row.dim() - 1))


def host_flags(slot: torch.Tensor, skip: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``put_rows``'s ``flags`` computed eagerly (the pass builds the same in the graph)."""
    parts = [slot.reshape(-1)[:1]] + [skip] + ([valid] if valid is not None else [])
    return torch.cat([p.to(torch.int64) for p in parts]).cpu()


def _host_flags_node(graph: fx.Graph, slot: fx.Node, flags: list[fx.Node], device: torch.device) -> fx.Node:
    """``host_flags`` as graph nodes (Inductor fuses the packing; on a GPU the copy to the host
    is the group's one device-to-host read for its writes)."""
    aten = torch.ops.aten
    call = graph.call_function
    slot = call(aten.slice.Tensor, (call(aten.reshape.default, (slot, [-1])), 0, 0, 1))
    parts = [call(aten._to_copy.default, (x,), {"dtype": torch.int64}) for x in [slot, *flags]]
    packed = call(aten.cat.default, (parts,))
    if device.type != "cpu":
        packed = call(aten._to_copy.default, (packed,), {"device": torch.device("cpu")})
    return packed


def compiled_writes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the inference graph ``gm`` (same submodules) whose cache writes are ``put_rows``.

    Example:
        >>> import torch, lazypass
        >>> from lazypass.models import tiny_dit
        >>> from lazypass.passes.compiled_writes import compiled_writes
        >>> x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.tensor([1, 2])
        >>> model = lazypass.apply(tiny_dit(), example_inputs=(x, t, y))
        >>> core = lazypass.runtime.runtime(model).program_for((x, t, y), {})[0].core
        >>> sum(n.target is torch.ops.lazypass.put_rows.default for n in compiled_writes(core).graph.nodes)
        4
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    packed: dict[tuple, fx.Node] = {}  # one host_flags per decision group (same slot and flags)
    for node in list(gm.graph.nodes):
        w = node.meta.get(WRITE)
        if w is None:
            continue
        with graph.inserting_after(env[node]):
            new = graph.call_function(torch.ops.aten.detach.default, (env[w.new],))  # no autograd through state
        group = (w.slot, w.skip, w.valid)
        if group not in packed:
            flags = [env[f] for f in (w.skip, w.valid) if f is not None]
            device = getattr(value(w.slot), "device", torch.device("cpu"))
            with graph.inserting_before(new):
                packed[group] = _host_flags_node(graph, env[w.slot], flags, device)
        with graph.inserting_after(new):
            args = [env[w.cache], env[w.prev] if w.prev is not None else None, packed[group], new]
            graph.call_function(torch.ops.lazypass.put_rows.default, tuple(args))
        for write in w.nodes:
            graph.erase_node(env[write])
    graph.eliminate_dead_code()
    out = fx.GraphModule(gm, graph)
    out.meta = dict(gm.meta)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out
