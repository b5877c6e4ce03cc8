"""Channel analysis: run every node's channel rule, then group tied channels.

The result, `Analysis`, is what criteria score, plans index and surgery cuts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import onnx

from ..dense import aliases as dense_aliases
from ..errors import InputError
from ..graph import GraphView
from ..model import opset_version
from ..ops import AnalysisContext, NodeChannels, OpRule, ParamSlice, Tie, lookup
from ..ops.attention import attention_rules
from .groups import ChannelGroup, ElementIndex, Member, build_groups

logger = logging.getLogger(__name__)

__all__ = ["Analysis", "ChannelGroup", "Member", "analyze_model"]


@dataclass(eq=False)
class Analysis:
    view: GraphView
    opset: int
    axes: dict[str, int | None]
    rules: dict[str, OpRule]
    params: list[ParamSlice]
    groups: list[ChannelGroup]
    blocked: dict[str, str] = field(default_factory=dict)
    reductions: dict[str, list[str]] = field(default_factory=dict)  # node -> values reduced

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group(self, key: str) -> ChannelGroup:
        if not hasattr(self, "_by_key"):
            self._by_key = {g.key: g for g in self.groups}
        return self._by_key[key]

    def find_group(self, name: str) -> str:
        """The key of the group that `name` designates: a group key, a value in a group, or
        a node whose output is in a group (the names `analyze` and Netron show)."""
        for g in self.groups:
            if name == g.key or name in g.values:
                return g.key
        node = next((n for n in self.view.nodes if n.name == name), None)
        for out in node.output if node is not None else ():
            for g in self.groups:
                if out in g.values:
                    return g.key
        alias = dense_aliases(self.view.model).get(name)
        if alias is not None:
            return self.find_group(alias)
        raise InputError(f"'{name}' names no channel group, value or node of this model - "
                         "run 'gpp-onnx analyze' to list the groups")

    def keeping(self, names) -> "Analysis":
        """The same analysis with the groups `names` designate kept whole."""
        keys = {self.find_group(n): n for n in names}
        if not keys:
            return self
        groups = [replace(g, prunable=False, reason=f"kept whole: ignored ('{keys[g.key]}')")
                  if g.key in keys else g for g in self.groups]
        return replace(self, groups=groups)


def analyze_model(model: onnx.ModelProto, input_shape=None) -> Analysis:
    """Run every node's rule over a normalised model and build its channel groups."""
    view = GraphView(model, input_shape)
    opset = opset_version(model)
    ctx = AnalysisContext(view, opset)
    ties: list[Tie] = []
    params: list[ParamSlice] = []
    blocked: dict[str, str] = {}
    rules: dict[str, OpRule] = {}
    reductions: dict[str, list[str]] = {}
    for spec in view.inputs:
        if len(spec.shape) >= 2:
            ctx.axes[spec.name] = _input_channel_axis(view, spec.name)
            blocked[spec.name] = "model input"
    patterns = attention_rules(view)  # rules of whole attention blocks, by node
    for node in view.nodes:
        rule = patterns.get(node.name) or lookup(node, opset)
        rules[node.name] = rule
        res = _run_rule(rule, node, ctx)
        for name in node.output:
            if name:
                ctx.axes[name] = res.out_axes.get(name)
        ties.extend(res.ties)
        params.extend(res.params)
        if res.reduced:
            reductions[node.name] = list(res.reduced)
        for value, reason in res.blocked:
            blocked.setdefault(value, f"{reason} (node {node.name})")
    for name in view.output_names:
        blocked.setdefault(name, "model output")
    for p in params:   # a weight the model also returns keeps its declared shape
        if p.param in view.output_names:
            blocked.setdefault(p.value, f"its weight '{p.param}' is a model output")
    widths = _widths(ctx)
    ties = [t for t in ties if t.a in widths and t.b in widths]
    params = [p for p in params if p.value in widths]
    groups = build_groups(ElementIndex(widths), ties, params, blocked, ctx.axes)
    reductions = {n: [v for v in values if v in widths] for n, values in reductions.items()}
    return Analysis(view, opset, dict(ctx.axes), rules, params, groups, blocked,
                    {n: values for n, values in reductions.items() if values})


def _input_channel_axis(view: GraphView, name: str) -> int:
    """Axis 1, or the axis an NHWC input's Transposes all move to axis 1 (a TensorFlow
    export's channels-last input)."""
    users = view.consumers.get(name, [])
    perms = {tuple(a.ints) for n in users if n.op_type == "Transpose"
             for a in n.attribute if a.name == "perm"}
    if users and len(perms) == 1 and all(n.op_type == "Transpose" for n in users):
        (perm,) = perms
        if len(perm) > 2 and perm[1] != 1:
            return perm[1]
    return 1


def _run_rule(rule: OpRule, node: onnx.NodeProto, ctx: AnalysisContext) -> NodeChannels:
    """A rule that cannot make sense of a node blocks its channels instead of guessing."""
    try:
        return rule.analyze(node, ctx)
    except (ValueError, IndexError, KeyError, TypeError) as err:
        logger.debug("rule for %s (%s) failed: %s", node.name, node.op_type, err)
        from ..ops.base import block_all
        return block_all(node, ctx, f"{node.op_type} has a form gpp-onnx cannot follow ({err})")


def _widths(ctx: AnalysisContext) -> dict[str, int]:
    widths = {}
    for name, axis in ctx.axes.items():
        shape = ctx.view.shape(name)
        if axis is not None and shape is not None and axis < len(shape):
            widths[name] = int(shape[axis])
    return widths
