"""Find the lazy sites of a transformer graph by the shape of its dataflow.

A site is a residual branch ``h = x + g * F(Z)`` with ``Z = modulate(norm(x))``.  We
never look at module classes or names.  Instead, for every add whose two operands have
the output's shape and where one operand ``x`` is an ancestor of the other ``br``:

* the *region* is every node on a path from ``x`` to ``br``; it must contain a heavy op
  (linear, matmul, einsum, sdpa, conv), otherwise the add is an elementwise detail such
  as a tanh-GELU or a modulation;
* ``Z`` (what the gate reads, and where the skippable part starts) is the nearest node
  that dominates every heavy op of the region when paths start at ``x``: norm and
  modulation come before it, and all heavy work after it;
* ``Y`` (the branch output that gets cached) is the nearest node that post-dominates
  every heavy op on the way to ``br``: the adaLN gate multiply and the add stay outside.

``F`` is then every node between ``Z`` and ``Y``, plus the nodes only ``F`` uses (the
key/value projections of a text context in cross-attention).  Whatever else ``F`` reads
becomes an operand of the conditional.  Two candidates that share heavy ops (joint
text/image attention, where one sdpa feeds two residual streams) become one site with
several streams.  A candidate whose region holds another candidate's residual add is an
outer wrapper around a block, not a branch, and is dropped in favour of the inner ones,
unless an inner residual add dominates its branch (AuraFlow adds the MLP output onto the
block input while the MLP reads ``x + attn``): then the branch starts at that add.

Paths follow data only: an argument read for its dtype or shape (``type_as``, ``*_like``)
is no edge, and ``x`` may be reached through a same-shape cast (``x.float()``).  Rows of a
site are sample-major; the model batch is the timestep's length, so a site may hold several
rows per sample (video models fold frames into the batch dim) but not a fraction of one.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lazypass.config import LazyConfig
from lazypass.ops import is_heavy, macs, op_kind, shape, value
from lazypass.passes.info import GraphInfo, Match, Site, Stream, set_graph_info

log = logging.getLogger(__name__)


@dataclass
class _Candidate:
    x: fx.Node
    br: fx.Node
    add: fx.Node
    region: list[fx.Node]
    heavy: list[fx.Node]
    src: fx.Node | None = None  # where the branch leaves the stream (x unless rebased)
    z: fx.Node | None = None
    y: fx.Node | None = None
    core: set = field(default_factory=set)


class NoSitesError(ValueError):
    pass


def match_sites(gm: fx.GraphModule, cfg: LazyConfig) -> fx.GraphModule:
    """Find sites; attaches a :class:`GraphInfo` (``graph_info(gm)``), changes no node."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = [c for add in graph.nodes if op_kind(add) == "add" for c in [_candidate(add, order)] if c]
    adds = {c.add for c in candidates}
    plain = [c for c in candidates if not any(n in adds for n in c.region if n is not c.br)]
    covered = {h for c in plain for h in c.heavy}
    rebased = [r for c in candidates if c not in plain for r in [_rebase(c, adds, order)] if r]
    candidates = plain + [r for r in rebased if not covered & set(r.heavy)]
    candidates.sort(key=lambda c: order[c.add])
    candidates = [c for c in candidates if _split(c, order)]

    groups = _merge(candidates)
    claimed: set[fx.Node] = set()
    protected = adds | {c.z for c in candidates}
    matches = []
    for group in sorted(groups, key=lambda g: min(order[c.add] for c in g)):
        m = _build(group, order, claimed, protected, cfg)
        if m is not None:
            matches.append(m)
            claimed.update(m.nodes)

    timestep = find_timestep(gm, cfg)
    batch = _model_batch(gm, timestep, matches)
    misfits = [m for m in matches if not _rows_per_sample(m, batch)]
    for m in misfits:
        log.info("match_sites: skip branch %s: its leading dim is not a multiple of the batch %s", m.path, batch)
    matches = [m for m in matches if m not in misfits]
    log.info("match_sites: %d sites (%s)", len(matches), ", ".join(m.kind for m in matches))
    if not matches:
        raise NoSitesError(
            "lazypass found no sites: it looks for residual branches h = x + g * F(Z) whose branch F "
            "holds a linear/matmul/attention op on the hidden stream (attention or MLP of a transformer "
            "block), and found none in this graph. Is this a transformer? If its blocks are behind a "
            "custom op, export it with the blocks traceable."
        )
    set_graph_info(gm, GraphInfo(matches, sum(macs(n) for n in graph.nodes), timestep, batch))
    return gm


# Arguments read only for their dtype or shape: no data flows through them.  Cosmos'
# ``time_proj(t).type_as(hidden_states)`` would otherwise put the whole timestep embedding
# on a path from the hidden stream into every branch.
_META_ARGS = {
    "type_as": 1, "expand_as": 1, "view_as": 1, "reshape_as": 1,
    "empty_like": 0, "zeros_like": 0, "ones_like": 0, "full_like": 0, "rand_like": 0, "randn_like": 0,
    "new_zeros": 0, "new_ones": 0, "new_empty": 0, "new_full": 0, "sym_size": 0, "size": 0,
}


def _inputs(n: fx.Node) -> list[fx.Node]:
    """The nodes whose values ``n`` computes with (all inputs but dtype/shape-only ones)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    meta = _META_ARGS.get(name.split(".")[0])
    if meta is None or len(n.args) <= meta or not isinstance(n.args[meta], fx.Node):
        return n.all_input_nodes
    skip = n.args[meta]
    return [p for p in n.all_input_nodes if p is not skip or any(a is p for i, a in enumerate(n.args) if i != meta)]


def _users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if n in _inputs(u)]


def _model_batch(gm: fx.GraphModule, timestep: fx.Node | None, matches: list[Match]) -> int | None:
    """Samples per call: the timestep's length, else the leading dim of the first output.

    Video models fold frames or tokens into the batch dim inside their blocks (Latte's
    spatial attention runs on ``(B * frames, tokens, D)``), so a site's leading dim can be
    a multiple of the batch; gates and cache flags stay per sample.
    """
    t = shape(timestep) if timestep is not None else None
    if t and math.prod(t) > 1:
        return math.prod(t)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    for leaf in out if isinstance(out, (list, tuple)) else [out]:
        s = shape(leaf)
        if s:
            return s[0]
    return shape(matches[0].streams[0].x)[0] if matches else None


def _rows_per_sample(m: Match, batch: int | None) -> int | None:
    """How many leading rows of the site belong to one sample (rows are sample-major)."""
    rows = {shape(n)[0] for s in m.streams for n in (s.z, s.y)}
    if batch is None or len(rows) != 1 or next(iter(rows)) % batch:
        return None
    return next(iter(rows)) // batch


def _candidate(add: fx.Node, order) -> _Candidate | None:
    out = shape(add)
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if out is None or len(operands) != 2 or len(out) < 2:
        return None
    for x, br in (operands, operands[::-1]):
        if shape(x) != out or shape(br) != out:
            continue
        for src in _casts_of(x):
            region = _between(src, br, order)
            if region is None:
                continue
            heavy = [n for n in region if is_heavy(n)]
            if heavy:
                return _Candidate(x, br, add, region, heavy, src if src is not x else None)
            break
    return None


_CASTS = {"to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "float", "type"}


def _casts_of(x: fx.Node) -> list[fx.Node]:
    """``x`` and what it is a same-shape cast or copy of.

    ``(x.float() + g * F(norm(x))).type_as(x)`` (Wan) adds the branch onto a cast made after
    the branch, so the path to the branch starts at the tensor the cast reads.
    """
    out = [x]
    while True:
        n = out[-1]
        if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node):
            break
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if name not in _CASTS or shape(n.args[0]) != shape(x):
            break
        out.append(n.args[0])
    return out


def _between(x: fx.Node, br: fx.Node, order) -> list[fx.Node] | None:
    """Nodes on a path from ``x`` to ``br`` (``x`` excluded), or None if there is none."""
    lo = order[x]
    back, stack = {br}, [br]
    while stack:
        for p in _inputs(stack.pop()):
            if p not in back and order[p] > lo:
                back.add(p)
                stack.append(p)
    seen, stack = set(), [x]
    while stack:
        for u in _users(stack.pop()):
            if u in back and u not in seen:
                seen.add(u)
                stack.append(u)
    if br not in seen:
        return None
    return sorted(seen, key=order.__getitem__)


def _dominators(src: fx.Node, region: list[fx.Node]) -> dict[fx.Node, set]:
    """Dominators of each region node for paths that start at ``src`` (region in graph order)."""
    dom = {src: {src}}
    for n in region:
        preds = [dom[p] for p in _inputs(n) if p in dom]
        dom[n] = set.intersection(*preds) | {n}
    return dom


def _rebase(c: _Candidate, adds: set, order) -> _Candidate | None:
    """``x + F(x + G(x))``: a branch that reads the stream after an inner residual add.

    AuraFlow's blocks add the MLP output back onto the block input ``x``, while the MLP
    reads ``x + attn``; the region from ``x`` then holds the attention's residual add.
    If such an inner add dominates the branch, the branch starts there.  An add onto a
    whole block (``x + block(x)``, with ``block`` ending in a residual add) stays dropped:
    nothing heavy follows its last inner add.
    """
    if c.br in adds:
        return None
    dom = _dominators(c.src if c.src is not None else c.x, c.region)
    inner = [n for n in dom[c.br] if n in adds and n is not c.br]
    if not inner:
        return None
    src = max(inner, key=order.__getitem__)
    region = _between(src, c.br, order)
    if region is None or any(n in adds for n in region if n is not c.br):
        return None
    heavy = [n for n in region if is_heavy(n)]
    if not heavy:
        return None
    return _Candidate(c.x, c.br, c.add, region, heavy, src)


def _split(c: _Candidate, order) -> bool:
    """Place Z (nearest common dominator of the heavy ops) and Y (post-dominator)."""
    inside = set(c.region)
    dom = _dominators(c.src if c.src is not None else c.x, c.region)
    common = set.intersection(*(dom[h] for h in c.heavy)) - set(c.heavy)
    batch = shape(c.x)[0]
    zs = [n for n in sorted(common, key=order.__getitem__, reverse=True) if _batched(n, batch)]
    if not zs:
        return False
    c.z = zs[0]

    pdom = {c.br: {c.br}}
    for n in reversed(c.region[:-1]):
        succ = [pdom[u] for u in _users(n) if u in pdom]
        pdom[n] = (set.intersection(*succ) if succ else set()) | {n}
    common = set.intersection(*(pdom[h] for h in c.heavy))
    ys = [n for n in sorted(common, key=order.__getitem__) if _batched(n, batch)]
    if not ys:
        return False
    c.y = ys[0]

    # F core: on a path from Z to Y.
    down, stack = set(), [c.z]
    while stack:
        for u in _users(stack.pop()):
            if u in inside and u not in down and order[u] <= order[c.y]:
                down.add(u)
                stack.append(u)
    up, stack = {c.y}, [c.y]
    while stack:
        for p in _inputs(stack.pop()):
            if p in down and p not in up:
                up.add(p)
                stack.append(p)
    c.core = up
    return True


def _batched(node: fx.Node, batch: int) -> bool:
    s = shape(node)
    return s is not None and len(s) >= 2 and s[0] == batch and value(node).is_floating_point()


def _merge(candidates: list[_Candidate]) -> list[list[_Candidate]]:
    """Group candidates whose skippable cores share a heavy op (joint attention)."""
    groups: list[list[_Candidate]] = []
    for c in candidates:
        heavy = {n for n in c.core if is_heavy(n)}
        hit = [g for g in groups if any(heavy & {n for n in o.core if is_heavy(n)} for o in g)]
        merged = [c] + [o for g in hit for o in g]
        groups = [g for g in groups if g not in hit] + [merged]
    return groups


def _build(group, order, claimed, protected, cfg: LazyConfig) -> Match | None:
    group = sorted(group, key=lambda c: order[c.add])
    nodes = set().union(*(c.core for c in group))
    if nodes & claimed:
        return None
    zs = {c.z for c in group}
    # Pull in what only F uses (e.g. the key/value projections of a text context).
    changed = True
    while changed:
        changed = False
        for n in list(nodes):
            for p in n.all_input_nodes:
                if (
                    p not in nodes
                    and p.op == "call_function"
                    and p not in protected
                    and p not in zs
                    and p not in claimed
                    and all(u in nodes for u in p.users)
                ):
                    nodes.add(p)
                    changed = True
    ys = {c.y for c in group}
    for n in nodes:
        if n not in ys and any(u not in nodes for u in n.users):
            log.info("match_sites: skip branch at %s: %s is used outside the branch", group[0].add, n)
            return None
    ordered = sorted(nodes, key=order.__getitem__)
    operands = []
    for n in ordered:
        for p in n.all_input_nodes:
            if p not in nodes and p not in operands:
                if value(p) is None:
                    log.info("match_sites: skip branch at %s: reads non-tensor %s", group[0].add, p)
                    return None
                operands.append(p)
    total = sum(macs(n) for n in ordered)
    if total < cfg.min_site_macs:
        return None
    kind = "attn" if _has_attention(ordered, zs) else "ffn"
    streams = [Stream(c.x, c.z, c.y, c.add) for c in group]
    return Match(kind, _path([n for n in ordered if is_heavy(n)]), streams, ordered, total, operands)


def _has_attention(nodes: list[fx.Node], zs: set[fx.Node]) -> bool:
    """sdpa, a softmax between two matmuls/einsums, or a product of two activations.

    The last covers attention without a softmax: linear attention (Sana's
    ``relu(Q) (relu(K)^T V)``) multiplies two tensors that both come from the branch
    input, while an MLP only multiplies activations with weights.  Such a branch mixes
    tokens, so it is an attention site.
    """
    kinds = [op_kind(n) for n in nodes]
    if "sdpa" in kinds:
        return True
    # softmax between two matmuls (or einsums): hand-written attention
    for i, k in enumerate(kinds):
        if k == "softmax":
            before = any(kk in ("matmul", "einsum") for kk in kinds[:i])
            after = any(kk in ("matmul", "einsum") for kk in kinds[i + 1 :])
            if before and after:
                return True
    reach = set(zs)
    for n in nodes:
        if any(p in reach for p in _inputs(n)):
            reach.add(n)
    for n, k in zip(nodes, kinds):
        if k in ("matmul", "einsum"):
            data = [p for p in _inputs(n) if p in reach]
            if len(data) >= 2:
                return True
    return False


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module a node came from ("" if unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", path)  # dynamo
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"^model\.", "", path)  # our capture wrapper
    return path.lstrip(".")


def _path(heavy: list[fx.Node]) -> str:
    paths = [module_path(n).split(".") for n in heavy if module_path(n)]
    if not paths:
        return "?"
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or "<root>"


def find_timestep(gm: fx.GraphModule, cfg: LazyConfig) -> fx.Node | None:
    """The input that feeds a sinusoidal embedding (sin/cos), i.e. the timestep."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if cfg.timestep_arg is not None:
        for n in placeholders:
            if n.target == cfg.timestep_arg or n.name in (cfg.timestep_arg, f"L_{cfg.timestep_arg}_"):
                return n
        raise ValueError(
            f"timestep_arg={cfg.timestep_arg!r} is not an input of the traced model; its inputs are "
            f"{[n.target for n in placeholders]}"
        )
    found = []
    for ph in placeholders:
        if value(ph) is None:
            continue
        seen, stack = {ph}, [ph]
        while stack:
            n = stack.pop()
            if op_kind(n) in ("sin", "cos"):
                found.append(ph)
                break
            for u in n.users:
                if u not in seen and (value(u) is None or value(u).numel() <= 1 << 20):
                    seen.add(u)
                    stack.append(u)
    if not found:
        return None
    named = [n for n in found if "timestep" in n.name or n.name in ("t", "L_t_")]
    return (named or found)[0]


def site_records(info: GraphInfo) -> list[Site]:
    """Report-ready records of the sites of an analysed graph; after ``insert_gates`` their
    ``cache_bytes`` count the state it keeps per site (0 before, and for the soft program)."""
    out = []
    for i, m in enumerate(info.matches):
        zshapes = [shape(s.z) for s in m.streams]
        out.append(
            Site(
                index=i,
                kind=m.kind,
                path=m.path,
                tokens=tuple(math.prod(z[1:-1]) for z in zshapes),
                dims=tuple(z[-1] for z in zshapes),
                out_shapes=tuple(tuple(value(s.y).shape) for s in m.streams),
                macs=m.macs,
                cache_bytes=sum(spec.nbytes for spec in info.state_specs if spec.site == i),
            )
        )
    return out


__all__ = ["Site", "Match", "Stream", "match_sites", "find_timestep", "site_records", "NoSitesError"]
