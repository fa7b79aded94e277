"""A network's flat graph (``torch.export``): its layers' output nodes, repair slots, and an exact cut in two.

:class:`~fire_backend.models.network.Network` runs a ``torch.export`` program's module as it is, and cuts any network
through such a graph. Three operations on an ``fx.GraphModule`` whose nodes carry ``meta["nn_module_stack"]``
(which module call each operation belongs to) and ``meta["val"]`` (its fake value, with the symbolic batch size):

- :func:`graph_layers`: each module called once whose operations leave exactly one value to the rest of the graph
  (its output node): a candidate layer, as :func:`fire_backend.models.network.probe_modules` finds them in an
  ``nn.Module`` (same names, same shapes, same rule);
- :func:`insert_slot`: an identity module after a layer's output node, which the network hooks to repair there;
- :func:`cut_graph`: a head (input -> the node) and a tail (the node -> output). Exact or refused: every value the
  tail needs from before the cut must be the node itself, a constant (weights), or the batch size (recomputed
  from the latent); anything else, such as a skip connection's input or the image itself, is a
  :class:`~fire_backend.models.layers.CutError` naming where it comes from and where it goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fire_backend.models.layers import CutError, Layer, ModuleInfo, RawCandidate, classify

#: the inserted identity modules' attribute names
SLOT_PREFIX = "_fire_slot_"
#: the operations that count as a weight layer (the stage rule's "one convolution or linear layer")
WEIGHT_OPS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                        "conv_transpose3d", "linear", "addmm"})
#: an example batch for export: neither 0 nor 1, which torch.export specializes
EXPORT_BATCH = 2


@dataclass(frozen=True)
class GraphLayers:
    layers: tuple[Layer, ...]
    #: every candidate name (aliases included) -> its output node's name
    outputs: dict[str, str]


def export_module(model: nn.Module, input_shape: Sequence[int]) -> fx.GraphModule:
    """``model`` (eval mode) as a ``torch.export`` program's module with a dynamic batch dimension; the program
    shares the model's parameters. :class:`CutError` with torch's reason if it cannot be exported."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    x = torch.rand((EXPORT_BATCH, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export fails in many ways; the reason is what the user needs
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CutError(f"the network cannot be cut: torch.export fails on it ({type(exc).__name__}: {reason}); "
                       "the fused layout (default) serves it") from None
    return program.module()


def batch_symbol(module: fx.GraphModule) -> Any:
    """The batch size of the graph's one image input: a symbol for a dynamic batch, an int for a fixed one."""
    inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in inputs]
    if len(inputs) != 1 or not isinstance(values[0], torch.Tensor):
        raise ValueError(f"the graph takes {len(inputs)} inputs; FIRE serves classifiers of one image batch")
    return values[0].shape[0]


def _same_size(value: Any, batch: Any) -> bool:
    return isinstance(value, torch.SymInt) and isinstance(batch, torch.SymInt) and value.node.expr == batch.node.expr


def _type_name(entry: Any) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}.{entry.__qualname__}"


def _writes_first_argument(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` is an in-place operation on ``value`` (``relu_``, ``add_``...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not node.args or node.args[0] is not value or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _output_values(module: fx.GraphModule) -> list[fx.Node]:
    output = next(n for n in reversed(module.graph.nodes) if n.op == "output")
    return [leaf for leaf in pytree.tree_leaves(output.args[0]) if isinstance(leaf, fx.Node)]


def graph_layers(module: fx.GraphModule) -> GraphLayers:
    """The candidate layers of an exported graph and each one's output node."""
    batch = batch_symbol(module)
    nodes = [n for n in module.graph.nodes if n.op == "call_function"]
    scopes: dict[str, set[fx.Node]] = {}
    keys: dict[str, set[str]] = {}
    types: dict[str, str] = {}
    for node in nodes:
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            path, kind = entry[0], entry[1]
            if not path or key == path:  # the root module, or torch's placeholder entry
                continue
            scopes.setdefault(key, set()).add(node)
            keys.setdefault(path, set()).add(key)
            types[path] = _type_name(kind)
    paths = sorted(keys)
    modules = {}
    for path in paths:
        inside = set().union(*(scopes[k] for k in keys[path]))
        weights = sum(1 for n in inside if getattr(n.target, "__name__", "").split(".")[0] in WEIGHT_OPS)
        leaf = not any(other.startswith(path + ".") for other in paths)
        modules[path] = ModuleInfo(types[path], leaf, weights)
    final = set(_output_values(module))
    position = {n: i for i, n in enumerate(module.graph.nodes)}
    found: list[tuple[int, int, str, fx.Node, tuple[int, ...]]] = []
    for path in paths:
        if len(keys[path]) != 1:  # called more than once per forward
            continue
        inside = scopes[next(iter(keys[path]))]
        outs = [n for n in inside if any(user not in inside for user in n.users)]
        if len(outs) != 1 or outs[0] in final:
            continue
        out = outs[0]
        value = out.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
            continue
        if not _same_size(value.shape[0], batch) or not all(isinstance(s, int) for s in value.shape[1:]):
            continue
        if any(_writes_first_argument(user, out) for user in out.users):
            continue
        found.append((position[out], -path.count("."), path, out, tuple(int(s) for s in value.shape[1:])))
    found.sort(key=lambda item: item[:2])
    groups: dict[fx.Node, int] = {}
    raw = [RawCandidate(path, shape, groups.setdefault(out, len(groups))) for _, _, path, out, shape in found]
    return GraphLayers(classify(raw, modules), {path: out.name for _, _, path, out, _ in found})


def _node(module: fx.GraphModule, name: str) -> fx.Node:
    for node in module.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node {name!r} in the graph")


def insert_slot(module: fx.GraphModule, name: str) -> tuple[str, nn.Module]:
    """An identity module called on node ``name``'s value, which every later use then reads instead: the name of
    the new node and the module (hook it to replace the value). The caller recompiles ``module``."""
    node = _node(module, name)
    taken = {n.target for n in module.graph.nodes if n.op == "call_module"}
    index = 0
    while f"{SLOT_PREFIX}{index}" in taken:
        index += 1
    target = f"{SLOT_PREFIX}{index}"
    slot = nn.Identity()
    module.add_submodule(target, slot)
    with module.graph.inserting_after(node):
        new = module.graph.call_module(target, (node,))
    new.meta = {k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")}
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new.name, slot


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [entry[0] for key, entry in stack.items() if entry[0] and key != entry[0]]
    return f"module {paths[-1]!r}" if paths else "the network's own forward"


def _guard(node: fx.Node) -> bool:
    """torch.export's input check: a module call on the input alone whose result nothing uses (head only)."""
    return node.op == "call_module" and not node.users and all(a.op == "placeholder" for a in node.all_input_nodes)


def _fresh_slots(part: fx.GraphModule) -> None:
    """A part's slots are its own: the parent's hooks must not fire in it, nor its hooks in the parent."""
    for node in part.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(SLOT_PREFIX):
            setattr(part, node.target, nn.Identity())


def cut_graph(module: fx.GraphModule, name: str, layer: str
              ) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, str], dict[str, str]]:
    """Head and tail of ``module`` at node ``name`` (``layer``'s output), and each part's new node names by old
    name. :class:`CutError` when a value other than that node, a constant or the batch size crosses the cut."""
    batch = batch_symbol(module)
    nodes = list(module.graph.nodes)
    out = _node(module, name)
    output = next(n for n in reversed(nodes) if n.op == "output")
    dynamic: set[fx.Node] = set()  # what depends on the input: it cannot be recomputed in the tail
    for node in nodes:
        if node.op == "placeholder" or any(a in dynamic for a in node.all_input_nodes):
            dynamic.add(node)
    ancestors, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack.extend(node.all_input_nodes)
    head_nodes = [n for n in nodes if n in ancestors or _guard(n)]
    # the tail reads the batch size off its latent instead of computing it from the input
    tail_nodes = [n for n in nodes if n not in ancestors and n.op not in ("placeholder", "output") and not _guard(n)
                  and not _same_size(n.meta.get("val"), batch)]
    crossing = []
    for node in [*tail_nodes, output]:
        for source in node.all_input_nodes:
            if source in ancestors and source is not out and source in dynamic \
                    and not _same_size(source.meta.get("val"), batch):
                crossing.append((source, node))
    if crossing:
        source, user = crossing[0]
        what = "the network's input image" if source.op == "placeholder" else \
            f"the value {source.name!r} computed in {_where(source)}"
        more = f" and {len(crossing) - 1} more" if len(crossing) > 1 else ""
        raise CutError(f"cannot cut at {layer!r}: the rest of the network also needs {what} from before {layer!r} "
                       f"returns (used in {_where(user)}{more}): a skip connection or another path around {layer!r}. "
                       "Cut where every path meets (a block's output), or serve the fused layout (default), which "
                       "repairs at any layer")
    finals = _output_values(module)
    if len(finals) != 1:
        raise CutError(f"cannot cut: the network returns {len(finals)} values; FIRE serves one logits tensor")

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in head_nodes:
        env[node] = head.node_copy(node, lambda a: env[a])
    head.output(env[out])
    head_module = fx.GraphModule(module, head)
    head_names = {old.name: new.name for old, new in env.items()}

    tail = fx.Graph()
    latent = tail.placeholder("latent")
    latent.meta = {"val": out.meta.get("val")}
    tail_env: dict[fx.Node, fx.Node] = {out: latent}
    size: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a in tail_env:
            return tail_env[a]
        if _same_size(a.meta.get("val"), batch):  # the batch size: the latent's first dimension
            if not size:
                size.append(tail.call_function(torch.ops.aten.sym_size.int, (latent, 0)))
                size[0].meta = {"val": a.meta.get("val")}
            return size[0]
        if a not in dynamic:  # a constant the head also uses (a weight, or a value computed from weights)
            tail_env[a] = tail.node_copy(a, arg)
            return tail_env[a]
        raise CutError(f"cannot cut at {layer!r}: {a.name!r} crosses the cut")  # excluded above; kept as a guard

    for node in tail_nodes:
        tail_env[node] = tail.node_copy(node, arg)
    tail.output(arg(finals[0]))
    tail_module = fx.GraphModule(module, tail)
    tail_names = {old.name: new.name for old, new in tail_env.items() if old is not out}
    for part in (head_module, tail_module):
        _fresh_slots(part)
    return head_module, tail_module, head_names, tail_names
