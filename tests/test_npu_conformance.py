"""The Ascend backend against the real torch_npu releases of the conformance matrix.

* schema adaptation: arguments a release lacks are omitted when neutral and refused by name
  otherwise; arguments it has reach the vendor op (tests/npu_conformance.py registers the real
  schemas, so an argument passed wrongly fails in the dispatcher as on a real system);
* x3 is never overwritten, also on a release whose fused kernel writes into it;
* graph mode: torch.compile(fullgraph=True) of every layer kind and scheme on 2 ranks, prefill
  and decode, lowers to the vendor ops torchair's GE converters are registered for (read from
  the release's own converter sources), with zero graph breaks and the eager result.
"""

from __future__ import annotations

import inspect
import re

import npu_double
import pytest
import torch
from layer_cases import make_input
from npu_conformance import (
    VERSIONS,
    converter_targets,
    converts,
    hidden_torch_npu,
    install_impl,
    run_on,
    schemas,
    uninstall_impl,
)

from ascend_ops import _npu, backend

VERSIONED_ARGS = {
    # op -> the optional arguments the adapter can pass that some releases lack
    "npu_trans_quant_param": ("round_mode",),
    "npu_weight_quant_batchmatmul": ("inner_precise",),
    "npu_quant_matmul": ("group_sizes",),
    "npu_mm_all_reduce_base": ("pertoken_scale", "comm_quant_scale_1", "comm_quant_scale_2"),
}


def _schema_args(version: str, op: str) -> set[str]:
    """Argument names in the release's yaml ``func:`` line of ``op``."""
    head = schemas(version)[op].split("->")[0]
    names = set()
    for part in head[head.index("(") + 1 : head.rindex(")")].split(","):
        part = part.split("=")[0].strip()
        if part and part != "*":
            names.add(part.split()[-1])
    return names


@pytest.mark.parametrize("npu_impl", VERSIONS, indirect=True)
def test_release_has_the_ops_and_converters(npu_impl: str) -> None:
    """Every release has the ops the Ascend backend calls, and torchair converters for them."""
    have = schemas(npu_impl)
    for op in (*VERSIONED_ARGS, "npu_quantize", "npu_dynamic_quant", "npu_format_cast"):
        assert op in have, (npu_impl, op)
    targets = converter_targets(npu_impl)
    for op in (
        "npu_mm_all_reduce_base", "npu_quant_matmul", "npu_weight_quant_batchmatmul",
        "npu_all_gather_base_mm", "npu_mm_reduce_scatter_base",
    ):  # fmt: skip
        assert f"npu::{op}.default" in targets, (npu_impl, op)
    for op in ("all_reduce", "all_gather_into_tensor", "wait_tensor"):  # graph-mode decode
        assert f"c10d_functional::{op}.default" in targets, (npu_impl, op)


def _adapt_body(rank: int, ws: int, impl: str) -> dict[str, list[str]]:
    """Every versioned argument: passed through where the schema has it, refused by name where
    it does not; neutral values always accepted. Returns {op: args present}."""
    tnpu = install_impl(impl)
    present: dict[str, list[str]] = {}
    try:
        version = re.escape(getattr(tnpu, "__version__", "(unknown version)"))
        for op, args in VERSIONED_ARGS.items():
            names = _npu.arg_names(op)
            present[op] = sorted(a for a in args if a in names)
        scale = torch.tensor([0.1, 1.0, 3.3])

        # npu_trans_quant_param(round_mode)
        with backend.use_backend("ascend"):
            plain = _npu.trans_quant_param(scale, None, round_mode=0)
            assert torch.equal(plain, npu_double.TorchNpuDouble._trans_quant_param(scale, None, 0))
            if "round_mode" in present["npu_trans_quant_param"]:
                got = _npu.trans_quant_param(scale, None, round_mode=1)
                want = npu_double.TorchNpuDouble._trans_quant_param(scale, None, 1)
                assert torch.equal(got, want) and not torch.equal(got, plain)
            else:
                with pytest.raises(
                    TypeError,
                    match=rf"round_mode: torch_npu {version}'s npu_trans_quant_param has no such",
                ):
                    _npu.trans_quant_param(scale, None, round_mode=1)

            # npu_weight_quant_batchmatmul(inner_precise)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
            w = torch.randint(-128, 128, (64, 16), generator=g, dtype=torch.int8)
            s = (torch.rand(16, generator=g) * 0.02).to(torch.bfloat16)
            y0 = _npu.weight_quant_matmul(x, w, s, None, None, 0, None, inner_precise=0)
            if "inner_precise" in present["npu_weight_quant_batchmatmul"]:
                tnpu.reset()
                y1 = _npu.weight_quant_matmul(x, w, s, None, None, 0, None, inner_precise=1)
                (rec,) = tnpu.calls_named("npu_weight_quant_batchmatmul")
                assert rec.args["inner_precise"] == 1 and y1.shape == y0.shape
            else:
                with pytest.raises(TypeError, match=rf"inner_precise: torch_npu {version}'s"):
                    _npu.weight_quant_matmul(x, w, s, None, None, 0, None, inner_precise=1)

            # npu_quant_matmul(group_sizes): None is omitted everywhere; a value is refused
            # by releases without it (the harness does not model grouped scales)
            x1 = torch.randint(-128, 128, (3, 64), generator=g, dtype=torch.int8)
            q = _npu.quant_matmul(x1, w, torch.rand(16), output_dtype=torch.bfloat16)
            assert q.dtype == torch.bfloat16
            if "group_sizes" not in present["npu_quant_matmul"]:
                with pytest.raises(TypeError, match=rf"group_sizes: torch_npu {version}'s"):
                    _npu.quant_matmul(x1, w, torch.rand(16), group_sizes=[1, 1, 64])

            # an argument that exists nowhere still fails loudly in the adapter
            with pytest.raises(TypeError, match="unexpected keyword"):
                _npu.mm_all_reduce_base(x, w, "h", pertoken=None)
    finally:
        uninstall_impl(impl)
    return present


def test_adapter_follows_the_installed_schema(npu_impl: str) -> None:
    (present,) = run_on(npu_impl, 1, _adapt_body)
    if npu_impl == "double":
        return
    for op, args in VERSIONED_ARGS.items():
        in_yaml = _schema_args(npu_impl, op)
        assert present[op] == sorted(a for a in args if a in in_yaml), (npu_impl, op)


def _legacy_fused(real):  # type: ignore[no-untyped-def]
    """The fused op of a release before pertoken_scale (op-plugin 6.0.rc1): no pertoken /
    comm-quant arguments, and FP / W8A16 with x3 write the result into x3 and return it."""

    def npu_mm_all_reduce_base(
        x1, x2, hcom, *, reduce_op="sum", bias=None, antiquant_scale=None,
        antiquant_offset=None, x3=None, dequant_scale=None, antiquant_group_size=0, comm_turn=0,
    ):  # fmt: skip
        out = real(
            x1, x2, hcom, reduce_op=reduce_op, bias=bias, antiquant_scale=antiquant_scale,
            antiquant_offset=antiquant_offset, x3=x3, dequant_scale=dequant_scale,
            antiquant_group_size=antiquant_group_size, comm_turn=comm_turn,
        )  # fmt: skip
        if x3 is not None and x1.dtype != torch.int8:
            x3.copy_(out)
            return x3
        return out

    return npu_mm_all_reduce_base


def test_legacy_release_x3_and_missing_arguments(torch_npu_double, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    legacy = _legacy_fused(torch_npu_double.npu_mm_all_reduce_base)
    monkeypatch.setattr(torch_npu_double, "npu_mm_all_reduce_base", legacy, raising=False)
    monkeypatch.setattr(torch_npu_double, "__version__", "2.1.0.post3", raising=False)
    assert "pertoken_scale" not in inspect.signature(legacy).parameters
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    x2 = torch.randn(32, 8, generator=g).to(torch.bfloat16)
    x3 = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    keep = x3.clone()
    hc = npu_double.SINGLE_PROCESS_HCOM
    got = _npu.mm_all_reduce_base(x1, x2, hc, x3=x3)
    assert torch.equal(x3, keep), "the caller's x3 was overwritten"
    assert got.data_ptr() != x3.data_ptr()
    want = (x1.double() @ x2.double() + keep.double()).to(torch.bfloat16)
    assert torch.equal(got, want)
    # W8A16 as well
    w = torch.randint(-128, 128, (32, 8), generator=g, dtype=torch.int8)
    s = (torch.rand(8, generator=g) * 0.02).to(torch.bfloat16)
    _npu.mm_all_reduce_base(x1, w, hc, antiquant_scale=s, x3=x3)
    assert torch.equal(x3, keep)
    # arguments this release cannot take: refused by name, before any kernel runs
    xq = torch.randint(-128, 128, (4, 32), generator=g, dtype=torch.int8)
    torch_npu_double.reset()
    with pytest.raises(
        TypeError,
        match=r"pertoken_scale: torch_npu 2\.1\.0\.post3's npu_mm_all_reduce_base has no such",
    ):
        _npu.mm_all_reduce_base(
            xq, w, hc, dequant_scale=torch.rand(8), pertoken_scale=torch.rand(4)
        )
    with pytest.raises(TypeError, match=r"comm_quant_scale_1: torch_npu 2\.1\.0\.post3's"):
        _npu.mm_all_reduce_base(
            xq, w, hc, dequant_scale=s, comm_quant_scale_1=s, comm_quant_scale_2=s
        )
    assert not torch_npu_double.calls_named("npu_mm_all_reduce_base")


# ---------------------------------------------------------------------------------- graph mode

SCHEMES = ("fp", "w8a16", "w8a8", "w8a8_dynamic")
KINDS = ("column", "column_gather", "merged", "qkv", "row")


class _AllKinds(torch.nn.Module):
    """Column, Merged, QKV on x and Row on its shard: one graph per (scheme, phase)."""

    def __init__(self, layers: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, x_row: torch.Tensor) -> tuple:
        out = [self.layers[k](x) for k in KINDS[:-1]]
        return (*out, self.layers["row"](x_row))


def _compile_body(rank: int, ws: int, impl: str) -> dict[str, list[str]]:
    import torch._dynamo
    from test_layers import K, _build
    from torch._dynamo.backends.common import aot_autograd

    import ascend_ops
    import tp_layers as tl

    install_impl(impl)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    seen: dict[str, list[str]] = {}
    try:
        for scheme in SCHEMES:
            with ascend_ops.use_backend("ascend"), torch.no_grad():
                layers = torch.nn.ModuleDict({k: _build(k, scheme, True)[0] for k in KINDS})

            model = _AllKinds(layers)
            torch._dynamo.reset()
            compiled = torch.compile(
                model, fullgraph=True, backend=aot_autograd(fw_compiler=record)
            )
            for phase, rows in (("prefill", 4), ("decode", 1)):
                graphs.clear()
                x = make_input((2, rows, K), seed=11 + rank)
                xr = make_input((2, rows, K // ws), seed=21 + rank)
                with ascend_ops.use_backend("ascend"), torch.no_grad(), tl.phase(phase):
                    want = model(x, xr)
                    got = compiled(x, xr)
                for a, b in zip(want, got, strict=True):
                    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
                    assert torch.equal(a, b), (scheme, phase)
                assert len(graphs) == 1, (scheme, phase, len(graphs))
                seen[f"{scheme}/{phase}"] = graph_targets(graphs[0])
    finally:
        uninstall_impl(impl)
    return seen


def graph_targets(gm: torch.fx.GraphModule) -> list[str]:
    """The ATen-level graph's call targets: ops as ``"ns.op.overload"``, others by name (only
    ``operator.getitem`` is expected: torchair unpacks tuple outputs itself)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            t = n.target
            out.append(str(t) if isinstance(t, torch._ops.OpOverload) else f"py:{t.__name__}")
    return out


def _qualname(target: str) -> str:
    ns, rest = target.split(".", 1)
    return f"{ns}::{rest}"


def assert_torchair_lowers(version: str, targets: list[str], key: object) -> None:
    """Every op of the graph has a GE converter in ``version``'s torchair.

    torchair registers the native ``_c10d_functional`` converters only under torch >= 2.3.1
    (ge_converter/c10d_functional/c10d_functional.py: ``if torch.__version__ >= '2.3.1'``); a
    release built for older torch (2.1.0.post8 pairs with torch 2.1) converts the legacy
    ``c10d_functional`` ops, which the same functional-collective call emits there (torch 2.1
    torch/distributed/_functional_collectives.py: ``torch.ops.c10d_functional.all_reduce``).
    """
    converters = converter_targets(version)
    legacy = not any(t.startswith("_c10d_functional::") for t in converters)
    for t in targets:
        if t.startswith("py:"):
            assert t == "py:getitem", (key, t)
            continue
        q = _qualname(t)
        if legacy and q.startswith("_c10d_functional::"):
            q = q[1:]
        assert converts(converters, q), (version, key, t)  # torchair can lower it


@pytest.mark.parametrize("npu_impl", VERSIONS, indirect=True)
def test_compiled_layers_lower_to_vendor_ops(npu_impl: str) -> None:
    for seen in run_on(npu_impl, 2, _compile_body, timeout=600):
        for key, targets in seen.items():
            scheme, phase = key.split("/")
            npu_ops = [t for t in targets if t.startswith("npu.")]
            assert_torchair_lowers(npu_impl, targets, key)
            assert not any(t.startswith("ascend_ops.") for t in targets), key
            fused = npu_ops.count("npu.npu_mm_all_reduce_base.default")
            assert fused == (1 if phase == "prefill" else 0), (key, targets)
            if scheme == "w8a16":
                assert "npu.npu_weight_quant_batchmatmul.default" in npu_ops, key
            if scheme.startswith("w8a8"):
                assert "npu.npu_quant_matmul.default" in npu_ops, key
                quant = "npu_dynamic_quant" if scheme.endswith("dynamic") else "npu_quantize"
                assert f"npu.{quant}.default" in npu_ops, key
            if phase == "decode":  # row: all_reduce; column_gather: all_gather_into_tensor
                for op in ("all_reduce", "all_gather_into_tensor", "wait_tensor"):
                    assert f"_c10d_functional.{op}.default" in targets, (key, op)


# ------------------------------------------------------------------------------------ loading


def _ascend_load_body(rank: int, ws: int, impl: str, ckpt: str, scheme_name: str) -> tuple:
    """tests/test_loading.py's sharded load + forward check, with the Ascend backend forced."""
    from test_loading import _load_body

    import ascend_ops

    tnpu = install_impl(impl)
    try:
        with ascend_ops.use_backend("ascend"):
            out = _load_body(rank, ws, ckpt, scheme_name, False)
        casts = tnpu.calls_named("npu_format_cast")
        if scheme_name != "fp":  # quantized weights are cast to FRACTAL_NZ on Ascend
            assert casts and all(c.args["acl_format"] == 29 for c in casts), casts
    finally:
        uninstall_impl(impl)
    return out


@pytest.mark.parametrize("scheme_name", ["fp", "w8a16_g32_asym", "w8a8", "w8a8_dynamic"])
def test_sharded_load_on_ascend_backend(tmp_path, npu_impl: str, scheme_name: str) -> None:  # type: ignore[no-untyped-def]
    from test_loading import _full_tensors, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", _full_tensors(scheme_name), scheme_name)
    results = run_on(npu_impl, 2, _ascend_load_body, str(ckpt), scheme_name)
    assert len({r[0] for r in results}) == 1


# ------------------------------------------------------------------------------------ HF swap


def _ascend_hf_body(rank: int, ws: int, impl: str) -> float:
    """A bf16 Llama parallelized on the Ascend backend vs the same model on the portable one:
    one fused call per row layer in prefill, logits within bf16 rounding."""
    import copy

    from test_hf import _ids, _row_layers, make_model

    import ascend_ops
    import tp_layers as tl

    with hidden_torch_npu():  # a release stays installed in its worker across tests
        model = make_model("llama", dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    tnpu = install_impl(impl)
    try:
        tl.parallelize(ref)
        with ascend_ops.use_backend("ascend"):
            tl.parallelize(model)
        ids = _ids()
        with torch.no_grad():
            want = ref(ids).logits.float()
            tnpu.reset()
            with ascend_ops.use_backend("ascend"):
                got = model(ids).logits.float()
        fused = tnpu.calls_named("npu_mm_all_reduce_base")
        assert len(fused) == _row_layers(model) and all(c.error is None for c in fused)
        err = (got - want).abs().max().item()
        assert err <= 2**-6 * want.abs().max().item(), err
    finally:
        uninstall_impl(impl)
    return err


def test_hf_swap_on_ascend_backend(npu_impl: str) -> None:
    run_on(npu_impl, 2, _ascend_hf_body)
