"""The sharded parameter: an ``nn.Parameter`` that declares what checkpoint tensor it holds, and
:class:`ShardedModule`, the loading protocol of the modules that own them.

Each parallel layer's checkpoint tensor becomes one :class:`ShardedParameter`: its ``spec``
(quant.schemes.TensorSpec: name, kind, value rules), the dim it is split along across ranks
(``tp_dim``, None = replicated), its local checkpoint-layout shape / dtype (``raw_shape``,
``raw_dtype``) and the layer's ``weight_loader``. :func:`set_data` is the one way to put new
data in a parameter, also a meta one (``param.data = cpu`` is refused for meta), keeping all
of its attributes (Megatron's ``partition_dim`` etc. too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quant.schemes import TensorSpec
from tp_layers.context import TPContext
from tp_layers.sharding import (
    SHARD_DIM,
    Segment,
    SourcePadding,
    full_shape,
    read_range,
    shard_ranges,
    source_dtype,
)

__all__ = ["ShardedModule", "ShardedParameter", "set_data"]


class ShardedParameter(nn.Parameter):
    """Frozen parameter of one checkpoint tensor's local shard (vLLM's BasevLLMParameter)."""

    spec: TensorSpec
    tp_dim: int | None
    raw_shape: tuple[int, ...]
    raw_dtype: torch.dtype
    weight_loader: Callable[..., None]

    def __new__(
        cls,
        data: torch.Tensor,
        spec: TensorSpec | None = None,
        tp_dim: int | None = None,
        weight_loader: Callable[..., None] | None = None,
    ) -> ShardedParameter:
        p = super().__new__(cls, data, requires_grad=False)
        if spec is not None:
            p.spec, p.tp_dim, p.weight_loader = spec, tp_dim, weight_loader
            p.raw_shape, p.raw_dtype = tuple(data.shape), data.dtype
        # shard ids of replicated per-segment values loaded since the last full load
        p.segments_seen = {}
        return p

    @property
    def kind(self) -> str:
        return self.spec.kind

    def materialize(self, data: torch.Tensor) -> ShardedParameter:
        """A parameter holding ``data`` with this one's attributes."""
        return _with_attrs(ShardedParameter(data), self.__dict__)

    def empty(self, device: torch.device | None = None) -> torch.Tensor:
        """An uninitialised checkpoint-layout tensor of this shard (meta -> CPU)."""
        dev = device or (self.device if self.device.type != "meta" else torch.device("cpu"))
        return torch.empty(self.raw_shape, dtype=self.raw_dtype, device=dev)

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedParameter:
        new = ShardedParameter(self.data.clone(memory_format=torch.preserve_format))
        memo[id(self)] = new  # before the attributes: weight_loader refers back to the layer
        return _with_attrs(new, copy.deepcopy(self.__dict__, memo))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild, (self.data, dict(self.__dict__)))


def _with_attrs(p: nn.Parameter, attrs: dict[str, Any]) -> Any:
    """``p`` with the (public) attributes ``attrs`` of another parameter."""
    p.__dict__.update({k: v for k, v in attrs.items() if not k.startswith("_")})
    return p


def _rebuild(data: torch.Tensor, attrs: dict[str, Any]) -> ShardedParameter:
    return _with_attrs(ShardedParameter(data), attrs)


def set_data(module: nn.Module, name: str, data: torch.Tensor) -> None:
    """Make ``module``'s parameter ``name`` hold ``data``, keeping the parameter's attributes;
    a meta parameter (or one on another device) is replaced by one on ``data``'s device."""
    old = module._parameters[name]
    assert old is not None
    if old.device.type != "meta" and old.device == data.device:
        old.data = data
        return
    if isinstance(old, ShardedParameter):
        module._parameters[name] = old.materialize(data)
    else:
        module._parameters[name] = _with_attrs(nn.Parameter(data, old.requires_grad), old.__dict__)


class ShardedModule(nn.Module):
    """A module whose checkpoint tensors are :class:`ShardedParameter` s: checking, sharded
    loading (full tensors, lazy slices, segments), the staged / committed protocol of
    ``tp_layers.loader`` and ``process_weights_after_loading``. Shared by the parallel linear
    layers and the vocab-parallel embedding.

    A subclass sets ``tp`` (TPContext), ``method`` (its ``process_weights_after_loading(layer,
    tensors)`` returns the kernel arguments, ``"weight"`` installed as the weight), ``scheme``,
    ``prefix``, ``_device``, ``_processed``, ``kernel_args`` and ``source_padding``, and
    defines ``segments``.

    The forward reads ``param_views`` (plain-tensor views of the registered parameters, same
    storage, bound by ``install``), never the parameters: dynamo before torch 2.8 cannot trace
    an ``nn.Parameter`` subclass (pytorch/pytorch#149792), and so cannot compile a forward that
    touches a :class:`ShardedParameter`.
    """

    parallel: str = ""  # "row" | "column": SHARD_DIM's style
    #: valid ``shard_id`` values of ``weight_loader`` (segment i <- shard_ids[i])
    shard_ids: tuple[Any, ...] = ()
    #: a checkpoint stored without the padding this module holds (read through it)
    source_padding: SourcePadding | None = None
    tp: TPContext
    method: Any
    prefix: str
    kernel_args: dict[str, Any]
    #: name -> plain ``torch.Tensor`` view of that parameter (None: a None parameter)
    param_views: dict[str, torch.Tensor | None]
    _processed: bool
    _device: torch.device

    @property
    def where(self) -> str:
        return self.prefix or type(self).__name__

    def segments(self, spec: TensorSpec, dim: int) -> list[Segment]:
        """How checkpoint tensor ``spec`` is split along ``dim`` (its sharded dim)."""
        raise NotImplementedError

    def add_checkpoint_param(self, spec: TensorSpec) -> None:
        """Register the local shard of checkpoint tensor ``spec`` as a frozen parameter."""
        dim = SHARD_DIM[(self.parallel, spec.kind)]
        shape = list(spec.shape)
        if dim is not None:
            shape[dim] = sum(s.local for s in self.segments(spec, dim))
        data = torch.empty(shape, dtype=spec.storage_dtype, device=self._device)
        self.register_parameter(spec.name, ShardedParameter(data, spec, dim, self.weight_loader))

    def checkpoint_params(self) -> dict[str, ShardedParameter]:
        return {
            n: p for n, p in self.named_parameters(recurse=False) if isinstance(p, ShardedParameter)
        }

    # -- loading ---------------------------------------------------------------------------
    def _segment_index(self, shard_id: Any) -> int | None:
        if shard_id is None:
            return None
        if shard_id in self.shard_ids and not isinstance(shard_id, bool):
            return self.shard_ids.index(shard_id)
        raise ValueError(
            f"{self.where}: shard_id must be one of {list(self.shard_ids)}, got {shard_id!r}"
        )

    def _expected_full(self, p: ShardedParameter, index: int | None) -> tuple[tuple[int, ...], ...]:
        if p.tp_dim is None:  # a merged layer's one value per segment may come stacked
            many = index is None and p.spec.kind == "tensor" and len(self.shard_ids) > 1
            return p.spec.allowed_shapes() + (((len(self.shard_ids),),) if many else ())
        if index is None:
            return p.spec.allowed_shapes()
        size = self.segments(p.spec, p.tp_dim)[index].size
        return tuple((*s[: p.tp_dim], size, *s[p.tp_dim + 1 :]) for s in p.spec.allowed_shapes())

    def _check_source(
        self, p: ShardedParameter, loaded: Any, index: int | None, label: str
    ) -> None:
        shape, allowed = full_shape(loaded), self._expected_full(p, index)
        if shape not in allowed:
            raise ValueError(
                f"{label}: checkpoint shape {list(shape)} does not match the expected "
                f"{' or '.join(str(list(s)) for s in allowed)}"
                + (f" (shard {self.shard_ids[index]!r})" if index is not None else "")
            )
        stored = source_dtype(loaded)
        if stored not in p.spec.allowed_dtypes():
            raise ValueError(
                f"{label}: checkpoint dtype {stored} does not match the expected "
                f"{' or '.join(str(d) for d in p.spec.allowed_dtypes())}"
            )

    def load_into(
        self,
        name: str,
        dest: torch.Tensor,
        loaded: Any,
        shard_id: Any = None,
        seen: dict[Any, torch.Tensor] | None = None,
    ) -> None:
        """Write this rank's part of checkpoint tensor ``loaded`` (full tensor or safetensors
        slice) for parameter ``name`` into ``dest`` (a tensor of the parameter's raw shape),
        checked by its spec. ``seen``: per-segment values of a replicated tensor already
        loaded into ``dest`` (shard id -> value); a merged layer needs them all equal."""
        p = self.checkpoint_params().get(name)
        if p is None:
            raise KeyError(f"{self.where}: no parameter {name!r}")
        label, index = f"{self.where}.{name}", self._segment_index(shard_id)
        if self.source_padding is not None:
            want = self._expected_full(p, index)[0]
            loaded = self.source_padding.apply(loaded, want, edge=p.spec.values == "scale")
        self._check_source(p, loaded, index, label)
        if p.tp_dim is None:
            whole = p.spec.validate(read_range(loaded, None, 0, 0), label).to(dest.dtype)
            pieces = [(shard_id, whole)]
            if index is None and full_shape(loaded) not in p.spec.allowed_shapes():  # stacked
                pieces, seen = list(zip(self.shard_ids, whole.split(1))), {}
            for sid, part in pieces:
                if sid is not None and seen is not None:
                    self._agree(label, sid, part.reshape(dest.shape), seen)
            dest.copy_(pieces[-1][1].reshape(dest.shape))
            return
        for src, length, dst in shard_ranges(self.segments(p.spec, p.tp_dim), index):
            target = dest.narrow(p.tp_dim, dst, length)
            if p.spec.values == "any":  # no value checks: read (+ cast) in place
                read_range(loaded, p.tp_dim, src, length, out=target)
            else:
                part = p.spec.validate(read_range(loaded, p.tp_dim, src, length), label)
                target.copy_(part.reshape(target.shape))

    def load_local(self, name: str, dest: torch.Tensor, t: torch.Tensor) -> None:
        """Write an already-local checkpoint-layout tensor ``t`` (this rank's shard, e.g. a
        Megatron shard) for parameter ``name`` into ``dest``, checked by its spec."""
        p, label = self.checkpoint_params()[name], f"{self.where}.{name}"
        raw = p.raw_dtype
        if t.is_floating_point() != raw.is_floating_point or (
            not raw.is_floating_point and t.dtype != raw
        ):
            raise ValueError(
                f"{label}: dtype must be {raw}"
                f"{' (or another float dtype)' if raw.is_floating_point else ''}, got {t.dtype}"
            )
        if tuple(t.shape) != tuple(p.raw_shape):
            raise ValueError(
                f"{label}: local shape must be {list(p.raw_shape)}, got {list(t.shape)}"
            )
        dest.copy_(p.spec.validate(t.detach(), label).to(raw))

    @staticmethod
    def _agree(
        label: str, shard_id: Any, part: torch.Tensor, seen: dict[Any, torch.Tensor]
    ) -> None:
        if shard_id in seen:  # the same segment again: a new load starts
            seen.clear()
        for other, value in seen.items():
            if not torch.equal(value, part):
                raise ValueError(
                    f"{label}: segment {shard_id!r} has {part.tolist()}, but segment {other!r} "
                    f"had {value.tolist()}; a merged layer needs one value for all segments"
                )
        seen[shard_id] = part.clone()

    def weight_loader(self, param: ShardedParameter, loaded: Any, shard_id: Any = None) -> None:
        """vLLM-style loader: keep this rank's shard of ``loaded`` in ``param`` (in place).

        After processing, the first load re-materialises every parameter in checkpoint layout
        (so no stale processed copy survives) and the layer must be processed again.
        """
        name = next(n for n, q in self.checkpoint_params().items() if q is param)
        if self._processed:
            self.unprocess()
        if shard_id is None:
            param.segments_seen.clear()
        dest = param.data if param.device.type != "meta" else param.empty()
        self.load_into(name, dest, loaded, shard_id, param.segments_seen)
        set_data(self, name, dest)

    def unprocess(self) -> None:
        """Drop processed tensors: every parameter back to an empty checkpoint-layout tensor."""
        for p in self.checkpoint_params().values():
            p.data = p.empty()
        self._processed = False
        self.kernel_args, self.param_views = {}, {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The loaded local checkpoint-layout tensors by name (before processing)."""
        return {n: p.data for n, p in self.checkpoint_params().items()}

    def install(
        self, args: dict[str, Any] | None, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Commit (cannot fail): ``tensors`` (local checkpoint layout; default: as loaded) into
        the parameters, then the kernel arguments ``args`` (the method's
        ``process_weights_after_loading``; None: unprocessed) into use."""
        for name, t in (tensors or {}).items():
            set_data(self, name, t)
        self.kernel_args, self.param_views, self._processed = {}, {}, False
        if args is not None:
            args = dict(args)
            weight = args.pop("weight", None)  # None: a tied weight another module holds
            if weight is not None:
                set_data(self, "weight", weight)
            self.kernel_args, self._processed = args, True
            self._bind_views()

    def _bind_views(self) -> None:
        """``param_views`` of the current parameters (``detach``: a plain tensor sharing the
        parameter's storage, whatever its subclass)."""
        self.param_views = {
            n: None if p is None else p.detach() for n, p in self._parameters.items()
        }

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        """``.to()`` / ``.cuda()`` / ...: the views follow the moved parameters."""
        out = super()._apply(fn, recurse)
        if self.__dict__.get("_processed"):
            self._bind_views()
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["param_views"] = {}  # rebound by __setstate__ (a copy would not share storage)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state.get("_processed"):
            self._bind_views()

    def process_weights_after_loading(self) -> None:
        """Transpose / NZ-cast / pack scales for the kernels. Idempotent."""
        if self._processed:
            return
        if any(p.device.type == "meta" for p in self.checkpoint_params().values()):
            raise RuntimeError(f"{self.where}: weights are not loaded (meta tensors)")
        with torch.no_grad():
            self.install(self.method.process_weights_after_loading(self, self.checkpoint_tensors()))

    def _ensure_processed(self) -> None:
        if not self._processed:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.where}: call process_weights_after_loading() before compiling"
                )
            self.process_weights_after_loading()
