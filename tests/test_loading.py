"""load_weights: sharded safetensors directories, each rank reading only its slices; atomic and
pickle-free; clear errors naming the file and tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from layer_cases import SCHEMES, make_input, make_linear, reference64
from mp_harness import run_ranks
from safetensors.torch import save_file
from torch import nn

K, N = 256, 64


class TinyBlock(nn.Module):
    """embed -> column (up) -> row (down) + norm: the shapes of an MLP block."""

    def __init__(self, scheme_name: str, device: str | None = None) -> None:
        import tp_layers as tl

        super().__init__()
        scheme = SCHEMES[scheme_name]
        kw = {"quant": scheme, "params_dtype": torch.bfloat16, "device": device}
        self.embed = nn.Embedding(16, K, dtype=torch.bfloat16, device=device)
        self.up = tl.ColumnParallelLinear(K, 2 * K, bias=True, prefix="up", **kw)
        self.down = tl.RowParallelLinear(2 * K, N, bias=True, prefix="down", **kw)
        self.norm = nn.LayerNorm(N, dtype=torch.bfloat16, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.up(x)))


def _full_tensors(scheme_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    scheme = SCHEMES[scheme_name]
    g = torch.Generator().manual_seed(seed)
    t = {
        "embed.weight": torch.randn(16, K, generator=g).bfloat16(),
        "norm.weight": (1 + 0.1 * torch.randn(N, generator=g)).bfloat16(),
        "norm.bias": (0.1 * torch.randn(N, generator=g)).bfloat16(),
    }
    for name, n, k, s in (("up", 2 * K, K, seed + 1), ("down", N, 2 * K, seed + 2)):
        for suffix, v in make_linear(n, k, True, scheme, s).items():
            t[f"{name}.{suffix}"] = v
    return t


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], scheme_name: str, shards: int = 2
) -> Path:
    """A 2-shard directory with model.safetensors.index.json (+ msmodelslim description)."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    wmap = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path / fname))
        wmap.update(dict.fromkeys(group, fname))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": wmap})
    )
    scheme = SCHEMES[scheme_name]
    if scheme.is_quantized:
        desc = {
            "model_quant_type": scheme.name,
            "version": "1.0.0",
            "group_size": scheme.group_size,
        }
        for n in names:
            desc[n] = scheme.name if n.startswith(("up.", "down.")) else "FLOAT"
        (path / "quant_model_description.json").write_text(json.dumps(desc))
    return path


def _expected_bytes(tensors: dict[str, torch.Tensor], ws: int, scheme_name: str) -> int:
    """Bytes one rank must read: its shard of the sharded tensors, all of the replicated ones."""
    from tp_layers.sharding import SHARD_DIM

    specs = {
        mod: SCHEMES[scheme_name].spec_map(n, k, True, torch.bfloat16)
        for mod, n, k in (("up", 2 * K, K), ("down", N, 2 * K))
    }

    total = 0
    for name, t in tensors.items():
        mod, suffix = name.split(".", 1)
        nbytes = t.numel() * t.element_size()
        if mod in ("up", "down"):
            style = "column" if mod == "up" else "row"
            dim = SHARD_DIM[(style, specs[mod][suffix].kind)]
            total += nbytes // ws if dim is not None else nbytes
        else:
            total += nbytes
    return total


def _load_body(rank: int, ws: int, ckpt: str, scheme_name: str, meta: bool) -> tuple[int, int]:
    import tp_layers as tl

    torch.manual_seed(123)
    block = TinyBlock(scheme_name, device="meta" if meta else None)
    report = tl.load_weights(block, ckpt)
    tensors = _full_tensors(scheme_name)
    assert report.bytes_read == _expected_bytes(tensors, ws, scheme_name), (
        report.bytes_read,
        _expected_bytes(tensors, ws, scheme_name),
    )
    x = make_input((2, 3, K), seed=5)
    with torch.no_grad():
        y = block(x)
    # reference: unsharded float64 chain with the (de)quantized layers
    scheme = SCHEMES[scheme_name]
    up_t = {k[3:]: v for k, v in tensors.items() if k.startswith("up.")}
    down_t = {k[5:]: v for k, v in tensors.items() if k.startswith("down.")}
    h, _ = reference64(x, up_t, scheme)
    h_local = h[..., rank * (2 * K // ws) : (rank + 1) * (2 * K // ws)]
    z, _ = reference64(h.bfloat16(), down_t, scheme)
    ref = torch.nn.functional.layer_norm(
        z, (N,), tensors["norm.weight"].double(), tensors["norm.bias"].double()
    )
    # static W8A8 re-quantizes the intermediate with a 0.25 step: a 1-step flip per element is
    # possible where the two chains round h differently
    tol = {"fp": 0.05, "w8a8": 0.3}.get(scheme_name, 0.1)
    assert (y.double() - ref).abs().max().item() < tol, (y.double() - ref).abs().max()
    assert torch.allclose(block.up(x).double(), h_local, atol=0.05, rtol=0.02)
    return report.bytes_read, report.reads


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("scheme_name", ["fp", "w8a16_g32_asym", "w8a8", "w8a8_dynamic"])
def test_two_shard_directory_loads_only_this_ranks_slices(
    tmp_path: Path, scheme_name: str, meta: bool
) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", _full_tensors(scheme_name), scheme_name)
    for ws in (1, 2):
        results = run_ranks(ws, _load_body, str(ckpt), scheme_name, meta)
        assert len({r[0] for r in results}) == 1  # every rank reads the same amount


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(before: dict[str, torch.Tensor], m: nn.Module) -> None:
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k


def _loaded_block(
    tmp_path: Path, scheme_name: str = "w8a16"
) -> tuple[TinyBlock, dict[str, torch.Tensor]]:
    import tp_layers as tl

    tensors = _full_tensors(scheme_name)
    good = write_checkpoint(tmp_path / f"good-{scheme_name}", tensors, scheme_name)
    block = TinyBlock(scheme_name)
    tl.load_weights(block, good)
    return block, tensors


BAD = {
    "missing": (lambda t: t.pop("down.weight_scale"), r"missing tensors: down\.weight_scale"),
    "wrong_shape": (
        lambda t: t.__setitem__("down.weight", t["down.weight"][:, :-2].contiguous()),
        r"down\.weight.*shape",
    ),
    "wrong_dtype": (
        lambda t: t.__setitem__("up.weight", t["up.weight"].to(torch.int16)),
        r"up\.weight.*dtype",
    ),
    "nan_scale": (
        lambda t: t["up.weight_scale"].view(-1)[3:4].fill_(float("nan")),
        r"up\.weight_scale.*NaN",
    ),
    "zero_scale": (
        lambda t: t["down.weight_scale"].view(-1)[0:1].zero_(),
        r"down\.weight_scale.*zero scale",
    ),
    "unexpected": (
        lambda t: t.__setitem__("extra.weight", torch.zeros(3)),
        r"unexpected tensors.*extra\.weight",
    ),
    "embed_shape": (
        lambda t: t.__setitem__("embed.weight", torch.zeros(15, K).bfloat16()),
        r"embed\.weight: shape",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_failed_load_is_atomic_and_names_the_tensor(tmp_path: Path, case: str) -> None:
    import tp_layers as tl

    block, _ = _loaded_block(tmp_path)
    before = _snapshot(block)
    x = make_input((2, 3, K), seed=1)
    y0 = block(x)
    mutate, pattern = BAD[case]
    bad = {k: v.clone() for k, v in _full_tensors("w8a16", seed=9).items()}  # different good values
    mutate(bad)
    ckpt = write_checkpoint(tmp_path / "bad", bad, "w8a16")
    with pytest.raises(tl.CheckpointError, match=pattern) as ei:
        tl.load_weights(block, ckpt)
    if case != "unexpected":
        assert ".safetensors" in str(ei.value) or "missing" in str(ei.value)
    _assert_unchanged(before, block)
    assert torch.equal(block(x), y0)


def test_unexpected_tensor_warns_when_not_strict(tmp_path: Path) -> None:
    import tp_layers as tl

    tensors = _full_tensors("fp")
    tensors["rotary.inv_freq"] = torch.ones(4)
    ckpt = write_checkpoint(tmp_path / "c", tensors, "fp")
    block = TinyBlock("fp")
    with pytest.warns(UserWarning, match=r"rotary\.inv_freq"):
        report = tl.load_weights(block, ckpt, strict=False)
    assert report.unexpected == ["rotary.inv_freq"]


def test_quant_description_must_agree_with_the_layers(tmp_path: Path) -> None:
    import tp_layers as tl

    ckpt = write_checkpoint(tmp_path / "c", _full_tensors("w8a16"), "w8a16")
    desc = json.loads((ckpt / "quant_model_description.json").read_text())
    desc["down.weight"] = "W8A8"
    (ckpt / "quant_model_description.json").write_text(json.dumps(desc))
    block = TinyBlock("w8a16")
    with pytest.raises(
        tl.CheckpointError, match=r"down: the quant description says W8A8 but the layer is W8A16"
    ):
        tl.load_weights(block, ckpt)


def test_truncated_and_corrupted_files_are_named(tmp_path: Path) -> None:
    import tp_layers as tl

    block, _ = _loaded_block(tmp_path)
    before = _snapshot(block)
    ckpt = write_checkpoint(tmp_path / "t", _full_tensors("w8a16", seed=3), "w8a16")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(tl.CheckpointError, match=rf"{shard.name}: [\w.]+: truncated") as ei:
        tl.load_weights(block, ckpt)
    assert str(ckpt) in str(ei.value)
    shard.write_bytes(b"\xff" * 8 + b"{not json" + data[17:])
    with pytest.raises(tl.CheckpointError):
        tl.load_weights(block, ckpt)
    _assert_unchanged(before, block)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    import tp_layers as tl

    d = tmp_path / "pt"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(tl.CheckpointError, match=r"pickle-based checkpoints.*refused.*save_file"):
        tl.load_weights(TinyBlock("fp"), d)


def test_group_size_must_divide_local_k() -> None:
    import tp_layers as tl
    from quant.schemes import W8A16

    ctx = tl.TPContext(None, 0, 4, "local")  # metadata only: never communicates here
    with pytest.raises(
        ValueError, match=r"mlp\.down_proj: the local k = 96 .* not a multiple of the group size 64"
    ):
        tl.RowParallelLinear(
            384,
            32,
            quant=W8A16(group_size=64),
            tp=ctx,
            prefix="mlp.down_proj",
            params_dtype=torch.bfloat16,
        )


def test_reload_leaves_no_stale_processed_copy(tmp_path: Path) -> None:
    import tp_layers as tl

    block, _ = _loaded_block(tmp_path, "w8a8")
    x = make_input((2, 3, K), seed=2)
    y1 = block(x)
    block.down.process_weights_after_loading()  # idempotent
    assert torch.equal(block(x), y1)
    other = write_checkpoint(tmp_path / "other", _full_tensors("w8a8", seed=4), "w8a8")
    tl.load_weights(block, other)
    y2 = block(x)
    fresh = TinyBlock("w8a8")
    tl.load_weights(fresh, other)
    assert torch.equal(y2, fresh(x)) and not torch.equal(y1, y2)
    # a direct weight_loader call after processing re-materialises the checkpoint layout
    w = block.down.weight
    w.weight_loader(w, _full_tensors("w8a8", seed=4)["down.weight"])
    assert not block.down._processed and w.shape == (N, 2 * K)


# -- all ranks commit or none; scales checked in the dtype the kernels use; merged segments --


def _cross_rank_body(rank: int, ws: int, good: str, bad: str) -> str | None:
    import tp_layers as tl

    block = TinyBlock("w8a16")
    tl.load_weights(block, good)
    before = _snapshot(block)
    x = make_input((2, 3, K), seed=1)
    with torch.no_grad():
        y0 = block(x)
    msg = None
    try:
        tl.load_weights(block, bad)
    except tl.CheckpointError as e:
        msg = str(e)
    _assert_unchanged(before, block)
    with torch.no_grad():
        assert torch.equal(block(x), y0)
    return msg


def test_a_bad_scale_in_one_ranks_slice_fails_the_load_on_every_rank(tmp_path: Path) -> None:
    good = write_checkpoint(tmp_path / "good", _full_tensors("w8a16"), "w8a16")
    bad_t = _full_tensors("w8a16", seed=9)
    bad_t["up.weight_scale"][2 * K // 2 + 3] = 0.0  # a row of rank 1's half of up (column)
    bad = write_checkpoint(tmp_path / "bad", bad_t, "w8a16")
    msgs = run_ranks(2, _cross_rank_body, str(good), str(bad))
    assert msgs[0] == msgs[1] and msgs[0] is not None
    assert re.search(r"^rank 1: model-\d+-of-\d+\.safetensors: up\.weight_scale: ", msgs[0])
    assert "zero scale" in msgs[0] and "refused on all 2 ranks" in msgs[0], msgs[0]


class _Fp16Down(nn.Module):
    def __init__(self) -> None:
        import tp_layers as tl
        from quant.schemes import W8A16

        super().__init__()
        self.down = tl.RowParallelLinear(
            64, 16, bias=False, quant=W8A16(), params_dtype=torch.float16, prefix="down"
        )


@pytest.mark.parametrize(
    "value,pattern",
    [
        (1e-8, r"down\.weight_scale: contains a zero scale after the cast to torch\.float16"),
        (1e5, r"down\.weight_scale: a value overflows torch\.float16 .*the dtype the kernel"),
    ],
)
def test_float32_scales_are_checked_in_the_models_fp16(tmp_path: Path, value, pattern) -> None:
    import tp_layers as tl
    from quant.algorithms import quantize_linear
    from quant.schemes import W8A16

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) / 8
    t = quantize_linear(w.half(), None, W8A16(), model_dtype=torch.float16)
    tensors = {f"down.{k}": v for k, v in t.items()}
    m = _Fp16Down()
    tl.load_weights(m, write_checkpoint(tmp_path / "good", tensors, "w8a16"))
    before = _snapshot(m)
    scale = tensors["down.weight_scale"].float()
    scale[5] = value
    tensors["down.weight_scale"] = scale  # a float32 scale: accepted dtype, checked as fp16
    with pytest.raises(tl.CheckpointError, match=pattern):
        tl.load_weights(m, write_checkpoint(tmp_path / "bad", tensors, "w8a16"))
    _assert_unchanged(before, m)


class _Merged(nn.Module):
    def __init__(self) -> None:
        import tp_layers as tl

        super().__init__()
        kw = {"quant": SCHEMES["w8a8"], "params_dtype": torch.bfloat16, "prefix": "merged"}
        self.merged = tl.MergedColumnParallelLinear(K, [N, 2 * N], bias=True, **kw)


def _merged_segments(scale1: float = 1.0) -> list[dict[str, torch.Tensor]]:
    t0 = make_linear(N, K, True, SCHEMES["w8a8"], 0)
    t1 = make_linear(2 * N, K, True, SCHEMES["w8a8"], 1)
    t1["input_scale"] = t1["input_scale"] * scale1
    return [t0, t1]


def test_merged_segments_must_agree_through_the_weight_loader() -> None:
    m = _Merged().merged
    params = m.checkpoint_params()
    for scale1, ok in ((1.0, True), (2.0, False)):
        for shard_id, tensors in enumerate(_merged_segments(scale1)):
            for name, t in tensors.items():
                p = params[name]
                if ok or shard_id == 0 or name != "input_scale":
                    p.weight_loader(p, t, shard_id)
                    continue
                with pytest.raises(ValueError, match=r"merged\.input_scale: segment 1 has .*"):
                    p.weight_loader(p, t, shard_id)
    # a later load of segment 0 starts over: new values for every segment are fine
    for shard_id, tensors in enumerate(_merged_segments(2.0)):
        t = tensors["input_scale"] * (1.0 if shard_id else 2.0)
        params["input_scale"].weight_loader(params["input_scale"], t, shard_id)


def test_merged_segments_must_agree_through_load_weights(tmp_path: Path) -> None:
    import tp_layers as tl

    segs = _merged_segments()
    full = {f"merged.{k}": torch.cat([segs[0][k], segs[1][k]]) for k in segs[0]}
    full["merged.input_scale"] = segs[0]["input_scale"]
    one = _Merged()
    tl.load_weights(one, write_checkpoint(tmp_path / "one", full, "fp"))
    full["merged.input_scale"] = torch.cat([segs[0]["input_scale"]] * 2)  # one per segment
    stacked = _Merged()
    tl.load_weights(stacked, write_checkpoint(tmp_path / "stacked", full, "fp"))
    x = make_input((2, 3, K), seed=4)
    with torch.no_grad():
        assert torch.equal(one.merged(x), stacked.merged(x))
    before = _snapshot(stacked)
    full["merged.input_scale"] = torch.cat([segs[0]["input_scale"], 2 * segs[0]["input_scale"]])
    with pytest.raises(tl.CheckpointError, match=r"merged\.input_scale: segment 1 has .*segment 0"):
        tl.load_weights(stacked, write_checkpoint(tmp_path / "bad", full, "fp"))
    _assert_unchanged(before, stacked)


DT16 = torch.bfloat16


def _phi3_w8a8_dir(root: Path, gate_up_scales: tuple[float, float] | None) -> Path:
    """A tiny Phi3 (packed gate_up_proj -> MergedColumnParallelLinear) as a static W8A8
    msmodelslim directory; ``gate_up_scales``: that layer's input_scale given per segment."""
    import transformers

    from quant.algorithms import ActivationRange, quantize_linear

    act = ActivationRange(-4.0, 4.0)
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    d = root / "phi3"
    model.save_pretrained(str(d))
    (d / "model.safetensors").unlink()
    tensors, desc = {}, {"model_quant_type": "W8A8", "version": "1.0.0", "group_size": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
            t = quantize_linear(
                mod.weight.detach(), None, SCHEMES["w8a8"], act_range=act, model_dtype=DT16
            )
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            desc.update(dict.fromkeys((f"{name}.{k}" for k in t), "W8A8"))
    for name, p in model.state_dict().items():
        if name not in tensors and not any(name.startswith(n) for n in desc):
            tensors[name] = p.contiguous()
            desc[name] = "FLOAT"
    if gate_up_scales is not None:
        key = "model.layers.0.mlp.gate_up_proj.input_scale"
        tensors[key] = torch.tensor(gate_up_scales, dtype=DT16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "quant_model_description.json").write_text(json.dumps(desc))
    return d


def test_merged_segments_must_agree_through_load_pretrained(tmp_path: Path) -> None:
    import tp_layers as tl

    plan = {  # gate_up as a merged layer: [gate_r | up_r] on rank r
        "*.qkv_proj": "colwise_gather_output",
        "*.o_proj": "rowwise_split_input",
        "*.gate_up_proj": "packed_colwise",
        "*.down_proj": "rowwise",
    }

    def load(name: str, scales: tuple[float, float] | None) -> nn.Module:
        return tl.load_pretrained(_phi3_w8a8_dir(tmp_path / name, scales), dtype=DT16, plan=plan)

    layer = load("a", None).model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, tl.MergedColumnParallelLinear)
    scale = float(layer.kernel_args["input_scale"])
    ok = load("b", (scale, scale)).model.layers[0].mlp.gate_up_proj
    assert float(ok.kernel_args["input_scale"]) == scale
    with pytest.raises(
        tl.CheckpointError, match=r"gate_up_proj\.input_scale: segment 1 has .*segment 0"
    ):
        load("c", (scale, 2 * scale))


def _load_layer_body(rank: int, ws: int) -> str:
    """The per-layer path of the HF swap and the Megatron adapter (tp_layers.loader.load_layer)."""
    import tp_layers as tl
    from tp_layers.loader import load_layer

    layer = tl.ColumnParallelLinear(
        K, 2 * K, quant=SCHEMES["w8a16"], params_dtype=torch.bfloat16, prefix="up"
    )
    good = make_linear(2 * K, K, True, SCHEMES["w8a16"], 0)
    load_layer(layer, good)
    x = make_input((2, 3, K), seed=1)
    with torch.no_grad():
        y0 = layer(x)
    bad = make_linear(2 * K, K, True, SCHEMES["w8a16"], 1)
    bad["weight_scale"][K + 1] = float("inf")  # rank 1's half
    with pytest.raises(tl.CheckpointError) as ei:
        load_layer(layer, bad)
    with torch.no_grad():
        assert torch.equal(layer(x), y0)
    return str(ei.value)


def test_load_layer_is_atomic_across_ranks() -> None:
    msgs = run_ranks(2, _load_layer_body)
    assert msgs[0] == msgs[1] and msgs[0].startswith("rank 1: up.weight_scale: contains NaN or inf")


def test_sharded_parameters_survive_deepcopy_and_pickle() -> None:
    import copy
    import pickle

    import tp_layers as tl
    from tp_layers.param import ShardedParameter

    layer = tl.RowParallelLinear(64, 16, quant=SCHEMES["w8a16"], params_dtype=torch.bfloat16)
    layer.weight.partition_dim = 1  # an attribute another framework stamps (Megatron)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        for name, p in other.checkpoint_params().items():
            q = layer.checkpoint_params()[name]
            assert isinstance(p, ShardedParameter) and p.weight_loader.__self__ is other
            assert (p.spec, p.tp_dim, p.raw_shape, p.raw_dtype) == (
                q.spec,
                q.tp_dim,
                q.raw_shape,
                q.raw_dtype,
            )
        assert other.weight.partition_dim == 1


def test_skip_leaves_a_layer_to_the_caller_and_keeps_strict(tmp_path: Path) -> None:
    import tp_layers as tl
    from tp_layers.loader import load_layer

    tensors = _full_tensors("fp")
    ckpt = write_checkpoint(tmp_path / "c", tensors, "fp")
    block = TinyBlock("fp", device="meta")
    report = tl.load_weights(block, ckpt, skip=["down"])  # strict: down.* are not unexpected
    assert block.down.weight.device.type == "meta" and block.up.weight.device.type == "cpu"
    assert not any(n.startswith("down.") for n in report.loaded) and not report.unexpected
    load_layer(block.down, {n: tensors[f"down.{n}"] for n in ("weight", "bias")})
    ref = TinyBlock("fp")
    tl.load_weights(ref, ckpt)
    x = make_input((2, 3, K), seed=1)
    assert torch.equal(block(x), ref(x))
    tensors["extra.weight"] = torch.ones(2)
    ckpt2 = write_checkpoint(tmp_path / "c2", tensors, "fp")
    with pytest.raises(tl.CheckpointError, match=r"unexpected tensors.*extra\.weight"):
        tl.load_weights(TinyBlock("fp", device="meta"), ckpt2, skip=["down"])
    with pytest.raises(ValueError, match=r"skip: not parallel layers of the module: \['norm'\]"):
        tl.load_weights(TinyBlock("fp", device="meta"), ckpt, skip=["norm"])


@pytest.mark.parametrize("edge", [False, True])
def test_padded_source_reads_only_stored_rows(tmp_path: Path, edge: bool) -> None:
    from quant.checkpoint import CheckpointReader
    from tp_layers.sharding import Padded, SourcePadding, full_shape, read_range

    t = torch.arange(1, 13, dtype=torch.float32).reshape(6, 2)
    save_file({"t": t}, str(tmp_path / "model.safetensors"))
    want = torch.cat([t, t[-1:].expand(2, 2) if edge else torch.zeros(2, 2)])
    pad = SourcePadding(0, 3, 4)  # 6 stored rows -> 8
    assert pad.apply(t, (8, 2), edge).get_shape() == [8, 2]
    assert pad.apply(want, (8, 2), edge) is want  # already padded
    assert pad.apply(t, (9, 2), edge) is t  # not in proportion: the shape check fails later
    with CheckpointReader(tmp_path) as reader:
        for source in (t, reader.tensor("t")):
            p = Padded(source, 0, 8, edge)
            assert full_shape(p) == (8, 2)
            for start, length in ((0, 8), (4, 4), (6, 2), (5, 3)):
                out = torch.full((length, 2), -1.0, dtype=torch.bfloat16)
                read_range(p, 0, start, length, out=out)
                assert torch.equal(out, want[start : start + length].bfloat16())
            assert torch.equal(read_range(p, None, 0, 0), want)
            assert torch.equal(read_range(p, 1, 1, 1), want[:, 1:])
