"""A network FIRE can run: any classifier, its candidate layers by module path, repair hooks, a cut in two.

FIRE repairs the latent a layer computes, before the rest of the network runs. :class:`Network` gives every
classifier the same three abilities, whatever it is: one of the networks in :mod:`fire_backend.models`, a user's
own ``nn.Module`` (a module file and its weights), or a ``torch.export`` program (a ``.pt2``):

- **candidate layers** (:meth:`Network.candidates`): the module paths (``layer3.0``, ``features.20``,
  ``blocks.6``) of the modules called exactly once per forward pass that return one floating tensor with the
  batch dimension first, in execution order, with their per-sample output shapes. A module whose output a later
  operation modifies in place (a BatchNorm before ``ReLU(inplace=True)``) is not one: its latent would change
  under the repair. Several names can share one output (``block1`` and its last child ``block1.2``); the
  preferred one is the layer's name, the others are listed as its aliases.
- **repair hooks** (:meth:`Network.forward` with ``hooks``): ``hooks[layer]`` replaces the latent where that
  module returns, in the unmodified network (its code and weights untouched). Each layer ever hooked gets one
  dispatcher, installed once and never per batch: the module instance's ``forward`` is wrapped so that its output
  goes through the batch's hook for that layer, if any. (A registered ``register_forward_hook`` does the same but
  sends every call of the module down PyTorch's slow call path: measured about 10 us per hooked module per batch,
  a few per cent of a small network's forward.) An exported program's flattened graph gets an identity module
  inserted after the node that is the module's output (found through ``node.meta["nn_module_stack"]``), wrapped
  the same way. Each forward sets the batch's hooks mapping; layers without a hook in it cost one dict lookup.
- **a cut** (:meth:`Network.cut`): a head (input -> the layer's latent) and a tail (latent -> logits), each a
  ``Network`` of its own, for the layouts that serve the network as two Triton models. The cut splits the
  network's ``torch.export`` graph (:mod:`fire_backend.models.split`) and is exact or refused: :class:`CutError` names
  the value other than the latent that would cross it (a skip connection around the layer, the input itself).

The **stages** (:meth:`Network.stages`) are the block-level view of the candidates that ``fire sweep`` walks and
the default layer rule (:func:`fire_backend.multilayer.default_layers`) chooses from: the outermost blocks (a module
with submodules, or a sequence holding at most one convolution or linear layer), and the single layers outside
any block; the sequences they sit in are walked through, and the layer that computes the output is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fire_backend.models import split
from fire_backend.models.layers import CutError, Layer, LayerError, ModuleInfo, RawCandidate, classify, near

Hook = Callable[[torch.Tensor], torch.Tensor]

#: the probe batch: its size tells the batch dimension apart (a batch of 1 or 2 is too easily another dimension)
PROBE_BATCH = 3


class _Reached(Exception):
    """Ends a forward pass at the layer whose latent was asked for (:meth:`Network.latents`)."""


def _weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def _module_infos(model: nn.Module) -> dict[str, ModuleInfo]:
    infos = {}
    for name, module in model.named_modules():
        if name:
            infos[name] = ModuleInfo(f"{type(module).__module__}.{type(module).__qualname__}",
                                     not any(True for _ in module.children()),
                                     sum(1 for m in module.modules() if _weight_layer(m)))
    return infos


def probe_modules(model: nn.Module, input_shape: Sequence[int]) -> tuple[Layer, ...]:
    """The candidate layers of an ``nn.Module``, found by one forward pass of :data:`PROBE_BATCH` random images with
    a forward hook on every module (removed again)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    x = torch.rand((PROBE_BATCH, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    calls: dict[str, int] = {}
    seen: list[tuple[str, Any, int | None]] = []

    def recorder(name: str):
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            seen.append((name, output, output._version if isinstance(output, torch.Tensor) else None))
        return record

    handles = [module.register_forward_hook(recorder(name)) for name, module in model.named_modules() if name]
    try:  # normal tensors, even when asked from within inference mode: they count in-place changes
        with torch.inference_mode(False), torch.no_grad():
            x = x.clone()
            result = model(x)
    finally:
        for handle in handles:
            handle.remove()
    raw, groups = [], {}
    for name, output, version in seen:
        if calls[name] != 1 or not isinstance(output, torch.Tensor) or output is result or output is x:
            continue
        if not output.is_floating_point() or output.dim() < 2 or output.shape[0] != PROBE_BATCH:
            continue
        if output._version != version:  # modified in place after the module returned
            continue
        group = groups.setdefault(id(output), len(groups))
        raw.append(RawCandidate(name, tuple(int(s) for s in output.shape[1:]), group))
    return classify(raw, _module_infos(model))


class Network(nn.Module):
    """A classifier FIRE can run: candidate layers, forward with repair hooks, latents at a layer, a cut in two.

    Built by :meth:`from_module` (any ``nn.Module``: each hooked module's forward is wrapped) or :meth:`from_graph` (a
    ``torch.export`` program's module; the parts :meth:`cut` returns are of this graph form too: identity slots in
    the graph carry the repair). The network takes FP32 NCHW images in [0, 1] (a part: its input latent) and returns
    logits (a head: the latent). It is always in eval mode.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, layers: Sequence[Layer] | None = None,
                 outputs: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.input_shape = tuple(int(v) for v in input_shape)
        #: graph form: layer -> the name of the graph node that is its output (an inserted slot once hooked)
        self._outputs: dict[str, str] | None = dict(outputs) if outputs is not None else None
        self._candidates: tuple[Layer, ...] | None = tuple(layers) if layers is not None else None
        self._installed: set[str] = set()
        self._active: Mapping[str, Hook] = {}
        self.__dict__["_graph_cache"] = None  # the module form's export, cached (not a submodule: no state)
        self.train(False)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_module(cls, model: nn.Module, input_shape: Sequence[int]) -> Network:
        """Any ``nn.Module`` classifier, put in eval mode."""
        return cls(model.eval(), input_shape)

    @classmethod
    def from_graph(cls, module: torch.fx.GraphModule, input_shape: Sequence[int]) -> Network:
        """A ``torch.export`` program's module (``ExportedProgram.module()``), its layers read off its graph."""
        found = split.graph_layers(module)
        return cls(module, input_shape, layers=found.layers, outputs=found.outputs)

    @property
    def graph_form(self) -> bool:
        return self._outputs is not None

    def train(self, mode: bool = True) -> Network:
        if mode:
            raise RuntimeError("a Network runs a trained classifier for inference; train the nn.Module itself")
        self.training = False
        if self._outputs is None:  # a graph module refuses eval(): a program is exported in eval mode
            self.model.eval()
        return self

    # -- layers ----------------------------------------------------------------------------------
    def candidates(self) -> tuple[Layer, ...]:
        """Every candidate layer in execution order (probed once, on first use)."""
        if self._candidates is None:
            self._candidates = probe_modules(self.model, self.input_shape)
        return self._candidates

    @property
    def layers(self) -> tuple[str, ...]:
        """The candidate layer names, in execution order."""
        return tuple(layer.name for layer in self.candidates())

    def stages(self) -> tuple[Layer, ...]:
        """The block-level candidates (``fire sweep``'s layers; the default layer rule chooses among them)."""
        return tuple(layer for layer in self.candidates() if layer.stage)

    def layer(self, name: str) -> Layer:
        """The candidate ``name``; a :class:`LayerError` listing the near matches if there is none."""
        for layer in self.candidates():
            if layer.name == name:
                return layer
        raise LayerError(self._unknown([name]))

    def _unknown(self, names: Sequence[str]) -> str:
        candidates = self.layers
        lines = []
        for name in names:
            close = near(name, candidates)
            hint = f"did you mean {', '.join(close)}?" if close else "no near match"
            lines.append(f"{name!r} ({hint})")
        shown = ", ".join(s.name for s in self.stages()) or ", ".join(candidates[:20])
        return (f"no layer {'; '.join(lines)}. A layer is the module path of a module called once per forward "
                f"that returns one tensor with the batch dimension; this network's stages: {shown} "
                "(all candidates: `fire import model --list-layers` or `fire sweep`)")

    def check_hooks(self, layers: Iterable[str]) -> None:
        """A :class:`LayerError` naming the unknown ones with their near matches; else every layer gets its hook
        dispatcher now (so the first batch pays nothing)."""
        layers = list(layers)
        known = set(self.layers)
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise LayerError(self._unknown(unknown))
        self._install([name for name in layers if name not in self._installed])

    def _install(self, layers: Sequence[str]) -> None:
        if not layers:
            return
        if self._outputs is None:
            modules = dict(self.model.named_modules())
            for name in layers:
                self._dispatch_at(modules[name], name)
                self._installed.add(name)
            return
        for name in layers:
            old = self._outputs[name]
            node, slot = split.insert_slot(self.model, old)
            self._dispatch_at(slot, name)
            for other, output in self._outputs.items():  # its aliases now end at the slot too
                if output == old:
                    self._outputs[other] = node
            self._installed.add(name)
        self.model.recompile()

    def _dispatch_at(self, module: nn.Module, name: str) -> None:
        """Wrap ``module``'s forward (this instance only): its output goes through the batch's hook for ``name``."""
        inner = module.forward
        network = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = inner(*args, **kwargs)
            hook = network._active.get(name)
            return output if hook is None else hook(output)

        forward.fire_layer = name  # type: ignore[attr-defined]
        module.forward = forward

    # -- running -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, hooks: Mapping[str, Hook] | None = None) -> torch.Tensor:
        """The network's output; ``hooks[layer]`` (if any) replaces the latent where ``layer`` returns."""
        if not hooks:
            return self.model(x)
        missing = [name for name in hooks if name not in self._installed]
        if missing:
            self.check_hooks(missing)
        previous, self._active = self._active, hooks
        try:
            return self.model(x)
        finally:
            self._active = previous

    def latents(self, x: torch.Tensor, layer: str, hooks: Mapping[str, Hook] | None = None) -> torch.Tensor:
        """The latent at ``layer`` (after ``hooks`` upstream, if any); the forward pass stops there."""
        caught: list[torch.Tensor] = []
        before = (hooks or {}).get(layer)

        def catch(latent: torch.Tensor) -> torch.Tensor:
            caught.append(before(latent) if before is not None else latent)
            raise _Reached

        try:
            self(x, {**(hooks or {}), layer: catch})
        except _Reached:
            return caught[0]
        raise LayerError(f"the forward pass never reached {layer!r}")

    # -- the cut -----------------------------------------------------------------------------------
    def graph(self) -> tuple[torch.fx.GraphModule, dict[str, str]]:
        """The network as a flat graph with each layer's output node (an ``nn.Module`` is exported once for it,
        with a dynamic batch dimension); :class:`CutError` if it cannot be exported."""
        if self._outputs is not None:
            return self.model, self._outputs
        if self._graph_cache is None:
            module = split.export_module(self.model, self.input_shape)
            self.__dict__["_graph_cache"] = (module, split.graph_layers(module).outputs)
        return self._graph_cache

    def cut(self, layer: str) -> tuple[Network, Network]:
        """Head (input -> the latent at ``layer``) and tail (that latent -> logits), exact, each a Network with
        the layers it runs; :class:`CutError` with the reason where the network cannot be cut there."""
        at = self.layer(layer)
        module, outputs = self.graph()
        node = outputs.get(at.name)
        if node is None:
            raise CutError(f"cannot cut at {layer!r}: its module's output is not one value in the network's graph "
                           "(torch.export): it is inlined, returns its input unchanged, or is called several times")
        head, tail, head_nodes, tail_nodes = split.cut_graph(module, node, layer)
        before = [c for c in self.candidates() if outputs.get(c.name) in head_nodes]
        after = [c for c in self.candidates() if outputs.get(c.name) in tail_nodes]
        head_net = Network(head, self.input_shape, layers=before,
                           outputs={c.name: head_nodes[outputs[c.name]] for c in before})
        tail_net = Network(tail, at.shape, layers=after,
                           outputs={c.name: tail_nodes[outputs[c.name]] for c in after})
        return head_net, tail_net
