"""The sharded parameter: an ``nn.Parameter`` that declares what checkpoint tensor it holds.

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

__all__ = ["ShardedParameter", "set_data"]


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
