"""Run an ONNX graph as a trainable ``torch.nn.Module`` (``writeback.write_back`` writes
the trained weights back).

Weights (the inputs each op's channel rule names, ``OpRule.weight_slots``) become ``nn.Parameter`` s in ``module.params`` (an
``nn.ParameterDict`` keyed by a sanitized name; ``onnx_name(key)`` maps back); every other
constant (shape tensors, int tensors, BatchNormalization running mean / var, scalars) is
a buffer in ``module.consts``. The legacy exporter de-duplicates byte-identical
initializers into ``Identity`` nodes fed by one shared initializer (all-zero biases, BN
running means, ...); such Identity outputs are untied here: each becomes its own
Parameter / buffer (so one BN's running mean is never another's, nor a bias), and
``writeback.write_back`` replaces each written Identity by an initializer of its output
name.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Container, Iterator, Mapping, Sequence

import onnx
import torch
from torch import nn

from gpp_onnx.errors import InputError, UnsupportedModelError
from gpp_onnx.ops import lookup

from .ops import Node, check_for, parse_attrs, registry, tensor_from_proto
from .ops_tensor import constant_value

logger = logging.getLogger(__name__)

_DOMAINS = ("", "ai.onnx")
_WITHOUT_BACKEND = ("or prune without the backend: no --data, or --criterion l1 --repair bias "
                    "and no --finetune-epochs")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when torch sees a GPU, else CPU; 'cpu', 'cuda', 'cuda:N' as given.

    Raises InputError for an unknown name or a CUDA device torch cannot use."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InputError(f"unknown device '{name}'; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"device '{name}' is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise InputError(f"device '{name}' requested but torch sees no CUDA GPU; "
                         "use device 'cpu' or 'auto', or install a CUDA build of torch")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device '{name}' does not exist ({torch.cuda.device_count()} GPUs visible)")
    return device


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DOMAINS:
            return entry.version
    return onnx.defs.onnx_opset_version()


def _sanitize(name: str, taken: Container[str]) -> str:
    """``name`` as a unique ParameterDict / buffer key ([A-Za-z0-9_], no leading digit)."""
    key = re.sub(r"\W", "_", name) or "t"
    key = f"t_{key}" if key[0].isdigit() else key
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    return unique


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _collect_constants(graph: onnx.GraphProto, opset: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(initializers, Constant-node and Identity-of-constant outputs by ONNX name,
    names of those Identity outputs); each Identity output is its own copy."""
    tensors = {init.name: tensor_from_proto(init) for init in graph.initializer}
    copies: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.domain not in _DOMAINS:
            continue
        if node.op_type == "Constant":
            ctx = Node(_node_name(node, index), node.op_type, tuple(node.input),
                       tuple(node.output), parse_attrs(node), opset)
            tensors[node.output[0]] = constant_value(ctx)
        elif node.op_type == "Identity" and node.input and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]].clone()
            copies.add(node.output[0])
    return tensors, copies


def _classify(graph, constants, initializers, opset) -> tuple[set[str], set[str]]:
    """(weight names, running-stat names) among the constants (the op rules say which
    input slots hold them)."""
    weights: set[str] = set()
    stats: set[str] = set()
    for node in graph.node:
        rule = lookup(node, opset)
        for slots, bucket in ((rule.weight_slots(node), weights), (rule.stat_slots(node), stats)):
            for slot in slots:
                if slot >= len(node.input) or not node.input[slot]:
                    continue
                name = node.input[slot]
                tensor = constants.get(name)
                if tensor is None or not tensor.is_floating_point():
                    continue
                if name not in initializers and tensor.dim() == 0:
                    continue
                if bucket is weights and not rule.scalar_weights(node) and tensor.numel() < 2:
                    continue
                bucket.add(name)
    return weights, stats - weights


def _own_statistics(graph, opset, constants, weights) -> dict[tuple[int, int], str]:
    """Running statistics read from a tensor that is also a weight or read elsewhere (the
    legacy exporter shares an untrained BatchNorm's zero mean with a zero bias): each such
    slot gets its own copy in `constants`, under a new name, so training updates it alone
    and never asks a gradient of a running statistic."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    copies = {}
    for index, node in enumerate(graph.node):
        for slot in lookup(node, opset).stat_slots(node):
            name = node.input[slot] if slot < len(node.input) else ""
            if name in constants and (name in weights or uses[name] > 1):
                copy = f"{name}::{_node_name(node, index)}.{slot}"
                constants[copy] = constants[name].clone()
                copies[(index, slot)] = copy
    return copies


class OnnxModule(nn.Module):
    """An ONNX graph executed node by node with torch ops; trainable.

    ``forward(*inputs)`` returns the graph outputs (one tensor, or a tuple);
    ``run(inputs, outputs)`` returns any named values (graph inputs, intermediates,
    constants) as a dict. ``op_overrides`` replaces the implementation of some op types
    for this module only (e.g. the deconvnet ReLU used for utility tracing). ``train()`` switches BatchNormalization to batch statistics
    (running stats updated) and enables Dropout; ``eval()`` uses running stats."""

    def __init__(self, model: onnx.ModelProto, device: str | torch.device = "cpu",
                 op_overrides: Mapping[str, Callable] | None = None):
        super().__init__()
        graph, opset = model.graph, _opset(model)
        self.opset = opset
        constants, self.identity_copies = _collect_constants(graph, opset)
        initializers = {init.name for init in graph.initializer} | self.identity_copies
        weights, stats = _classify(graph, constants, initializers, opset)
        # {(node index, slot): copy name}: running stats read from a shared tensor
        self.stat_copies = _own_statistics(graph, opset, constants, weights)
        stats |= set(self.stat_copies.values())
        self.onnx_dtypes = {name: tensor.dtype for name, tensor in constants.items()}
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self._param_onnx: dict[str, str] = {}   # param key -> ONNX name
        self._param_key: dict[str, str] = {}    # ONNX name -> param key
        self._const_key: dict[str, str] = {}    # ONNX name -> buffer key
        self.stat_names = sorted(stats)
        for name, tensor in constants.items():
            self._add_constant(name, tensor, name in weights)
        self.input_names = [v.name for v in graph.input if v.name not in constants]
        self.output_names = [v.name for v in graph.output]
        self._overrides = dict(op_overrides or {})  # op_type -> fn(node, *args), this module only
        self._nodes = self._build_nodes(graph, opset, constants)
        self._produced = {name for node in self._nodes for name in node.outputs if name}
        self._release = self._release_plan()
        self.to(resolve_device(device))
        logger.debug("OnnxModule: %d nodes, %d parameters, %d buffers (opset %d)",
                     len(self._nodes), len(self.params), len(self._const_key), opset)

    def _add_constant(self, name: str, tensor: torch.Tensor, trainable: bool) -> None:
        if trainable:
            key = _sanitize(name, self.params)
            self.params[key] = nn.Parameter(tensor)
            self._param_onnx[key], self._param_key[name] = name, key
        else:
            key = _sanitize(name, self.consts._buffers)
            self.consts.register_buffer(key, tensor)
            self._const_key[name] = key

    def _build_nodes(self, graph, opset, constants) -> list[Node]:
        table = {**registry(), **self._overrides}
        known = set(self.input_names) | set(constants)
        nodes = []
        for index, proto in enumerate(graph.node):
            inputs = tuple(self.stat_copies.get((index, slot), name)
                           for slot, name in enumerate(proto.input))
            node = Node(_node_name(proto, index), proto.op_type, inputs,
                        tuple(proto.output), parse_attrs(proto), opset, table.get(proto.op_type))
            if proto.op_type == "Constant" or (node.outputs and node.outputs[0] in self.identity_copies):
                continue
            self._validate(node, proto.domain, known)
            known.update(o for o in node.outputs if o)
            nodes.append(node)
        missing = [name for name in self.output_names if name not in known]
        if missing:
            raise UnsupportedModelError(f"graph output '{missing[0]}' is produced by no node; "
                                        "check the model with onnx.checker")
        return nodes

    @staticmethod
    def _validate(node: Node, domain: str, known: set[str]) -> None:
        if domain not in _DOMAINS:
            raise node.fail(f"domain '{domain}' is not supported; the torch backend (data "
                            "criteria, lsq repair, fine-tuning, push) runs standard ONNX ops "
                            f"only: export without custom/contrib ops, {_WITHOUT_BACKEND}")
        if node.fn is None:
            raise node.fail("op is not supported by the torch backend (data criteria, lsq "
                            "repair, fine-tuning, push); rewrite or decompose it into "
                            f"supported ops, {_WITHOUT_BACKEND}")
        check = check_for(node.op_type)
        if check is not None:
            check(node)
        for name in node.inputs:
            if name and name not in known:
                raise node.fail(f"input '{name}' is not produced before this node; "
                                "topologically sort the graph (e.g. onnx-simplifier)")

    def _release_plan(self) -> list[list[str]]:
        """Per node: intermediate values whose last use it is (freed after it runs)."""
        last: dict[str, int] = {}
        for index, node in enumerate(self._nodes):
            for name in node.inputs:
                last[name] = index
        keep = set(self.output_names) | set(self._param_key) | set(self._const_key)
        for index, node in enumerate(self._nodes):
            for name in node.outputs:
                last.setdefault(name, index)  # never consumed: free right away
        plan: list[list[str]] = [[] for _ in self._nodes]
        for name, index in last.items():
            if name and name not in keep:
                plan[index].append(name)
        return plan

    def train(self, mode: bool = True) -> OnnxModule:
        super().train(mode)
        for node in self._nodes:
            node.training = mode
        return self

    def freeze_batchnorm(self) -> None:
        """BatchNormalization normalises by its running statistics (and leaves them as they
        are) until the next ``train()`` / ``eval()``; its scale and shift still train."""
        for node in self._nodes:
            if node.op_type == "BatchNormalization":
                node.training = False

    @property
    def constant_names(self) -> tuple[str, ...]:
        """ONNX names of the tensors that are not trained (constants, running stats)."""
        return tuple(self._const_key)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes in execution order (``op_type``, ``inputs``, ``outputs``, ``attrs``)."""
        return tuple(self._nodes)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def onnx_name(self, param_key: str) -> str:
        """The exact ONNX initializer (or Constant output) name of parameter ``param_key``."""
        return self._param_onnx[param_key]

    def param_key(self, onnx_name: str) -> str:
        """The ``params`` key of the weight called ``onnx_name`` in the ONNX graph."""
        return self._param_key[onnx_name]

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(ONNX name, Parameter) for every weight."""
        for key, param in self.params.items():
            yield self._param_onnx[key], param

    def named_onnx_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights and BatchNormalization running stats by ONNX name (what write_back writes)."""
        yield from self.named_onnx_parameters()
        for name in self.stat_names:
            yield name, self.consts.get_buffer(self._const_key[name])

    def _environment(self) -> dict[str, torch.Tensor]:
        env = {name: self.params[key] for name, key in self._param_key.items()}
        env.update((name, self.consts.get_buffer(key)) for name, key in self._const_key.items())
        return env

    def _feed(self, inputs) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, Mapping):
            inputs = list(inputs)
            if len(inputs) != len(self.input_names):
                raise InputError(f"the model takes {len(self.input_names)} inputs "
                                 f"{self.input_names}, got {len(inputs)}")
            inputs = dict(zip(self.input_names, inputs))
        unknown = sorted(set(inputs) - set(self.input_names))
        missing = sorted(set(self.input_names) - set(inputs))
        if unknown or missing:
            raise InputError(f"inputs must be exactly {self.input_names}; "
                             f"unknown {unknown}, missing {missing}")
        device = self.device
        return {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}

    def run(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
            outputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Execute the graph; return the values named in ``outputs`` (default: graph outputs).

        Any value name works (graph input, node output, initializer), so intermediate
        activations, e.g. the final hidden layer, can be read and differentiated."""
        wanted = list(self.output_names if outputs is None else outputs)
        step = Stepper(self, inputs, keep=wanted)
        for name in wanted:
            step.check(name)
        # nodes after the last value asked for are never executed
        return {name: step.advance_to(name) for name in wanted}

    def peak_live(self, size_of: Callable[[str], int]) -> int:
        """Largest total ``size_of(value)`` held at once by ``run`` over the whole graph
        (inputs included, weights and constants not)."""
        live = sum(size_of(name) for name in self.input_names)
        peak = live
        for node, release in zip(self._nodes, self._release):
            live += sum(size_of(name) for name in node.outputs if name)
            peak = max(peak, live)
            live -= sum(size_of(name) for name in release if name in self._produced
                        or name in self.input_names)
        return peak

    def stepper(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> "Stepper":
        """Execute the graph in stages on fixed inputs (see :class:`Stepper`)."""
        return Stepper(self, inputs)

    @staticmethod
    def _execute(node: Node, env: dict[str, torch.Tensor]) -> None:
        args = [env[name] if name else None for name in node.inputs]
        try:
            result = node.fn(node, *args)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise RuntimeError(f"node '{node.name}' ({node.op_type}) failed: {err}") from err
        results = result if isinstance(result, (tuple, list)) else (result,)
        for name, value in zip(node.outputs, results):
            if name:
                env[name] = value

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = self.run(inputs, self.output_names)
        outs = tuple(values[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs


class Stepper:
    """One pass of an :class:`OnnxModule` over fixed inputs, run in stages.

    ``advance_to(name)`` executes nodes, in graph order, until value ``name`` exists and
    returns it; values no later node needs are freed as in ``run``. Weights changed in
    place between two calls take effect for the nodes not yet executed, so a layer-by-
    layer procedure (e.g. refitting each layer on its already refitted predecessors)
    costs one pass instead of one pass per layer."""

    def __init__(self, module: OnnxModule, inputs, keep: Sequence[str] = ()):
        self.module = module
        self.keep = set(keep)  # never freed (``run`` keeps everything it was asked for)
        self.env = module._environment()
        self.env.update(module._feed(inputs))
        self.position = 0

    def check(self, name: str) -> None:
        if name not in self.env and name not in self.module._produced:
            raise InputError(f"no value named '{name}' in the graph; "
                             "ask for a graph input, node output or initializer name")

    def advance_to(self, name: str) -> torch.Tensor:
        module = self.module
        self.check(name)
        while name not in self.env:
            if self.position >= len(module._nodes):
                raise InputError(f"value '{name}' was already freed; ask for values in "
                                 "graph order")
            module._execute(module._nodes[self.position], self.env)
            for released in module._release[self.position]:
                if released != name and released not in self.keep:
                    self.env.pop(released, None)
            self.position += 1
        return self.env[name]
