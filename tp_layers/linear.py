"""Column / Row parallel linear layers (FP, W8A16, W8A8 static, W8A8 dynamic).

The layer creates its parameters for its shard (checkpoint layout): one
:class:`tp_layers.param.ShardedParameter` per checkpoint tensor, each with a
``weight_loader(param, loaded, shard_id=None)`` that takes the FULL checkpoint tensor, or a lazy
safetensors slice, and keeps only this rank's part (tp_layers.sharding: one segment-wise rule
for every layer; ``source_padding`` reads a checkpoint stored without the layer's zero
padding, e.g. padded heads). After loading, ``process_weights_after_loading`` (idempotent)
installs the kernel arguments the scheme's method returns (loading protocol:
tp_layers.param.ShardedModule, shared with the vocab-parallel embedding). The row-parallel
forward calls the fused ``mm_all_reduce_base`` in prefill and a local matmul + all-reduce in
decode (tp_layers.phase).

With ``sequence_parallel=True`` activations outside the layers are token-sharded (dim 0,
tp_layers.sequence): the column layer all-gathers its input tokens fused with the matmul
(``all_gather_base_mm``), the row layer reduce-scatters its output tokens fused with the matmul
(``mm_reduce_scatter_base``). Decode, schemes the SP kernels do not take (W8A16, static W8A8)
and a k outside the kernels' [256, 65535) use the separate collective + the scheme's matmul.
Path counters: "ag_fused" / "ag_unfused" / "rs_fused" / "rs_unfused" (tp_layers.paths).
"""

from __future__ import annotations

from typing import Any

import torch

import ascend_ops
from ascend_ops._validate import SP_K_MAX, SP_K_MIN
from quant.schemes import Scheme, TensorSpec
from tp_layers import sequence as seq
from tp_layers.comm import gather_last_dim, split_last_dim
from tp_layers.context import TPContext, get_tp
from tp_layers.methods import method_for
from tp_layers.param import ShardedModule
from tp_layers.paths import count_path, path_counts, reset_path_counts
from tp_layers.phase import Phase, current_phase, infer_phase, prefill_threshold
from tp_layers.sharding import Segment, SourcePadding

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


def _divide(total: int, parts: int, what: str, where: str) -> int:
    if total % parts:
        raise ValueError(f"{where}: {what} = {total} does not divide by the TP size {parts}")
    return total // parts


class ParallelLinearBase(ShardedModule):
    """Shared machinery: parameters from the scheme (loading and processing: ShardedModule)."""

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
        source_padding: SourcePadding | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.tp = tp if tp is not None else get_tp()
        self.source_padding = source_padding
        self.sequence_parallel = bool(sequence_parallel)
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
        self.kernel_args: dict[str, Any] = {}
        self.param_views: dict[str, torch.Tensor | None] = {}
        self._setup_sizes()
        self.scheme.validate_layer(self.output_size, self.input_size)
        self.method.create_weights(self)
        if "bias" not in self._parameters:
            self.register_parameter("bias", None)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def adds_bias(self) -> bool:
        """True if this rank adds the terms a layer adds once (bias, quant_bias, residual)."""
        return True

    def _setup_sizes(self) -> None:
        raise NotImplementedError

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
        w = self.param_views["weight"]
        if x.device.type != w.device.type:
            raise ValueError(f"{self.where}: input is on {x.device}, weights on {w.device}")

    def _output(self, y: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        return (y, self.param_views["bias"]) if self.skip_bias_add else y

    def _sp_path(self, op: str, x: torch.Tensor, tokens: int, allow: bool = True) -> str:
        """Sequence-parallel path: "local" (TP 1), else ``op`` ("ag" / "rs") + "_fused" in
        prefill (explicit phase, or ``tokens`` >= prefill_threshold()) when the scheme and k
        suit the SP kernels (G3 / G6) and ``allow``, + "_unfused" otherwise."""
        if self.tp.size == 1:
            return count_path("local")
        ph = current_phase() or (Phase.PREFILL if tokens >= prefill_threshold() else Phase.DECODE)
        fused = allow and ph is Phase.PREFILL and self.method.sp_fusable()
        fused = fused and SP_K_MIN <= x.shape[-1] < SP_K_MAX
        return count_path(f"{op}_{'fused' if fused else 'unfused'}")

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.has_bias}, "
            f"tp={self.tp.rank}/{self.tp.size}, quant={self.scheme.name}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


class ColumnParallelLinear(ParallelLinearBase):
    """``y = x @ W.T + b`` with W (n, k) sharded along n; each rank outputs n / world_size
    columns (all of them with ``gather_output=True``). With ``sequence_parallel=True`` the input
    is this rank's token shard (tp_layers.sequence) and the output holds all tokens."""

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
        self.sp_entry: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(input_size, output_size, bias, skip_bias_add=skip_bias_add, **kwargs)

    def _column_segments(self) -> list[Segment]:
        """Per output segment: its full size, this rank's rows and where they start."""
        for s in self.output_sizes:
            _divide(s, self.tp.size, "output size", self.where)
        return [Segment.even(s, self.tp.rank, self.tp.size) for s in self.output_sizes]

    def _setup_sizes(self) -> None:
        self.column_segments = self._column_segments()
        self.output_sizes_local = [s.local for s in self.column_segments]
        self.output_size_local = sum(self.output_sizes_local)
        self.input_size_local = self.input_size

    def segments(self, spec: TensorSpec, dim: int) -> list[Segment]:
        return self.column_segments

    def forward(
        self, x: torch.Tensor, *, gather: bool | None = None, num_tokens: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x: (..., input_size) -> (..., output_size / tp) (or (..., output_size) gathered);
        ``gather`` overrides ``gather_output`` for this call. Sequence parallel: x (m_r, ...,
        input_size) this rank's token shard of m = ``num_tokens`` (default m_r * tp) tokens ->
        (m, ..., output_size / tp)."""
        self._ensure_processed()
        self._check_input(x, self.input_size, "input_size")
        bias = None if self.skip_bias_add else self.param_views["bias"]
        entry, self.sp_entry = self.sp_entry, None
        if entry is not None and x is entry[0]:  # computed by forward_sp_entry
            y = entry[1]
        elif self.sequence_parallel:
            y = self._sp_forward(x, bias, num_tokens)[0]
        else:
            y = self.method.apply(self, x, bias)
        if self.gather_output if gather is None else gather:
            y = gather_last_dim(y, self.tp)
        return self._output(y)

    def forward_sp_entry(
        self, x: torch.Tensor, num_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entry of a sequence-parallel region whose other column layers take the gathered
        input (Hugging Face attention / MLP): x this rank's token shard -> (gathered input
        (m, ..., input_size), this layer's output for it), one fused all_gather_base_mm with
        gather_output in FP. The next ``forward`` of exactly that gathered tensor returns the
        output without recomputing it."""
        self._ensure_processed()
        self._check_input(x, self.input_size, "input_size")
        bias = None if self.skip_bias_add else self.param_views["bias"]
        y, full = self._sp_forward(x, bias, num_tokens, not self.scheme.is_quantized)
        self.sp_entry = (full, y)
        return full, y

    def _sp_forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        num_tokens: int | None,
        gather_input: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output for all m tokens, gathered input or None); ``gather_input`` None: not
        wanted, False: wanted but not from the kernel (its x1 is int8)."""
        m = seq.num_tokens_of(x, self.tp, num_tokens, self.where)
        tokens = x.numel() // x.shape[-1] * self.tp.size
        path = self._sp_path("ag", x, tokens, gather_input is not False)
        if path != "ag_fused":  # gather (no-op at TP 1), then the scheme's matmul + bias
            full = seq.gather_tokens(x, self.tp, m)
            return self.method.apply(self, full, bias), full
        xp = seq.pad_tokens(x, seq.shard_rows(m, self.tp.size))
        y, full = self.method.apply_all_gather(
            self, xp, self.tp.hcom, self.tp.size, gather_input=bool(gather_input)
        )
        full = None if full is None else full.narrow(0, 0, m)
        return _add(y.narrow(0, 0, m), bias), full  # the kernel refuses a bias (G5)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up): each segment is sharded
    separately, so rank r holds [gate_r | up_r]. Load with ``shard_id`` = segment index, or
    without one from a checkpoint tensor holding all segments concatenated along n. Replicated
    per-segment values (a static W8A8 ``input_scale`` per segment) must agree."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        **kwargs: Any,
    ) -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(
            input_size,
            sum(output_sizes),
            bias,
            gather_output,
            skip_bias_add,
            output_sizes=output_sizes,
            **kwargs,
        )


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
            self.num_kv_heads = _divide(kv, tp.size, "number of kv heads", where)
            self.kv_replicas = 1
        sizes = [total_num_heads * head_size, kv * head_size, kv * head_size]
        super().__init__(hidden_size, sizes, bias, False, skip_bias_add, tp=tp, **kwargs)
        self.shard_ids = ("q", "k", "v")

    def _column_segments(self) -> list[Segment]:
        r, ws, (q, k, v) = self.tp.rank, self.tp.size, self.output_sizes
        kv = [Segment.even(n, r, ws, self.kv_replicas) for n in (k, v)]
        return [Segment.even(q, r, ws), *kv]


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

    def _column_segments(self) -> list[Segment]:
        return [Segment.even(self.output_size, self.tp.rank, self.tp.size, self.replicas)]


class RowParallelLinear(ParallelLinearBase):
    """``y = x @ W.T + b`` with W (n, k) sharded along k; the partial products are summed over
    the TP group: fused (``mm_all_reduce_base``) in prefill, matmul + all-reduce in decode.
    With ``sequence_parallel=True`` the sum is reduce-scattered along the tokens: each rank
    gets its token shard (tp_layers.sequence) of the output."""

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
        if kwargs.get("sequence_parallel") and not (self.input_is_parallel and reduce_results):
            where = kwargs.get("prefix") or type(self).__name__
            raise ValueError(
                f"{where}: sequence_parallel needs input_is_parallel=True and reduce_results=True"
            )
        super().__init__(input_size, output_size, bias, skip_bias_add=skip_bias_add, **kwargs)

    @property
    def adds_bias(self) -> bool:
        return self.tp.rank == 0

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

    def segments(self, spec: TensorSpec, dim: int) -> list[Segment]:
        return [Segment.even(spec.shape[dim], self.tp.rank, self.tp.size)]  # k or k / g

    def _local_input(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Checked local input (split from a replicated one) and residual."""
        self._ensure_processed()
        if not self.input_is_parallel:
            self._check_input(x, self.input_size, "input_size")
            x = split_last_dim(x, self.tp)
        self._check_input(x, self.input_size_local, "input_size / tp")
        want = (*x.shape[:-1], self.output_size)
        if self.sequence_parallel:  # the residual is token-sharded like the output
            want = (seq.token_shard(x.shape[0], self.tp.size, self.tp.rank)[1], *want[1:])
        if residual is not None and (
            tuple(residual.shape) != want or residual.dtype != self.params_dtype
        ):
            raise ValueError(
                f"{self.where}: residual must be {want} {self.params_dtype}, got "
                f"{tuple(residual.shape)} {residual.dtype}"
            )
        return x

    def _path(self, x: torch.Tensor) -> str:
        """ "local" (TP 1 / reduce_results=False), "fused" (prefill) or "unfused" (decode)."""
        if self.tp.size == 1 or not self.reduce_results:
            return count_path("local")
        return count_path(
            "fused" if infer_phase(x, self.output_size) is Phase.PREFILL else "unfused"
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x: (..., input_size / tp) (or (..., input_size) with input_is_parallel=False);
        residual: optional, output-shaped, added once. Returns (..., output_size). Sequence
        parallel: x (m, ..., input_size / tp) -> this rank's token shard (m_r, ..., output_size),
        residual shaped like it."""
        x = self._local_input(x, residual)
        bias = None if self.skip_bias_add else self.param_views["bias"]
        if self.sequence_parallel:
            return self._output(self._sp_forward(x, bias, residual))
        path = self._path(x)
        if path == "unfused":  # matmul, all-reduce, then bias and residual on every rank
            y = ascend_ops.all_reduce(self.method.apply(self, x), self.tp.hcom, inplace=True)
            return self._output(_add(_add(y, bias), residual))
        if not self.adds_bias:
            bias = residual = None
        if path == "fused":
            return self._output(self.method.apply_fused(self, x, self.tp.hcom, bias, residual))
        return self._output(self.method.apply(self, x, bias, residual))

    def _sp_forward(
        self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        path = self._sp_path("rs", x, x.numel() // x.shape[-1])
        if path == "local":
            return self.method.apply(self, x, bias, residual)
        if path == "rs_unfused":  # the scheme's matmul (rank 0's quant_bias), reduce-scatter
            y = seq.reduce_scatter_tokens(self.method.apply(self, x), self.tp)
        else:
            m, ws = x.shape[0], self.tp.size
            xp = seq.pad_tokens(x, seq.shard_rows(m, ws) * ws)
            y = self.method.apply_reduce_scatter(self, xp, self.tp.hcom, ws)
            y = y.narrow(0, 0, seq.token_shard(m, ws, self.tp.rank)[1])
        return _add(_add(y, bias), residual)  # every rank: its own tokens (R5)


def _add(y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return y if t is None else y + t
