"""Megatron-core adapter: a tiny GPTModel built with our layers in the linear slots matches the
same model built with Megatron's local spec, at TP=2 and TP=1 (fp32, CPU, gloo).

Megatron runs on the harness's gloo world: the body initialises ``parallel_state`` on it and
destroys it at the end (workers are reused). CPU-friendly seeding: with
``use_cpu_initialization=True`` Megatron draws every weight from the default torch CPU
generator, so ``torch.manual_seed`` is all it needs; the CUDA RNG tracker (forked around the
attention dropout) is replaced by Megatron's own inference tracker, whose ``fork`` is a no-op;
the global memory buffer (attention scores) allocates on the CPU; the causal mask is
passed in (Megatron's default one is built on "cuda"); learned absolute position
embeddings, since RoPE moves its frequencies to ``torch.cuda.current_device()``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from mp_harness import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from megatron_gpt import CpuMemoryBuffer as _CpuMemoryBuffer
from megatron_gpt import build_gpt, gpt_config

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron") is None
        or importlib.util.find_spec("megatron.core") is None,
        reason="megatron-core is not installed",
    ),
]

SEQ, BATCH, VOCAB = 8, 2, 128
# fp32 end to end. Megatron's RowParallelLinear reduces the partial products with all_reduce
# and adds the bias after; the fused op adds the rank-0 bias inside the reduction, so the sums
# round differently: a few fp32 ulps of the logits (|logits| ~ 1), far below this bound.
ATOL = 1e-5
# W8A16 (per-channel int8 weights, fp32 activations) vs the fp32 model: int8 rounding of every
# weight (relative step 1/254 of the row's absmax) through 2 layers; measured ~1e-3.
Q_RTOL = 0.01


def _config(tp: int):
    return gpt_config(tp)  # fp32, gated MLP (linear_fc1 with stride 2: [gate_r | up_r] per rank)


def _gpt(config, spec, seed: int):
    return build_gpt(config, spec, VOCAB, SEQ, seed)


def _load_with_biases(ref, ours, seed: int):
    """Non-zero biases in ``ref`` (Megatron initialises them to zero), then ref's state dict
    loaded into ``ours`` -> (ids (BATCH, SEQ), positions, an explicit causal mask (True =
    masked): Megatron's default one is built on "cuda")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return ids, pos, mask


class _Calls:
    """Counts the fused op and the separate all-reduce the row layers call."""

    def __init__(self) -> None:
        import ascend_ops

        self.mod = ascend_ops
        self.fused = self.reduce = 0
        self.orig = (ascend_ops.mm_all_reduce_base, ascend_ops.all_reduce)

    def __enter__(self) -> _Calls:
        fused, reduce = self.orig

        def counted_fused(*a, **k):
            self.fused += 1
            return fused(*a, **k)

        def counted_reduce(*a, **k):
            self.reduce += 1
            return reduce(*a, **k)

        self.mod.mm_all_reduce_base, self.mod.all_reduce = counted_fused, counted_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        self.mod.mm_all_reduce_base, self.mod.all_reduce = self.orig


def _gpt_body(rank: int, ws: int, tp: int, quant: bool) -> dict:
    """Megatron's local-spec GPT vs ours, same weights; per-rank measurements."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mrandom

    from tp_layers.megatron import (
        MegatronColumnParallelLinear,
        MegatronRowParallelLinear,
        gpt_layer_spec,
        iter_adapter_layers,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()  # reset by destroy_model_parallel
    try:
        config = _config(tp)
        ref = _gpt(config, get_gpt_layer_local_spec(), seed=1234)
        ours = _gpt(config, gpt_layer_spec(), seed=1234)
        attn, mlp = ours.decoder.layers[0].self_attention, ours.decoder.layers[0].mlp
        assert isinstance(attn.linear_qkv, MegatronColumnParallelLinear)
        assert isinstance(mlp.linear_fc1, MegatronColumnParallelLinear)
        assert isinstance(attn.linear_proj, MegatronRowParallelLinear)
        assert isinstance(mlp.linear_fc2, MegatronRowParallelLinear)
        assert len(list(iter_adapter_layers(ours))) == 2 * 4

        # Same seed -> same initial shards as Megatron's CPU init (stride 2 for fc1 included).
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        assert ref_sd.keys() == our_sd.keys(), set(ref_sd.keys()) ^ set(our_sd.keys())
        init_equal = all(
            torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd if isinstance(ref_sd[k], torch.Tensor)
        )

        ids, pos, mask = _load_with_biases(ref, ours, seed=99)
        # Megatron-layout state dict after processing (forward ran) round-trips.
        with torch.no_grad():
            want = ref(ids, pos, mask)
            with _Calls() as prefill:
                got = ours(ids, pos, mask)
            want1 = ref(ids[:, :1], pos[:, :1], None)
            with _Calls() as decode:
                got1 = ours(ids[:, :1], pos[:, :1], None)
        sd_after = ours.state_dict()
        roundtrip = all(
            torch.equal(sd_after[k], v) for k, v in ref.state_dict().items() if v is not None
        )

        # dist_checkpointing view: same keys, local shapes and global offsets as Megatron's.
        meta = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
        ref_sh = ref.sharded_state_dict(metadata=meta)
        our_sh = ours.sharded_state_dict(metadata=meta)

        # Quantized spec: Megatron's float shards are quantized on load (W8A16 per channel).
        q_err = q_int8 = None
        if quant:
            from quant.schemes import W8A16

            ours_q = _gpt(config, gpt_layer_spec(quant=W8A16()), seed=1234)
            ours_q.load_state_dict(ref.state_dict(), strict=True)
            q_sd = ours_q.state_dict()
            q_int8 = q_sd["decoder.layers.0.self_attention.linear_proj.weight"].dtype == torch.int8
            # Our own quantized state dict (int8 weight + scales) loads back unchanged.
            ours_q2 = _gpt(config, gpt_layer_spec(quant=W8A16()), seed=5)
            ours_q2.load_state_dict(q_sd, strict=True)
            with torch.no_grad():
                got_q = ours_q(ids, pos, mask)
                q_err = (got_q - want).abs().max().item()
                q_int8 = q_int8 and torch.equal(ours_q2(ids, pos, mask), got_q)

        def _desc(sh: dict) -> dict:
            return {
                k: (tuple(v.local_shape), tuple(v.global_offset), tuple(v.axis_fragmentations))
                for k, v in sh.items()
                if hasattr(v, "local_shape")
            }

        return {
            "shape": tuple(got.shape),
            "err": (got - want).abs().max().item(),
            "scale": want.abs().max().item(),
            "err1": (got1 - want1).abs().max().item(),
            "init_equal": init_equal,
            "roundtrip": roundtrip,
            "sharded_equal": _desc(ref_sh) == _desc(our_sh) and ref_sh.keys() == our_sh.keys(),
            "q_err": q_err,
            "q_int8": q_int8,
            "prefill_calls": (prefill.fused, prefill.reduce),
            "decode_calls": (decode.fused, decode.reduce),
        }
    finally:
        parallel_state.destroy_model_parallel()
        mrandom.initialize_rng_tracker(force_reset=True)


@pytest.mark.parametrize("tp", [2, 1])
def test_gpt_matches_megatron_local_spec(tp: int) -> None:
    results = run_ranks(2, _gpt_body, tp, tp == 2)
    for r in results:
        assert r["init_equal"], "initial weights differ from Megatron's CPU initialisation"
        assert r["roundtrip"], "state_dict after forward is not Megatron's"
        assert r["sharded_equal"], "sharded_state_dict differs from Megatron's"
        assert r["shape"] == (BATCH, SEQ, VOCAB // tp)  # vocab-parallel logits
        assert r["err"] <= ATOL, (
            f"prefill logits differ by {r['err']:.3g} (|logits| {r['scale']:.3g})"
        )
        assert r["err1"] <= ATOL, f"decode logits differ by {r['err1']:.3g}"
        if tp == 2:
            assert r["q_int8"], "W8A16: float shard not quantized on load, or no reload"
            assert r["q_err"] <= Q_RTOL * r["scale"], f"W8A16 logits off by {r['q_err']:.3g}"
        if tp == 2:  # 2 row layers per transformer layer, 2 layers
            assert r["prefill_calls"] == (4, 0), r["prefill_calls"]
            assert r["decode_calls"] == (0, 4), r["decode_calls"]
        else:
            assert r["prefill_calls"] == r["decode_calls"] == (0, 0)


def _layers_body(rank: int, ws: int) -> dict:
    """Single layers vs Megatron's at TP=2: options the GPT model does not exercise, the
    [s, b, h] phase rule, and the errors."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import layers as mlayers

    import tp_layers as tl
    from tp_layers.megatron import (
        MegatronColumnParallelLinear,
        MegatronRowParallelLinear,
        megatron_linear_classes,
        megatron_phase,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp = parallel_state.get_tensor_model_parallel_group()
        cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)

        def init(w: torch.Tensor) -> None:
            torch.nn.init.normal_(w, std=0.05)

        out: dict = {}
        x = torch.randn(5, 3, 32, generator=torch.Generator().manual_seed(3))  # [s, b, h]
        common = {"config": cfg, "init_method": init, "bias": True, "tp_group": tp}

        # Row, replicated input (scattered by the layer), bias returned to the caller.
        row_kw = {**common, "input_is_parallel": False, "skip_bias_add": True}
        torch.manual_seed(0)
        ref = mlayers.RowParallelLinear(32, 48, **row_kw, keep_master_weight_for_test=True)
        torch.manual_seed(0)
        ours = MegatronRowParallelLinear(32, 48, **row_kw, keep_master_weight_for_test=True)
        with torch.no_grad():
            ref.bias.normal_()
            ours.load_state_dict(ref.state_dict())
            (ya, ba), (yb, bb) = ref(x), ours(x)
        out["row_err"] = (ya - yb).abs().max().item()
        out["row_bias"] = torch.equal(ba, bb)
        out["master"] = torch.equal(ref.master_weight, ours.master_weight)

        # Column: gathered output, and runtime_gather_output overriding it.
        col_kw = {**common, "gather_output": True, "skip_bias_add": False}
        torch.manual_seed(1)
        ref_c = mlayers.ColumnParallelLinear(32, 48, **col_kw)
        torch.manual_seed(1)
        ours_c = MegatronColumnParallelLinear(32, 48, **col_kw)
        with torch.no_grad():
            ref_c.bias.normal_()
            ours_c.load_megatron_shard(ref_c.weight, ref_c.bias)
            # Megatron's own gather allocates on CUDA: gather its local output here instead.
            ya_local, ba = ref_c(x, runtime_gather_output=False)
            parts = [torch.empty_like(ya_local) for _ in range(ws)]
            torch.distributed.all_gather(parts, ya_local.contiguous(), group=tp)
            ya = torch.cat(parts, dim=-1)
            yb, bb = ours_c(x)
            yc, _ = ours_c(x, runtime_gather_output=False)
        out["col_err"] = (ya - yb).abs().max().item()
        out["col_bias_none"] = ba is None and bb is None
        out["col_local_shape"] = tuple(yc.shape)

        # Phase from Megatron's [s, b, h]: infer_phase alone would read b as the sequence.
        h = 8
        out["phase"] = [
            megatron_phase(torch.empty(8, 1, h)).value,  # 8 tokens of one sequence
            megatron_phase(torch.empty(1, 4, h)).value,  # one token of 4 sequences
            megatron_phase(torch.empty(1, tl.prefill_threshold(), h)).value,
            tl.infer_phase(torch.empty(8, 1, h)).value,
        ]
        with tl.phase("decode"):
            out["phase"].append(megatron_phase(torch.empty(8, 1, h)).value)

        # Errors.
        errors = {}

        def err(name: str, fn) -> None:
            try:
                fn()
            except (ValueError, TypeError, RuntimeError) as e:
                errors[name] = str(e)

        err(
            "skip_alloc",
            lambda: MegatronColumnParallelLinear(
                32, 48, **col_kw, skip_weight_param_allocation=True
            ),
        )
        err("shape", lambda: ours_c.load_megatron_shard(torch.zeros(48, 32), ours_c.bias))
        err("no_bias", lambda: ours_c.load_megatron_shard(ref_c.weight))
        err("strict", lambda: ours_c.load_state_dict({"weight": ref_c.weight}))
        from quant.schemes import W8A8

        col_static = megatron_linear_classes(W8A8(dynamic=False)).column
        err("static", lambda: col_static(32, 48, **{**col_kw, "config": _bf16(cfg)}))
        out["errors"] = errors
        out["classes_cached"] = megatron_linear_classes(W8A8(dynamic=False)).column is col_static
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _bf16(cfg):
    import dataclasses

    return dataclasses.replace(cfg, params_dtype=torch.bfloat16, bf16=True)


def test_layers_match_megatron_and_errors() -> None:
    for r in run_ranks(2, _layers_body):
        assert r["row_err"] <= ATOL and r["row_bias"] and r["master"], r
        assert r["col_err"] <= ATOL and r["col_bias_none"], r
        assert r["col_local_shape"] == (5, 3, 24)
        assert r["phase"] == ["prefill", "decode", "prefill", "decode", "decode"]
        e = r["errors"]
        assert "skip_weight_param_allocation" in e["skip_alloc"]
        assert "Megatron shard must be [24, 32], got (48, 32)" in e["shape"]
        assert "pass its Megatron shard" in e["no_bias"]
        assert "Missing key(s)" in e["strict"] and "bias" in e["strict"]
        assert "static W8A8 needs calibrated activation scales" in e["static"]
        assert r["classes_cached"]


def test_import_tp_layers_does_not_import_megatron() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, tp_layers; "
        "assert not [m for m in sys.modules if m.startswith('megatron')], 'megatron imported'"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# -- the Ascend backend ----------------------------------------------------------------------

# schemes a Megatron float shard can be quantized to on load (static W8A8 needs calibration)
ASCEND_SCHEMES = ("fp", "w8a16", "w8a8_dynamic")


def _ascend_gpt_body(rank: int, ws: int, impl: str) -> dict:
    """A bf16 GPTModel with our layers per scheme on the Ascend backend (the double or a
    release) vs the same model on the portable backend: one prefill forward each."""
    from layer_cases import SCHEMES
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mrandom
    from npu_conformance import install_impl, uninstall_impl

    import ascend_ops
    from tp_layers.megatron import gpt_layer_spec

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=ws)
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()
    tnpu = install_impl(impl)
    out: dict = {}
    # Megatron's torch-norm fallback (no Apex) is built in the default dtype
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        config = _config(ws)
        config.params_dtype = config.bf16 = torch.bfloat16
        ref_sd = _gpt(config, get_gpt_layer_local_spec(), seed=1234).state_dict()
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
        for name in ASCEND_SCHEMES:
            scheme = SCHEMES[name]
            quant = None if not scheme.is_quantized else scheme
            portable = _gpt(config, gpt_layer_spec(quant=quant), seed=1)
            portable.load_state_dict(ref_sd, strict=True)
            with ascend_ops.use_backend("ascend"):
                ours = _gpt(config, gpt_layer_spec(quant=quant), seed=1)
                ours.load_state_dict(ref_sd, strict=True)
            with torch.no_grad():
                want = portable(ids, pos, mask).float()
                tnpu.reset()
                with ascend_ops.use_backend("ascend"):
                    got = ours(ids, pos, mask).float()
            fused = tnpu.calls_named("npu_mm_all_reduce_base")
            out[name] = {
                "fused": len(fused),
                "errors": [c.error for c in fused if c.error],
                "err": (got - want).abs().max().item(),
                "scale": want.abs().max().item(),
            }
    finally:
        torch.set_default_dtype(default_dtype)
        uninstall_impl(impl)
        parallel_state.destroy_model_parallel()
        mrandom.initialize_rng_tracker(force_reset=True)
    return out


def test_gpt_on_ascend_backend(npu_impl: str) -> None:
    from npu_conformance import run_on

    for r in run_on(npu_impl, 2, _ascend_gpt_body):
        for name, m in r.items():
            # 2 row layers per transformer layer, 2 layers: each one fused call in prefill
            assert m["fused"] == 4 and not m["errors"], (name, m)
            # bf16: the Ascend kernels and the portable golden round the same values, up to
            # the order of the per-rank sums
            assert m["err"] <= 2**-6 * m["scale"], (name, m)
