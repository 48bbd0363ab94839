"""Which gate belongs to which site, across programs that have different sites.

The gates (``model.lazy_gates``) are made for the full set of sites, found at the first
trace. A later program may have fewer: a per-call option such as SD3's ``skip_layers``
leaves blocks out, and each distinct value gets its own program with the sites it really
has. Sites are matched by a stable identity (:func:`site_keys`): kind, the module that
makes each stream's branch output (``transformer_blocks.3.attn.to_out.0``), and the gate
input dims, plus an ordinal among equal keys; so a program's site ``i`` reads gate
``index[i]`` (:class:`GateView`). The site's ``path`` in reports is not used: it is the
common module of the branch's heavy ops, and a branch takes in upstream ops that only it
uses, which another option can change (SD3 with its first block skipped: the last block's
attention absorbs the context embedder). The gates file keeps the full layout, so its layout
check still compares whole site sets.

A program with a site the gates do not have is refused (:func:`unknown_sites_error`),
naming the sites: gates are never guessed. While the gates are untouched (every value
zero, nothing fitted or loaded) they are simply made again for the larger site set.
"""

from __future__ import annotations

from lazypass.gates import LazyGates
from lazypass.ops import value
from lazypass.passes.info import GraphInfo
from lazypass.passes.match_sites import module_path

Key = tuple  # (kind, output module of each stream, gate dims of each stream, ordinal)


def site_keys(info: GraphInfo) -> list[Key]:
    """Stable identities of a graph's sites, in site order."""
    keys, seen = [], {}
    for m in info.matches:
        outputs = tuple(module_path(s.y) or m.path for s in m.streams)
        base = (m.kind, outputs, tuple(int(value(s.z).shape[-1]) for s in m.streams))
        n = seen.get(base, 0)
        seen[base] = n + 1
        keys.append(base + (n,))
    return keys


def describe(key: Key) -> str:
    kind, outputs, dims, n = key
    return f"{kind} into {' + '.join(outputs)} (gate dims {list(dims)}{f', #{n + 1}' if n else ''})"


def gate_index(gates: LazyGates, keys: list[Key]) -> list[int] | None:
    """Gate index of every site, or None if some site has no gate."""
    where = {k: i for i, k in enumerate(gate_keys(gates))}
    index = [where.get(k) for k in keys]
    return None if any(i is None for i in index) else index


def gate_keys(gates: LazyGates) -> list[Key]:
    return getattr(gates, "site_keys", None) or []


def untouched(gates: LazyGates) -> bool:
    """Every gate value is zero: nothing was fitted or loaded, so the gates mean nothing yet."""
    return all(not p.detach().any() for p in gates.parameters())


def unknown_sites_error(gates: LazyGates, keys: list[Key], options: str = "") -> ValueError:
    known = set(gate_keys(gates))
    new = [describe(k) for k in keys if k not in known]
    missing = [describe(k) for k in gate_keys(gates) if k not in set(keys)]
    return ValueError(
        f"lazypass: the model's sites changed: {len(new)} site(s) have no gate: {'; '.join(new)}"
        + (f" (and {len(missing)} of the {len(known)} gated sites are gone: {'; '.join(missing)})" if missing else "")
        + f"{options}. The gates were made for the sites found at the first trace and hold fitted or loaded "
        "values, so lazypass does not guess gates for other sites. Fit gates for the model as it is now "
        "(lazypass.fit), load gates made for it (lazypass.load_gates), or undo the change; if an option of "
        "the first call left branches out (skip_layers), trace the full model first "
        "(lazypass.trace(model, *inputs) without that option) and fit or load gates after that"
    )


class GateView:
    """The gates of a program whose sites are a subset of the gated ones: site ``i`` of the
    program reads gate ``index[i]``. Has what the rewrites read from :class:`LazyGates`."""

    def __init__(self, gates: LazyGates, index: list[int]):
        self.gates, self.index = gates, list(index)
        self.layout = [gates.layout[i] for i in self.index]
        self.inputs = gates.inputs
        for name in ("bias", *gates.inputs):  # indexed through site_index
            setattr(self, name, getattr(gates, name))

    def weight(self, site: int, stream: int):
        return self.gates.weight(self.index[site], stream)

    def weight_name(self, site: int, stream: int) -> str:
        return self.gates.weight_name(self.index[site], stream)

    def site_index(self, site: int) -> int:
        return self.index[site]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.layout]


__all__ = ["GateView", "describe", "gate_index", "gate_keys", "site_keys", "unknown_sites_error", "untouched"]
