"""Channel elements -> dependency groups.

Every op rule (``gpp_onnx.ops``) states which channel elements are tied. The elements
and ties form an undirected graph; each connected component is one
*channel* that can only be removed as a whole. Components that touch the same values
the same number of times are parallel copies of one structure (channel 0, 1, ... of a
conv output with its BN, activation and consumers), so they form one ``ChannelGroup``
of ``width`` channels. A group is prunable when none of its values is blocked (model
input/output, an op without a rule, a cross-channel op) and some layer produces it.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..ops import ROLE_OUT, ParamSlice, Tie

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Member:
    """Value `value` holds `elements.shape[1]` channel positions per group channel."""

    value: str
    axis: int
    elements: np.ndarray  # (group width, k): local channel indices of `value`


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    key: str
    width: int
    members: tuple[Member, ...]
    params: tuple[ParamSlice, ...]
    prunable: bool
    reason: str = ""

    def elements(self, value: str, channels: np.ndarray) -> np.ndarray:
        for m in self.members:
            if m.value == value:
                return np.sort(m.elements[channels].ravel())
        return np.empty(0, dtype=np.int64)

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(m.value for m in self.members)


class ElementIndex:
    """Global ids for the channel elements of every value that carries channels."""

    def __init__(self, widths: dict[str, int]):
        self.names = list(widths)
        self.offset = {}
        total = 0
        for name in self.names:
            self.offset[name] = total
            total += widths[name]
        self.widths = widths
        self.total = total
        self.starts = np.array([self.offset[n] for n in self.names], dtype=np.int64)

    def ids(self, value: str, local: np.ndarray) -> np.ndarray:
        return self.offset[value] + np.asarray(local, dtype=np.int64)

    def owner(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1


def component_labels(index: ElementIndex, ties: list[Tie]) -> np.ndarray:
    """Label of the connected component of every element id: components numbered by
    their smallest element id (0 holds element 0), as ``networkx.connected_components``
    finds them walking the ids in order.

    Computed on the arrays of tie endpoints instead of a networkx graph of ~10^5 Python
    nodes: every element starts as its own root; each pass hooks, for every tie whose ends
    have different roots, the larger root under the smaller, then follows pointers until
    each element points at its root. When no tie joins two roots, the roots are the
    components' smallest ids."""
    parent = np.arange(index.total, dtype=np.int64)
    if ties:
        a = np.concatenate([index.ids(t.a, t.ia) for t in ties])
        b = np.concatenate([index.ids(t.b, t.ib) for t in ties])
        while True:
            ra, rb = parent[a], parent[b]
            split = ra != rb
            if not split.any():
                break
            low = np.minimum(ra[split], rb[split])
            np.minimum.at(parent, ra[split], low)
            np.minimum.at(parent, rb[split], low)
            while True:  # pointer jumping: every element to its root
                up = parent[parent]
                if np.array_equal(up, parent):
                    break
                parent = up
    return np.unique(parent, return_inverse=True)[1].astype(np.int64)


def build_groups(index: ElementIndex, ties: list[Tie], params: list[ParamSlice],
                 blocked: dict[str, str], axes: dict[str, int]) -> list[ChannelGroup]:
    labels = component_labels(index, ties)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    owners = index.owner(np.arange(index.total))
    by_signature: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for ids, sig in zip(np.split(order, bounds), _signatures(labels, owners, len(index.names))):
        by_signature[sig].append(ids)
    params_by_value = defaultdict(list)
    for p in params:
        params_by_value[p.value].append(p)
    groups = [_make_group(index, sig, comps, params_by_value, blocked, owners, axes)
              for sig, comps in by_signature.items()]
    groups.sort(key=lambda g: index.offset[g.members[0].value] + int(g.members[0].elements.min()))
    return _with_unique_keys(groups)


def _signatures(labels: np.ndarray, owners: np.ndarray, n_values: int) -> list[tuple]:
    """Per component (in label order): ((value index, elements of it), ...) by value."""
    keys, counts = np.unique(labels * n_values + owners, return_counts=True)
    comp, value = np.divmod(keys, n_values)
    starts = np.flatnonzero(np.diff(comp, prepend=-1))
    pairs = list(zip(value.tolist(), counts.tolist()))
    ends = [*starts[1:].tolist(), len(pairs)]
    return [tuple(pairs[s:e]) for s, e in zip(starts.tolist(), ends)]


def _make_group(index, signature, comps, params_by_value, blocked, owners, axes) -> ChannelGroup:
    comps.sort(key=lambda ids: int(ids[0]))
    ids = np.stack(comps)            # (width, elements per channel), each row ascending
    owned = owners[ids]
    members = []
    for value_idx, count in signature:
        name = index.names[value_idx]
        local = ids[owned == value_idx].reshape(len(comps), count) - index.offset[name]
        members.append(Member(name, axes[name], local))
    members.sort(key=lambda m: index.offset[m.value])
    values = [m.value for m in members]
    params = tuple(p for v in values for p in params_by_value.get(v, ()))
    reasons = [f"{v}: {blocked[v]}" for v in values if v in blocked]
    if not reasons and not any(p.role == ROLE_OUT for p in params):
        reasons = ["no layer with weights produces these channels"]
    return ChannelGroup(key=members[0].value, width=len(comps), members=tuple(members),
                        params=params, prunable=not reasons, reason=reasons[0] if reasons else "")


def _with_unique_keys(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        n = seen[g.key]
        seen[g.key] += 1
        key = g.key if n == 0 else f"{g.key}#{n}"
        out.append(ChannelGroup(key, g.width, g.members, g.params, g.prunable, g.reason))
    return out
