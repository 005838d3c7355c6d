"""Megatron-core adapter: our Column / Row parallel layers behind Megatron's constructor
signatures, for the ``linear_qkv`` / ``linear_fc1`` (column) and ``linear_proj`` / ``linear_fc2``
(row) slots of a Megatron ``ModuleSpec`` (``get_gpt_layer_local_spec`` style)::

    from tp_layers.megatron import gpt_layer_spec, megatron_linear_classes
    spec = gpt_layer_spec()                              # FP, like get_gpt_layer_local_spec()
    spec = gpt_layer_spec(quant=W8A16())                 # quantized on load / init
    Column, Row = megatron_linear_classes(quant=W8A16()) # or put the classes in a spec yourself

What the adapter does for Megatron (megatron-core 0.16.1):

- forward returns ``(output, bias)`` like Megatron's layers (bias None unless
  ``skip_bias_add``); the column layer accepts ``runtime_gather_output``.
- Megatron's activations are ``[s, b, h]``, ours ``(b, s, h)``: the row layer picks the phase
  from the sequence dim (prefill -> fused ``mm_all_reduce_base``, decode -> matmul +
  all-reduce) unless the caller set one with ``tp_layers.phase(...)``.
- ``sequence_parallel=True`` in the config (TP > 1; at TP 1 it is off, as in Megatron): the
  column layers take Megatron's sequence-sharded ``[s/tp, b, h]`` and all-gather it along s fused
  with the matmul (``all_gather_base_mm``), the row layers reduce-scatter their ``[s, b, h]``
  output along s fused with the matmul (``mm_reduce_scatter_base``) and add the bias after it
  (Megatron's layout and order; tp_layers.sequence). In Megatron s divides by the TP size.
- Initialisation follows Megatron's ``use_cpu_initialization`` path: ``init_method`` on the
  fp32 master weight of the full layer, cast to ``params_dtype``, split by partition dim and
  ``stride`` exactly as ``_initialize_affine_weight_cpu`` does; bias zero. With the same torch
  seed our layer therefore holds the same shard as Megatron's (with ``use_cpu_initialization
  =False`` Megatron initialises per rank on the GPU RNG tracker; we still use the CPU master).
- ``state_dict`` / ``load_state_dict`` use Megatron's keys and layout (``weight`` as the local
  (n/tp, k) or (n, k/tp) shard, ``bias``, ``_extra_state``), so a Megatron model's state dict,
  or one rank's checkpoint shard, loads directly (``load_megatron_shard`` does the same from
  tensors). Megatron's ``linear_qkv`` shard is already interleaved per query group and
  ``linear_fc1`` (GLU, stride 2) already holds [gate_r | up_r]: both are loaded as they are.
  Quantized schemes quantize the float shard on load (static W8A8 needs calibrated tensors:
  load those through the parameters' ``weight_loader`` instead).
- ``sharded_state_dict`` for ``dist_checkpointing``, the Megatron parameter attributes
  (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``, ``allreduce``,
  ``sequence_parallel`` on the row bias), and the module attributes Megatron code reads
  (``config``, ``tp_group``, ``sequence_parallel``, ``tp_comm_buffer_name``, ``is_expert``,
  ``input_size_per_partition`` / ``output_size_per_partition``, ``backward_dw``).

Inference only: parameters are frozen (no autograd through the fused op). Not supported, with
a clear error: expert parallel communication and ``skip_weight_param_allocation`` (weight
passed to forward).

Megatron is imported only here, so ``import tp_layers`` works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from quant.algorithms import quantize_linear
from quant.schemes import Scheme
from tp_layers.context import TPContext
from tp_layers.linear import ColumnParallelLinear, ParallelLinearBase, RowParallelLinear
from tp_layers.loader import load_layer
from tp_layers.phase import Phase, infer_phase, phase

__all__ = [
    "MegatronColumnParallelLinear",
    "MegatronLinearClasses",
    "MegatronRowParallelLinear",
    "gpt_layer_spec",
    "iter_adapter_layers",
    "megatron_linear_classes",
    "megatron_phase",
    "megatron_shard",
]


def megatron_phase(x: torch.Tensor, n: int | None = None) -> Phase:
    """The phase of a Megatron ``[s, b, h]`` activation: the explicit ``tp_layers.phase`` if
    set, else ``infer_phase`` (with the layer's output size ``n``) applied as if the input
    were ``(b, s, h)``."""
    return infer_phase(x.transpose(0, 1) if x.dim() >= 3 else x, n)


def megatron_shard(
    master: torch.Tensor, partition_dim: int, stride: int, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's part of a full tensor as Megatron's ``_initialize_affine_weight_cpu`` cuts
    it: split ``partition_dim`` into ``stride * world_size`` equal chunks and take chunks
    ``rank, rank + world_size, ...`` (stride 1: plain contiguous sharding)."""
    full = master.shape[partition_dim]
    if stride < 1 or full % (stride * world_size):
        raise ValueError(
            f"megatron_shard: size {full} along dim {partition_dim} does not divide into "
            f"stride {stride} x TP {world_size} chunks"
        )
    chunks = torch.split(master, full // (stride * world_size), dim=partition_dim)
    return torch.cat(chunks[rank::world_size], dim=partition_dim)


def _resolve_tp_group(tp_group: Any, is_expert: bool) -> Any:
    """Megatron's default: the (expert) tensor-parallel group of ``parallel_state``."""
    if tp_group is not None or not torch.distributed.is_initialized():
        return tp_group
    if not parallel_state.is_initialized():
        return None
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


class _MegatronLinearMixin(ParallelLinearBase):
    """Megatron behaviour shared by the column and row adapters (MRO: adapter, this mixin,
    our Column / Row layer, ParallelLinearBase)."""

    #: Quant scheme used when the constructor gets no ``quant=`` (None = FP); set by
    #: ``megatron_linear_classes`` on generated subclasses.
    quant: ClassVar[Scheme | None] = None
    #: Megatron's partition dim of the weight: 0 (column) or 1 (row).
    megatron_partition_dim: ClassVar[int] = 0

    # Instance attributes set by _megatron_setup (declared for type checkers).
    config: ModelParallelConfig
    tp_group: Any
    stride: int
    master_weight: torch.Tensor | None

    def _megatron_check(
        self,
        config: ModelParallelConfig,
        is_expert: bool,
        where: str,
    ) -> None:
        if not isinstance(config, ModelParallelConfig):
            raise TypeError(
                f"{where}: config must be a megatron ModelParallelConfig / TransformerConfig, "
                f"got {type(config).__name__}"
            )
        if is_expert and config.expert_model_parallel_size > 1:
            raise ValueError(
                f"{where}: expert-parallel communication (is_expert with "
                "expert_model_parallel_size > 1) is not supported"
            )

    def _megatron_setup(
        self,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], Any] | None,
        stride: int,
        keep_master_weight_for_test: bool,
        is_expert: bool,
        tp_comm_buffer_name: str | None,
        tp_group: Any,
    ) -> None:
        self.config = config
        self.tp_group = tp_group
        self.stride = int(stride)
        self.is_expert = bool(is_expert)
        self.expert_parallel = config.expert_model_parallel_size > 1
        self.explicit_expert_comm = False
        self.tp_comm_buffer_name = tp_comm_buffer_name
        self.gradient_accumulation_fusion = False
        self.master_weight = None
        # Megatron's tensor attributes, describing the Megatron (checkpoint) layout.
        w = self.weight
        w.tensor_model_parallel = True
        w.partition_dim = self.megatron_partition_dim
        w.partition_stride = self.stride
        w.allreduce = True
        if self.bias is not None:
            self.bias.allreduce = True
            if self.megatron_partition_dim == 0:
                self.bias.tensor_model_parallel = True
                self.bias.partition_dim = 0
                self.bias.partition_stride = self.stride
            else:
                self.bias.sequence_parallel = self.sequence_parallel
        if config.perform_initialization:
            if init_method is None:
                raise ValueError(f"{self.where}: init_method is required to initialise weights")
            master = self._init_master(init_method)
            local_w = megatron_shard(
                master, self.megatron_partition_dim, self.stride, self.tp.rank, self.tp.size
            )
            local_b = None
            if self.has_bias:
                n_local = local_w.shape[0]
                local_b = torch.zeros(n_local, dtype=self.params_dtype)
            self.load_megatron_shard(local_w, local_b)
            if keep_master_weight_for_test:
                self.master_weight = master

    def _init_master(self, init_method: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """The full (output, input) weight as Megatron's CPU path makes it: ``init_method`` on
        an fp32 tensor (one draw from the default CPU generator), cast to params_dtype."""
        master = torch.empty(self.output_size, self.input_size, dtype=torch.float32)
        with torch.no_grad():
            init_method(master)
        return master.to(self.params_dtype)

    # -- Megatron-layout loading -------------------------------------------------------------
    def _megatron_weight_shape(self) -> tuple[int, int]:
        """A Megatron rank's weight: (n/tp, k) column, (n, k/tp) row."""
        return (self.output_size_local, self.input_size_local)

    def _megatron_bias_len(self) -> int:
        return self.output_size_local

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(in_features={self.input_size}, out_features="
            f"{self.output_size}, bias={self.has_bias}, TP={self.tp.size}, quant={self.scheme.name})"
        )

    def load_megatron_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's Megatron shard: ``weight`` as a Megatron rank holds it ((n/tp, k)
        column, (n, k/tp) row, strided / qkv-interleaved as Megatron stored it) and ``bias``
        ((n/tp,) column, (n,) row; required iff the layer has a bias). Quantized schemes
        quantize the float shard here. The layer is re-processed on its next forward."""
        where = self.where
        expect_w = self._megatron_weight_shape()
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expect_w:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"{where}.weight: Megatron shard must be {list(expect_w)}, got {got}")
        if not weight.is_floating_point():
            raise ValueError(f"{where}.weight: Megatron shard must be float, got {weight.dtype}")
        if self.has_bias:
            if bias is None:
                raise ValueError(f"{where}.bias: the layer has a bias; pass its Megatron shard")
            if tuple(bias.shape) != (self._megatron_bias_len(),):
                raise ValueError(
                    f"{where}.bias: Megatron shard must be [{self._megatron_bias_len()}], "
                    f"got {tuple(bias.shape)}"
                )
        elif bias is not None:
            raise ValueError(f"{where}.bias: the layer was built with bias=False")
        if self.scheme.needs_calibration:
            raise ValueError(
                f"{where}: static W8A8 needs calibrated activation scales; load a quantized "
                "checkpoint through the parameters' weight_loader instead of a float shard"
            )
        with torch.no_grad():
            if self.scheme.is_quantized:
                tensors = quantize_linear(
                    weight.detach().float(),
                    None if bias is None else bias.detach().float(),
                    self.scheme,
                    model_dtype=self.params_dtype,
                )
            else:  # FP: the exact values (cast to params_dtype in _load_local)
                tensors = {"weight": weight.detach()}
                if bias is not None:
                    tensors["bias"] = bias.detach()
            self._load_local(tensors)

    def _load_local(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write already-local checkpoint-layout tensors into the parameters (all of them)."""
        missing = sorted(set(self.checkpoint_params()) - set(tensors))
        if missing:
            raise ValueError(f"{self.where}: missing tensors {missing} for a local load")
        load_layer(self, tensors, local=True, process=False)

    # -- state dict in Megatron's keys and layout --------------------------------------------
    def _megatron_state(self, keep_vars: bool) -> dict[str, torch.Tensor]:
        """Checkpoint-layout local tensors. FP: Megatron's ``weight`` / ``bias``. Quantized:
        the scheme's tensors (int8 ``weight``, scales, ...) as loaded, before processing."""
        params = self.checkpoint_params()
        if self._processed and self.scheme.is_quantized:
            raise RuntimeError(
                f"{self.where}: a processed {self.scheme.name} layer cannot be saved in checkpoint "
                "layout (its tensors are in kernel layout); save before the first forward"
            )
        out: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            t: torch.Tensor = p if keep_vars else p.detach()
            if self._processed and name == "weight":  # FP kernel layout is (k, n): undo it
                t = p.detach().t()
            out[name] = t
        return out

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        for name, t in self._megatron_state(keep_vars).items():
            destination[prefix + name] = t
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        params = self.checkpoint_params()
        names = [*params, "_extra_state"]
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        own = {k: v for k, v in own.items() if "." not in k}  # not a child's key
        if strict:
            unexpected_keys.extend(prefix + k for k in own if k not in names)
        weight = own.get("weight")
        # A float weight is Megatron's shard (quantized on load if the scheme is quantized);
        # anything else is the scheme's own tensors, as _save_to_state_dict wrote them.
        megatron = weight is not None and weight.is_floating_point()
        needed = ["weight", "bias"] if self.has_bias else ["weight"]
        absent = [n for n in (needed if megatron or weight is None else params) if n not in own]
        if absent:
            missing_keys.extend(prefix + n for n in absent)
            return
        try:
            if megatron:
                self.load_megatron_shard(weight, own.get("bias"))
            else:
                self._load_local({n: own[n] for n in params})
        except (ValueError, TypeError) as e:
            error_msgs.append(str(e))

    def get_extra_state(self) -> None:
        """Megatron's layers keep an empty ``_extra_state`` for TE compatibility; so do we."""
        return None

    def set_extra_state(self, state: Any) -> None:
        """Extra state is ignored (as in Megatron's local layers)."""

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Megatron ``dist_checkpointing`` entries: as Megatron's layer of the same kind."""
        axis_map = {"weight": 0, "bias": 0} if self.megatron_partition_dim == 0 else {"weight": 1}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            axis_map,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )

    def backward_dw(self) -> None:
        """Delayed weight-gradient hook Megatron's attention / MLP call: nothing to do here
        (inference-only layers, as Megatron's own local layers also do nothing)."""


def _base_kwargs(
    cls: type,
    config: ModelParallelConfig,
    quant: Scheme | None,
    tp_group: Any,
    is_expert: bool,
    prefix: str,
) -> dict[str, Any]:
    tp = TPContext.from_group(_resolve_tp_group(tp_group, is_expert))
    return {
        "quant": quant if quant is not None else cls.quant,
        "tp": tp,
        "sequence_parallel": config.sequence_parallel and tp.size > 1,
        "params_dtype": config.params_dtype,
        "prefix": prefix,
        "device": _model_device(config),
    }


def _model_device(config: ModelParallelConfig) -> torch.device:
    """Where Megatron would put the parameters: the CPU with ``use_cpu_initialization``, else
    the current accelerator (CUDA, or an NPU with torch_npu loaded), else the default device."""
    if config.use_cpu_initialization:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    npu = getattr(torch, "npu", None)  # present only once torch_npu is imported
    if npu is not None and npu.is_available():
        return torch.device("npu", npu.current_device())
    return torch.get_default_device()


class MegatronColumnParallelLinear(_MegatronLinearMixin, ColumnParallelLinear):
    """Column-parallel layer with Megatron's ``ColumnParallelLinear`` constructor and forward
    (``linear_qkv`` / ``linear_fc1`` slots). The weight is sharded along n as Megatron does it
    (plain, or with ``stride``), so Megatron's local shards load unchanged."""

    megatron_partition_dim = 0

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], Any] | None,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        embedding_activation_buffer: list[torch.Tensor] | None = None,
        grad_output_buffer: list[torch.Tensor] | None = None,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        disable_grad_reduce: bool = False,
        tp_group: Any = None,
        quant: Scheme | None = None,
        prefix: str = "",
    ) -> None:
        where = prefix or type(self).__name__
        self._megatron_check(config, is_expert, where)
        if skip_weight_param_allocation:
            raise ValueError(
                f"{where}: skip_weight_param_allocation (weight passed to forward, e.g. a tied "
                "output layer) is not supported; keep Megatron's layer for that slot"
            )
        if getattr(config, "defer_embedding_wgrad_compute", False):
            raise ValueError(f"{where}: defer_embedding_wgrad_compute is a training feature")
        super().__init__(
            input_size,
            output_size,
            bias,
            gather_output,
            skip_bias_add,
            **_base_kwargs(type(self), config, quant, tp_group, is_expert, prefix),
        )
        self.output_size_per_partition = self.output_size_local
        self.embedding_activation_buffer = embedding_activation_buffer
        self.grad_output_buffer = grad_output_buffer
        self.disable_grad_reduce = bool(disable_grad_reduce)
        self.allreduce_dgrad = False
        self._megatron_setup(
            config,
            init_method,
            stride,
            keep_master_weight_for_test,
            is_expert,
            tp_comm_buffer_name,
            self.tp.group,
        )

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, input_size] -> ([s, b, output_size / tp] (or gathered), bias or None)``;
        sequence parallel: ``[s / tp, b, input_size]`` in."""
        if weight is not None:
            raise ValueError(f"{self.where}: a weight passed to forward is not supported")
        with phase(megatron_phase(input_)):
            out = ColumnParallelLinear.forward(self, input_, gather=runtime_gather_output)
        return out if self.skip_bias_add else (out, None)


class MegatronRowParallelLinear(_MegatronLinearMixin, RowParallelLinear):
    """Row-parallel layer with Megatron's ``RowParallelLinear`` constructor and forward
    (``linear_proj`` / ``linear_fc2`` slots). Prefill (sequence length > 1 in Megatron's
    ``[s, b, h]``, or an explicit ``tp_layers.phase``) runs the fused ``mm_all_reduce_base``;
    decode a local matmul and a separate all-reduce."""

    megatron_partition_dim = 1

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable[[torch.Tensor], Any] | None,
        bias: bool,
        input_is_parallel: bool,
        skip_bias_add: bool,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group: Any = None,
        quant: Scheme | None = None,
        prefix: str = "",
    ) -> None:
        where = prefix or type(self).__name__
        self._megatron_check(config, is_expert, where)
        super().__init__(
            input_size,
            output_size,
            bias,
            input_is_parallel,
            True,
            skip_bias_add,
            **_base_kwargs(type(self), config, quant, tp_group, is_expert, prefix),
        )
        self.input_size_per_partition = self.input_size_local
        self._megatron_setup(
            config,
            init_method,
            stride,
            keep_master_weight_for_test,
            is_expert,
            tp_comm_buffer_name,
            self.tp.group,
        )

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[s, b, input_size / tp]`` (or full with ``input_is_parallel=False``) ->
        ``([s, b, output_size], bias or None)``, summed over the TP group; sequence parallel:
        ``[s / tp, b, output_size]`` out (reduce-scattered along s)."""
        with phase(megatron_phase(input_, self.output_size)):
            out = RowParallelLinear.forward(self, input_)
        if self.skip_bias_add:
            return out
        return out, None


class MegatronLinearClasses(NamedTuple):
    """The column and row classes for one quant scheme (see ``megatron_linear_classes``)."""

    column: type[MegatronColumnParallelLinear]
    row: type[MegatronRowParallelLinear]


@functools.cache
def _classes_for(quant: Scheme | None) -> MegatronLinearClasses:
    if quant is None:
        return MegatronLinearClasses(MegatronColumnParallelLinear, MegatronRowParallelLinear)
    tag = quant.name.replace("-", "_").replace(" ", "_")
    col = type(
        f"MegatronColumnParallelLinear_{tag}", (MegatronColumnParallelLinear,), {"quant": quant}
    )
    row = type(f"MegatronRowParallelLinear_{tag}", (MegatronRowParallelLinear,), {"quant": quant})
    col.__module__ = row.__module__ = __name__
    return MegatronLinearClasses(col, row)


def megatron_linear_classes(quant: Scheme | None = None) -> MegatronLinearClasses:
    """``(column, row)`` adapter classes whose layers use ``quant`` (None = FP). Cached per
    scheme, so the same scheme gives the same classes (ModuleSpec equality, isinstance)."""
    if quant is not None and not isinstance(quant, Scheme):
        raise TypeError(f"quant: expected a quant.schemes.Scheme or None, got {quant!r}")
    return _classes_for(quant)


def gpt_layer_spec(quant: Scheme | None = None, **local_spec_kwargs: Any) -> Any:
    """Megatron's ``get_gpt_layer_local_spec(**local_spec_kwargs)`` with our layers in the
    ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and ``linear_fc2`` slots (dense MLP only)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if local_spec_kwargs.get("num_experts"):
        raise ValueError("gpt_layer_spec: MoE experts are not supported by the adapter")
    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("gpt_layer_spec: multi-latent attention is not supported by the adapter")
    col, row = megatron_linear_classes(quant)
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv = col
    attn.linear_proj = row
    mlp = spec.submodules.mlp.submodules
    mlp.linear_fc1 = col
    mlp.linear_fc2 = row
    return spec


def iter_adapter_layers(model: nn.Module) -> Iterator[tuple[str, ParallelLinearBase]]:
    """(name, layer) for every adapter layer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _MegatronLinearMixin):
            yield name, m  # type: ignore[misc]
