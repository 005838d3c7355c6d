"""msmodelslim checkpoint format: exact round trips, sharding, lazy slices, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from quant.algorithms import ActivationRange, quantize_linear
from quant.checkpoint import DESCRIPTION_FILE, INDEX_FILE, CheckpointReader, CheckpointWriter
from quant.schemes import W8A8, W8A16


def _layer_tensors(dt: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, 64, generator=g), torch.randn(16, generator=g)
    out = {}
    for mod, scheme in (
        ("model.layers.0.self_attn.q_proj", W8A8()),
        ("model.layers.0.mlp.down_proj", W8A16(group_size=32)),
    ):
        t = quantize_linear(w, b, scheme, model_dtype=dt, act_range=ActivationRange(-1, 2))
        out.update({f"{mod}.{k}": v for k, v in t.items()})
    out["model.embed_tokens.weight"] = torch.randn(10, 64, generator=g).to(dt)
    return out


def _write(path, tensors, *, shard="1GB", **kw):
    with CheckpointWriter(path, max_shard_bytes=shard, **kw) as wr:
        for k, v in tensors.items():
            wr.add(k, v, "FLOAT" if "embed" in k else ("W8A8" if "q_proj" in k else "W8A16"))
        wr.commit("W8A8", group_size=32)
    return path


@pytest.mark.parametrize("dt,deq", [(torch.float16, torch.int64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shard", ["1GB", "1KB"])
def test_round_trip_exact(tmp_path, dt, deq, shard):
    tensors = _layer_tensors(dt)
    out = _write(tmp_path / "ckpt", tensors, shard=shard)
    files = sorted(p.name for p in out.iterdir())
    if shard == "1GB":
        assert files == sorted([DESCRIPTION_FILE, "model.safetensors"])
    else:
        shards = [f for f in files if f.startswith("model-0")]
        assert INDEX_FILE in files and len(shards) >= 3
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((out / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["model_quant_type"] == "W8A8" and desc["group_size"] == 32 and "version" in desc
    assert desc["model.embed_tokens.weight"] == "FLOAT"
    assert desc["model.layers.0.self_attn.q_proj.input_scale"] == "W8A8"
    with CheckpointReader(out) as r:
        assert set(r.names()) == set(tensors)
        for k, v in tensors.items():
            got = r.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
            assert r.info(k).shape == tuple(v.shape) and r.info(k).dtype == v.dtype
        assert r.info("model.layers.0.self_attn.q_proj.deq_scale").dtype == deq
        assert r.validate_layer("model.layers.0.self_attn.q_proj") == W8A8()
        assert r.validate_layer("model.layers.0.mlp.down_proj") == W8A16(group_size=32)
        # a lazy slice reads only part of a tensor
        sl = r.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert sl.get_shape() == [16, 64]
        assert torch.equal(sl[4:8], tensors["model.layers.0.self_attn.q_proj.weight"][4:8])
        assert torch.equal(sl[:, 32:], tensors["model.layers.0.self_attn.q_proj.weight"][:, 32:])


def test_validate_layer_reports_bad_tensor(tmp_path):
    tensors = _layer_tensors(torch.bfloat16)
    tensors["model.layers.0.self_attn.q_proj.quant_bias"] = torch.zeros(16, dtype=torch.int64)
    del tensors["model.layers.0.mlp.down_proj.weight_offset"]
    out = _write(tmp_path / "ckpt", tensors)
    with CheckpointReader(out) as r:
        with pytest.raises(ValueError, match=r"q_proj\.quant_bias: dtype"):
            r.validate_layer("model.layers.0.self_attn.q_proj")
        with pytest.raises(ValueError, match="weight_offset: missing"):
            r.validate_layer("model.layers.0.mlp.down_proj")


def test_writer_refuses_existing_and_force_replaces(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="force"):
        CheckpointWriter(target)
    # force replaces only an earlier output (or an empty directory), never other data
    with pytest.raises(FileExistsError, match="not a quantized checkpoint"):
        CheckpointWriter(target, force=True)
    assert (target / "old.txt").read_text() == "x"
    (target / "old.txt").unlink()
    _write(target, {"a.weight": torch.ones(2)}, force=True)  # empty directory
    (target / "extra.txt").write_text("left by the user in an earlier output")
    _write(target, {"b.weight": torch.ones(2)}, force=True)  # an earlier output
    assert not (target / "extra.txt").exists()
    with CheckpointReader(target) as r:
        assert r.names() == ["b.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left


def test_writer_error_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(target) as wr:
        wr.add("a", torch.ones(3))
        wr.flush()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(target) as wr:  # exiting without commit also drops the output
        wr.add("a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CheckpointReader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CheckpointReader(tmp_path / "empty")


def test_stored_tensor_reads_ranges_straight_into_the_destination(tmp_path, monkeypatch):
    """StoredTensor.read = slicing, for every dim / range shape (contiguous, strided with small
    and with large gaps, batched over several preadv calls), into new tensors, into
    destinations of the same dtype, of another dtype (bounded scratch) and non-contiguous ones;
    usable as a safetensors slice; a truncated file is a ValueError naming it."""
    from safetensors.torch import save_file

    import quant.checkpoint.safetensors_file as ck

    monkeypatch.setattr(ck, "_SCRATCH_BYTES", 64)  # force multi-block converting reads
    monkeypatch.setattr(ck, "_IOV_MAX", 7)  # force several preadv batches
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 24, generator=g).bfloat16(),
        "b": torch.randint(-128, 127, (3, 5, 16), generator=g, dtype=torch.int8),
        "c": torch.randint(0, 2**40, (11,), generator=g),
        "s": torch.tensor(2.5),
    }
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    counted = []
    with CheckpointReader(tmp_path) as r:
        for name, full in tensors.items():
            st = r.tensor(name, on_read=counted.append)
            assert st.get_shape() == list(full.shape)
            assert torch.equal(st.read(), full)
            for dim in range(full.dim()):
                size = full.shape[dim]
                for start, length in ((0, size), (0, 1), (1, size - 2), (size // 2, size // 2)):
                    ref = full.narrow(dim, start, length)
                    assert torch.equal(st.read(dim, start, length), ref), (name, dim, start)
                    out = torch.empty(ref.shape, dtype=full.dtype)
                    assert st.read(dim, start, length, out=out) is out
                    assert torch.equal(out, ref)
                    if full.is_floating_point():
                        out32 = torch.empty(ref.shape, dtype=torch.float32)
                        st.read(dim, start, length, out=out32)
                        assert torch.equal(out32, ref.float())
                    big = torch.zeros((*ref.shape, 2), dtype=full.dtype)
                    st.read(dim, start, length, out=big[..., 1])  # non-contiguous destination
                    assert torch.equal(big[..., 1], ref) and not big[..., 0].any()
        assert torch.equal(r.tensor("a")[:, 3:9], tensors["a"][:, 3:9])
        assert torch.equal(r.tensor("b")[1:3, :, 2:4], tensors["b"][1:3, :, 2:4])
        assert torch.equal(r.tensor("a")[5:7], tensors["a"][5:7])
        assert counted[0] == tensors["a"].numel() * 2 and all(n >= 0 for n in counted)
        with pytest.raises(ValueError, match="out of bounds"):
            r.tensor("a").read(0, 30, 10)
    data = (tmp_path / "model.safetensors").read_bytes()
    with CheckpointReader(tmp_path) as r:
        header_end = 8 + int.from_bytes(data[:8], "little")
        (tmp_path / "model.safetensors").write_bytes(data[: header_end + 10])
        with pytest.raises(ValueError, match=r"model\.safetensors: a: modified while being read"):
            r.tensor("a").read()
    with pytest.raises(ValueError, match=r"model\.safetensors: \w+: truncated: the file has"):
        CheckpointReader(tmp_path)
