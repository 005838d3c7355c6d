"""Column / Row parallel linear layers (FP, W8A16, W8A8 static, W8A8 dynamic).

The layer creates its parameters for its shard (checkpoint layout), each carrying a
``weight_loader(param, loaded, shard_id=None)`` that takes the FULL checkpoint tensor, or a lazy
safetensors slice, and keeps only this rank's part (rules in tp_layers.sharding). After
loading, ``process_weights_after_loading`` (idempotent) prepares the kernels' layout. The
row-parallel forward calls the fused ``mm_all_reduce_base`` in prefill and a local matmul +
all-reduce in decode (tp_layers.phase).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import ascend_ops
from ascend_ops import kernels
from quant.convention import deq_scale_to_float32
from quant.schemes import Scheme, TensorSpec
from tp_layers.comm import gather_last_dim, split_last_dim
from tp_layers.context import TPContext, get_tp
from tp_layers.methods import method_for
from tp_layers.phase import Phase, infer_phase
from tp_layers.sharding import SHARD_DIM, full_shape, param_kind, read_range, source_dtype

__all__ = [
    "ColumnParallelLinear",
    "HeadReplicatedColumnLinear",
    "MergedColumnParallelLinear",
    "ParallelLinearBase",
    "QKVParallelLinear",
    "RowParallelLinear",
    "path_counts",
    "reset_path_counts",
]

# Instrumentation: how many RowParallelLinear forwards took each path since the last reset, so
# examples / tests can show which one ran: "fused" (prefill: one mm_all_reduce_base call),
# "unfused" (decode: local matmul, then all_reduce), "local" (TP 1 or reduce_results=False: no
# communication). Not updated while torch.compile traces (no graph side effects).
_PATH_COUNTS: dict[str, int] = {"fused": 0, "unfused": 0, "local": 0}


def path_counts() -> dict[str, int]:
    """Copy of the RowParallelLinear path counters: {"fused", "unfused", "local"} -> calls."""
    return dict(_PATH_COUNTS)


def reset_path_counts() -> None:
    """Zero the RowParallelLinear path counters."""
    for key in _PATH_COUNTS:
        _PATH_COUNTS[key] = 0


def _count_path(path: str) -> None:
    if not torch.compiler.is_compiling():
        _PATH_COUNTS[path] += 1


def _divide(total: int, parts: int, what: str, where: str) -> int:
    if total % parts:
        raise ValueError(f"{where}: {what} = {total} does not divide by the TP size {parts}")
    return total // parts


class ParallelLinearBase(nn.Module):
    """Shared machinery: parameter creation from the scheme, sharded loading, processing."""

    parallel: str = ""  # "row" | "column"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        *,
        skip_bias_add: bool = False,
        quant: Scheme | None = None,
        tp: TPContext | None = None,
        params_dtype: torch.dtype | None = None,
        nz: bool | None = None,
        prefix: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None else get_tp()
        self.method = method_for(quant)
        self.scheme = self.method.scheme
        self.input_size = int(input_size)
        self.output_size = int(output_size)
        self.has_bias = bool(bias)
        self.skip_bias_add = bool(skip_bias_add)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.nz = self.scheme.is_quantized if nz is None else bool(nz)
        self.prefix = prefix
        self._device = torch.device(device) if device is not None else torch.get_default_device()
        self._processed = False
        self.op_args: dict[str, Any] = {}
        self._setup_sizes()
        self.scheme.validate_layer(self.output_size, self.input_size)
        self.method.create_weights(self)
        if "bias" not in self._parameters:
            self.register_parameter("bias", None)

    # -- sizes and parameters --------------------------------------------------------------
    @property
    def where(self) -> str:
        return self.prefix or type(self).__name__

    def _setup_sizes(self) -> None:
        raise NotImplementedError

    def _local_len(self, dim: int, full_len: int, kind: str) -> int:
        raise NotImplementedError

    def add_checkpoint_param(self, spec: TensorSpec) -> None:
        """Register the local shard of checkpoint tensor ``spec`` as a frozen parameter."""
        kind = param_kind(spec.name, spec.shape)
        dim = SHARD_DIM[(self.parallel, kind)]
        shape = list(spec.shape)
        if dim is not None:
            shape[dim] = self._local_len(dim, spec.shape[dim], kind)
        dtype = self.method.storage_dtype(spec.name, spec.dtype, self)
        p = nn.Parameter(torch.empty(shape, dtype=dtype, device=self._device), requires_grad=False)
        p.tp_dim = dim
        p.kind = kind
        p.raw_shape = tuple(shape)
        p.raw_dtype = dtype
        p.spec = spec
        p.weight_loader = self.weight_loader
        self.register_parameter(spec.name, p)

    def checkpoint_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters(recurse=False) if hasattr(p, "spec")}

    # -- loading ---------------------------------------------------------------------------
    def _ranges(self, p: nn.Parameter, shard_id: Any) -> list[tuple[int | None, int, int, int]]:
        """(segment, source start, length, destination start) along p.tp_dim."""
        if p.tp_dim is None:
            return [(None, 0, 0, 0)]
        n = p.raw_shape[p.tp_dim]
        return [(None, self.tp.rank * n, n, 0)]

    def _expected_full(self, p: nn.Parameter, shard_id: Any) -> tuple[tuple[int, ...], ...]:
        return p.spec.allowed_shapes()

    def load_into(self, name: str, dest: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
        """Write this rank's part of checkpoint tensor ``loaded`` (full tensor or safetensors
        slice) for parameter ``name`` into ``dest`` (a tensor of the parameter's raw shape)."""
        p = self.checkpoint_params().get(name)
        if p is None:
            raise KeyError(f"{self.where}: no parameter {name!r}")
        label = f"{self.where}.{name}"
        shape = full_shape(loaded)
        allowed = self._expected_full(p, shard_id)
        if shape not in allowed:
            raise ValueError(
                f"{label}: checkpoint shape {list(shape)} does not match the expected "
                f"{' or '.join(str(list(s)) for s in allowed)}"
                + (f" (shard {shard_id!r})" if shard_id is not None else "")
            )
        stored = source_dtype(loaded)
        if stored not in p.spec.allowed_dtypes():
            raise ValueError(
                f"{label}: checkpoint dtype {stored} does not match the expected "
                f"{' or '.join(str(d) for d in p.spec.allowed_dtypes())}"
            )
        for _seg, src, length, dst in self._ranges(p, shard_id):
            target = dest if p.tp_dim is None else dest.narrow(p.tp_dim, dst, length)
            if name == "weight" or name == "bias":  # no value checks: read (+ cast) in place
                read_range(loaded, p.tp_dim, src, length, out=target)
                continue
            part = read_range(loaded, p.tp_dim, src, length)
            if name == "deq_scale" and part.dtype == torch.int64:
                part = deq_scale_to_float32(part)
            if part.is_floating_point():
                if not bool(torch.isfinite(part).all()):
                    raise ValueError(f"{label}: contains NaN or inf")
                if name in ("weight_scale", "deq_scale", "input_scale") and bool((part == 0).any()):
                    raise ValueError(f"{label}: contains a zero scale")
            target.copy_(part.reshape(target.shape).to(p.raw_dtype))

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """vLLM-style loader: keep this rank's shard of ``loaded`` in ``param`` (in place).

        After processing, the first load re-materialises every parameter in checkpoint layout
        (so no stale processed copy survives) and the layer must be processed again.
        """
        name = next(n for n, q in self.checkpoint_params().items() if q is param)
        if self._processed:
            self.unprocess()
        if param.device.type != "meta":
            self.load_into(name, param.data, loaded, shard_id)
            return
        # a meta parameter cannot take CPU data in place: replace it, keeping its attributes
        dest = torch.empty(param.raw_shape, dtype=param.raw_dtype, device="cpu")
        self.load_into(name, dest, loaded, shard_id)
        new = nn.Parameter(dest, requires_grad=False)
        new.__dict__.update(param.__dict__)
        self._parameters[name] = new

    def unprocess(self) -> None:
        """Drop processed tensors: every parameter back to an empty checkpoint-layout tensor."""
        for p in self.checkpoint_params().values():
            dev = p.device if p.device.type != "meta" else torch.device("cpu")
            p.data = torch.empty(p.raw_shape, dtype=p.raw_dtype, device=dev)
        self._processed = False
        self.op_args = {}

    def process_weights_after_loading(self) -> None:
        """Transpose / NZ-cast / pack scales for the kernels. Idempotent."""
        if self._processed:
            return
        if any(p.device.type == "meta" for p in self.checkpoint_params().values()):
            raise RuntimeError(f"{self.where}: weights are not loaded (meta tensors)")
        with torch.no_grad():
            self.method.process_weights_after_loading(self)
        self._processed = True

    def _ensure_processed(self) -> None:
        if not self._processed:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"{self.where}: call process_weights_after_loading() before compiling"
                )
            self.process_weights_after_loading()

    # -- forward helpers ---------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, k: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.where}: input must be a tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != k:
            raise ValueError(
                f"{self.where}: input last dim must be {what} = {k}, got shape {tuple(x.shape)}"
            )
        if x.dtype != self.params_dtype:
            raise TypeError(f"{self.where}: input dtype must be {self.params_dtype}, got {x.dtype}")
        if x.device.type != self.weight.device.type:
            raise ValueError(
                f"{self.where}: input is on {x.device}, weights on {self.weight.device}"
            )

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.has_bias}, "
            f"tp={self.tp.rank}/{self.tp.size}, quant={self.scheme.name}"
        )


class ColumnParallelLinear(ParallelLinearBase):
    """``y = x @ W.T + b`` with W (n, k) sharded along n; each rank outputs n / world_size
    columns (all of them with ``gather_output=True``)."""

    parallel = "column"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        *,
        output_sizes: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.gather_output = bool(gather_output)
        self.output_sizes = list(output_sizes) if output_sizes is not None else [int(output_size)]
        super().__init__(input_size, output_size, bias, skip_bias_add=skip_bias_add, **kwargs)

    def _setup_sizes(self) -> None:
        self.output_sizes_local = [
            _divide(s, self.tp.size, "output size", self.where) for s in self.output_sizes
        ]
        self.output_size_local = sum(self.output_sizes_local)
        self.input_size_local = self.input_size

    def _local_len(self, dim: int, full_len: int, kind: str) -> int:
        return self.output_size_local

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x: (..., input_size) -> (..., output_size / tp) (or (..., output_size) gathered)."""
        self._ensure_processed()
        self._check_input(x, self.input_size, "input_size")
        prep = self.method.prepare(self, x, True, self.skip_bias_add, False)
        y = kernels.mm_local(prep.x1, self.weight, **prep.kwargs)
        if self.gather_output:
            y = gather_last_dim(y, self.tp)
        if self.skip_bias_add:
            return y, self.bias
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up): each segment is sharded
    separately, so rank r holds [gate_r | up_r]. Load with ``shard_id`` = segment index, or
    without one from a checkpoint tensor holding all segments concatenated along n."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            gather_output,
            skip_bias_add,
            output_sizes=output_sizes,
            **kwargs,
        )

    def _segments(self) -> list[tuple[int, int, int, int]]:
        """Per segment: (full size, local size, source start in the segment, local offset)."""
        out, off = [], 0
        for full, local in zip(self.output_sizes, self.output_sizes_local):
            out.append((full, local, self.tp.rank * local, off))
            off += local
        return out

    def _segment_index(self, shard_id: Any) -> int:
        if isinstance(shard_id, int) and 0 <= shard_id < len(self.output_sizes):
            return shard_id
        raise ValueError(
            f"{self.where}: shard_id must be a segment index in [0, {len(self.output_sizes)}), got {shard_id!r}"
        )

    def _ranges(self, p: nn.Parameter, shard_id: Any) -> list[tuple[int | None, int, int, int]]:
        if p.tp_dim is None:
            return [(None, 0, 0, 0)]
        segs = self._segments()
        if shard_id is None:  # all segments concatenated in one checkpoint tensor
            starts = [sum(s[0] for s in segs[:i]) for i in range(len(segs))]
            return [(i, starts[i] + s[2], s[1], s[3]) for i, s in enumerate(segs)]
        i = self._segment_index(shard_id)
        _full, local, src, dst = segs[i]
        return [(i, src, local, dst)]

    def _expected_full(self, p: nn.Parameter, shard_id: Any) -> tuple[tuple[int, ...], ...]:
        if p.tp_dim is None or shard_id is None:
            return p.spec.allowed_shapes()
        full = self._segments()[self._segment_index(shard_id)][0]
        return tuple((full, *s[1:]) if s else s for s in p.spec.allowed_shapes())

    def load_into(self, name: str, dest: torch.Tensor, loaded: Any, shard_id: Any = None) -> None:
        p = self.checkpoint_params()[name]
        if p.tp_dim is None and shard_id is not None:
            # Replicated per-segment values (e.g. a per-tensor input_scale): all must agree.
            scratch = torch.empty_like(dest)
            super().load_into(name, scratch, loaded, shard_id)
            seen = getattr(dest, "_tp_segments_seen", None)
            if seen and not torch.equal(scratch, dest):
                raise ValueError(
                    f"{self.where}.{name}: segment {shard_id!r} has {scratch.tolist()}, but an earlier "
                    f"segment had {dest.tolist()}; a merged layer needs one value for all segments"
                )
            dest.copy_(scratch)
            dest._tp_segments_seen = True
            return
        super().load_into(name, dest, loaded, shard_id)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q, k, v projection sharded by heads: each rank holds its q heads and its k / v heads.
    With more ranks than kv heads, kv heads are replicated (rank r uses kv head r * kv / tp).
    Load with ``shard_id`` in {"q", "k", "v"}."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        skip_bias_add: bool = False,
        *,
        tp: TPContext | None = None,
        **kwargs: Any,
    ) -> None:
        tp = tp if tp is not None else get_tp()
        kv = total_num_kv_heads or total_num_heads
        where = kwargs.get("prefix") or type(self).__name__
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = kv
        self.num_heads = _divide(total_num_heads, tp.size, "number of attention heads", where)
        if tp.size >= kv:
            if tp.size % kv:
                raise ValueError(
                    f"{where}: TP size {tp.size} must be a multiple of the number of kv heads {kv}"
                )
            self.num_kv_heads, self.kv_replicas = 1, tp.size // kv
        else:
            self.num_kv_heads, self.kv_replicas = (
                _divide(kv, tp.size, "number of kv heads", where),
                1,
            )
        sizes = [total_num_heads * head_size, kv * head_size, kv * head_size]
        super().__init__(hidden_size, sizes, bias, False, skip_bias_add, tp=tp, **kwargs)

    def _setup_sizes(self) -> None:
        h = self.head_size
        self.output_sizes_local = [self.num_heads * h, self.num_kv_heads * h, self.num_kv_heads * h]
        self.output_size_local = sum(self.output_sizes_local)
        self.input_size_local = self.input_size

    def _segments(self) -> list[tuple[int, int, int, int]]:
        q, kv = self.output_sizes_local[0], self.output_sizes_local[1]
        kv_start = (self.tp.rank // self.kv_replicas) * kv
        return [
            (self.output_sizes[0], q, self.tp.rank * q, 0),
            (self.output_sizes[1], kv, kv_start, q),
            (self.output_sizes[2], kv, kv_start, q + kv),
        ]

    def _segment_index(self, shard_id: Any) -> int:
        ids = {"q": 0, "k": 1, "v": 2}
        if shard_id in ids:
            return ids[shard_id]
        raise ValueError(f"{self.where}: shard_id must be 'q', 'k' or 'v', got {shard_id!r}")


class HeadReplicatedColumnLinear(ColumnParallelLinear):
    """Column-parallel k / v projection with ``num_heads`` < TP size: every rank holds ONE whole
    head, rank r the head ``r * num_heads // tp`` (each head replicated on ``tp / num_heads``
    ranks, as vLLM's QKVParallelLinear does for its kv part).

    Weight (num_heads * head_size, k) in the checkpoint; output (..., head_size) per rank.
    """

    def __init__(
        self,
        input_size: int,
        head_size: int,
        num_heads: int,
        bias: bool = True,
        *,
        tp: TPContext | None = None,
        **kwargs: Any,
    ) -> None:
        tp = tp if tp is not None else get_tp()
        where = kwargs.get("prefix") or type(self).__name__
        if num_heads < 1 or tp.size % num_heads:
            raise ValueError(
                f"{where}: TP size {tp.size} must be a multiple of the number of kv heads "
                f"{num_heads} to replicate them"
            )
        self.head_size = int(head_size)
        self.total_num_heads = int(num_heads)
        self.replicas = tp.size // num_heads
        super().__init__(input_size, head_size * num_heads, bias, False, tp=tp, **kwargs)

    def _setup_sizes(self) -> None:
        self.output_sizes_local = [self.head_size]
        self.output_size_local = self.head_size
        self.input_size_local = self.input_size

    def _ranges(self, p: nn.Parameter, shard_id: Any) -> list[tuple[int | None, int, int, int]]:
        if p.tp_dim is None:
            return [(None, 0, 0, 0)]
        head = self.tp.rank // self.replicas
        return [(None, head * self.head_size, self.head_size, 0)]


class RowParallelLinear(ParallelLinearBase):
    """``y = x @ W.T + b`` with W (n, k) sharded along k; the partial products are summed over
    the TP group: fused (``mm_all_reduce_base``) in prefill, matmul + all-reduce in decode."""

    parallel = "row"

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        skip_bias_add: bool = False,
        **kwargs: Any,
    ) -> None:
        self.input_is_parallel = bool(input_is_parallel)
        self.reduce_results = bool(reduce_results)
        super().__init__(input_size, output_size, bias, skip_bias_add=skip_bias_add, **kwargs)

    def _setup_sizes(self) -> None:
        self.input_size_local = _divide(self.input_size, self.tp.size, "input size", self.where)
        self.output_size_local = self.output_size
        g = self.scheme.group_size
        if g and self.input_size_local % g:
            raise ValueError(
                f"{self.where}: the local k = {self.input_size_local} (input size {self.input_size} / "
                f"TP {self.tp.size}) is not a multiple of the group size {g}; per-group scales must "
                "shard with whole groups"
            )

    def _local_len(self, dim: int, full_len: int, kind: str) -> int:
        return full_len // self.tp.size  # k (weight) or k / g (groups)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x: (..., input_size / tp) (or (..., input_size) with input_is_parallel=False);
        residual: optional, output-shaped, added once. Returns (..., output_size)."""
        self._ensure_processed()
        if not self.input_is_parallel:
            self._check_input(x, self.input_size, "input_size")
            x = split_last_dim(x, self.tp)
        self._check_input(x, self.input_size_local, "input_size / tp")
        owner = self.tp.rank == 0
        skip = self.skip_bias_add
        if residual is not None and (
            residual.shape[:-1] != x.shape[:-1]
            or residual.shape[-1] != self.output_size
            or residual.dtype != self.params_dtype
        ):
            raise ValueError(
                f"{self.where}: residual must be {(*x.shape[:-1], self.output_size)} {self.params_dtype}, got {tuple(residual.shape)} {residual.dtype}"
            )
        if self.tp.size == 1 or not self.reduce_results:
            _count_path("local")
            prep = self.method.prepare(self, x, owner, skip, False)
            y = kernels.mm_local(
                prep.x1, self.weight, x3=residual if owner else None, **prep.kwargs
            )
        elif infer_phase(x, self.output_size) is Phase.PREFILL:
            _count_path("fused")
            prep = self.method.prepare(self, x, owner, skip, True)
            x3 = residual if owner else None
            if prep.post_bias is not None:
                pb = prep.post_bias.expand(*x.shape[:-1], self.output_size)
                x3 = pb.contiguous() if x3 is None else x3 + pb
            y = ascend_ops.mm_all_reduce_base(
                prep.x1, self.weight, self.tp.hcom, x3=x3, **prep.kwargs
            )
        else:
            _count_path("unfused")
            prep = self.method.prepare(self, x, owner, True, False)
            y = ascend_ops.all_reduce(
                kernels.mm_local(prep.x1, self.weight, **prep.kwargs), self.tp.hcom, inplace=True
            )
            if not skip and self.bias is not None:
                y = y + self.bias
            if residual is not None:
                y = y + residual
        if skip:
            return y, self.bias
        return y
