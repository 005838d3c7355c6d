"""Case builder for the fused op's tests: full (unsharded) inputs, per-rank shards along k, and a
float64 reference of the documented formula. Shared by single- and multi-rank tests."""

from __future__ import annotations

import dataclasses
import math

import torch

from ascend_ops import trans_quant_param, unpack_quant_param

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@dataclasses.dataclass(frozen=True)
class Case:
    scenario: str  # "fp" | "w8a16" | "w8a8"
    dtype: torch.dtype  # activation dtype (fp/w8a16) or output dtype (w8a8)
    m: int = 8
    k: int = 64
    n: int = 24
    dims3: bool = False
    bias: bool = False
    x3: bool = False
    scale: str = "channel"  # "tensor" | "channel" | "channel2d" | "group"
    offset: bool = False
    group: int = 0
    dequant: str = "packed"  # w8a8: "packed" | "packed_u64" | "bf16" | "fp32"
    pertoken: bool = False
    comm_quant: bool = False
    seed: int = 0

    def __str__(self) -> str:  # readable pytest ids
        f = dataclasses.fields(self)
        return ",".join(
            f"{x.name}={getattr(self, x.name)}"
            for x in f
            if getattr(self, x.name) != x.default or x.name in ("scenario", "dtype")
        )


def build(c: Case) -> dict:
    """Full inputs of a case (identical on every rank: seeded)."""
    g = torch.Generator().manual_seed(c.seed)
    shape = (2, c.m // 2, c.k) if c.dims3 else (c.m, c.k)
    out_shape = (*shape[:-1], c.n)
    t: dict = {"group": c.group}
    if c.scenario == "w8a8":
        t["x1"] = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        t["x2"] = torch.randint(-128, 128, (c.k, c.n), generator=g, dtype=torch.int8)
        nsc = 1 if c.scale == "tensor" else c.n
        s = (torch.rand(nsc, generator=g) * 2e-3 + 1e-4).to(torch.float32)
        if c.dequant in ("packed", "packed_u64"):
            p = trans_quant_param(s)
            t["dequant_scale"] = p.view(torch.uint64) if c.dequant == "packed_u64" else p
        elif c.dequant == "bf16":
            t["dequant_scale"] = s.to(torch.bfloat16)
        else:
            t["dequant_scale"] = s
        if c.scale == "channel2d":
            t["dequant_scale"] = t["dequant_scale"].reshape(1, -1)
        if c.pertoken:
            t["pertoken_scale"] = torch.rand(c.m, generator=g) * 0.5 + 0.5
        if c.bias:
            t["bias"] = torch.randint(-20000, 20000, (c.n,), generator=g, dtype=torch.int32)
        out_dtype = c.dtype
    else:
        dt = c.dtype
        t["x1"] = torch.randn(shape, generator=g).to(dt)
        if c.scenario == "fp":
            t["x2"] = (torch.randn(c.k, c.n, generator=g) / math.sqrt(c.k)).to(dt)
        else:
            t["x2"] = torch.randint(-128, 128, (c.k, c.n), generator=g, dtype=torch.int8)
            sshape = {
                "tensor": (1,),
                "channel": (c.n,),
                "channel2d": (1, c.n),
                "group": ((c.k + c.group - 1) // max(c.group, 1), c.n),
            }[c.scale]
            t["antiquant_scale"] = (torch.rand(sshape, generator=g) * 0.02 + 0.001).to(dt)
            if c.offset:
                t["antiquant_offset"] = torch.randint(-8, 8, sshape, generator=g).to(dt)
        if c.bias:
            t["bias"] = torch.randn(c.n, generator=g).to(dt)
        out_dtype = dt
    if c.x3:
        t["x3"] = torch.randn(out_shape, generator=g).to(out_dtype)
    if c.comm_quant:
        t["comm_quant_scale_1"] = torch.full((c.n,), 0.05).to(out_dtype)
        t["comm_quant_scale_2"] = torch.full((c.n,), 0.08).to(out_dtype)
    t["out_dtype"] = out_dtype
    return t


def k_slice(k: int, rank: int, ws: int, align: int = 1) -> slice:
    """Rank's contiguous k range (equal split; k must divide by ws*align unless ws == 1)."""
    if ws == 1:
        return slice(0, k)
    assert k % (ws * align) == 0, (k, ws, align)
    step = k // ws
    return slice(rank * step, (rank + 1) * step)


def shard(t: dict, rank: int, ws: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rank's (x1, x2, kwargs): x1 and x2 sharded along k, per-group scales with them, bias and
    x3 on rank 0 only, everything else replicated."""
    k = t["x1"].shape[-1]
    sl = k_slice(k, rank, ws, max(t["group"], 1))
    kw = {}
    for name in (
        "dequant_scale",
        "pertoken_scale",
        "comm_quant_scale_1",
        "comm_quant_scale_2",
        "antiquant_scale",
        "antiquant_offset",
    ):
        if name in t:
            v = t[name]
            if name.startswith("antiquant") and t["group"]:
                g = t["group"]
                v = v[sl.start // g : -(-sl.stop // g)]  # a last partial group stays
            kw[name] = v.contiguous()
    if rank == 0:
        for name in ("bias", "x3"):
            if name in t:
                kw[name] = t[name]
    if t["group"]:
        kw["antiquant_group_size"] = t["group"]
    return t["x1"][..., sl].contiguous(), t["x2"][sl].contiguous(), kw


def _weight64(t: dict) -> torch.Tensor:
    x2 = t["x2"].double()
    if "antiquant_scale" not in t:
        return x2
    k, n = x2.shape

    def expand(p: torch.Tensor) -> torch.Tensor:
        p = p.double()
        if p.numel() == 1:
            return p.reshape(1, 1)
        if t["group"]:
            return p.repeat_interleave(t["group"], 0)[:k]
        return p.reshape(1, n)

    off = expand(t["antiquant_offset"]) if "antiquant_offset" in t else 0.0
    return (x2 + off) * expand(t["antiquant_scale"])


def _dequant64(t: dict) -> torch.Tensor:
    s = t["dequant_scale"]
    if s.dtype in (torch.int64, torch.uint64):
        s = unpack_quant_param(s)[0]
    return s.double().reshape(1, -1)


def partials64(t: dict, ws: int) -> list[torch.Tensor]:
    """Per-rank values (float64, (m, n)) of the documented formula, bias / x3 on rank 0."""
    x1 = t["x1"].reshape(-1, t["x1"].shape[-1]).double()
    w = _weight64(t)
    k = x1.shape[1]
    out = []
    for r in range(ws):
        sl = k_slice(k, r, ws, max(t["group"], 1))
        v = x1[:, sl] @ w[sl]
        if "dequant_scale" in t:
            if r == 0 and "bias" in t:
                v = v + t["bias"].double()
            v = v * _dequant64(t)
            if "pertoken_scale" in t:
                v = v * t["pertoken_scale"].double().reshape(-1, 1)
        elif r == 0 and "bias" in t:
            v = v + t["bias"].double()
        if r == 0 and "x3" in t:
            v = v + t["x3"].double().reshape(v.shape)
        out.append(v)
    return out


def reference64(t: dict, ws: int) -> torch.Tensor:
    """Float64 reference of the full formula (comm quant chain emulated in float64)."""
    parts = partials64(t, ws)
    if "comm_quant_scale_1" in t:
        s1 = t["comm_quant_scale_1"].double().reshape(1, -1)
        s2 = t["comm_quant_scale_2"].double().reshape(1, -1)
        q = [torch.round(p / s1).clamp(-128, 127) for p in parts]
        r = torch.round(sum(q) * (s1 / s2)).clamp(-128, 127)
        ref = r * s2
    else:
        ref = sum(parts)
    lead = t["x1"].shape[:-1]
    return ref.reshape(*lead, -1)


def magnitude64(t: dict) -> torch.Tensor:
    """Per-element bound B = sum_k |x1||w| (scaled like the output) + |bias| + |x3| in float64."""
    x1 = t["x1"].reshape(-1, t["x1"].shape[-1]).double().abs()
    b = x1 @ _weight64(t).abs()
    if "dequant_scale" in t:
        if "bias" in t:
            b = b + t["bias"].double().abs()
        b = b * _dequant64(t).abs()
        if "pertoken_scale" in t:
            b = b * t["pertoken_scale"].double().abs().reshape(-1, 1)
    elif "bias" in t:
        b = b + t["bias"].double().abs()
    if "x3" in t:
        b = b + t["x3"].double().abs().reshape(b.shape)
    return b.reshape(*t["x1"].shape[:-1], -1)


def tolerance(t: dict, ws: int) -> torch.Tensor:
    """Elementwise tolerance: (ws + 3) output roundings (one per rank, ws-1 in the reduction,
    two for the W8A16 weight dequant), one more when x3 is given (the kernel adds it to the
    rounded per-rank value and rounds again), of the magnitude bound, plus float32 accumulation
    (k u32), plus one quantization step per rank and one after requant when communication is
    quantized (each int8 conversion goes through fp16 first: <= 2^-4 of a step more)."""
    u = UNIT_ROUNDOFF[t["out_dtype"]]
    k = t["x1"].shape[-1]
    bnd = magnitude64(t)
    roundings = ws + 3 + (1 if "x3" in t else 0)
    tol = roundings * u * bnd + k * 2.0**-24 * bnd + 1e-30
    if "comm_quant_scale_1" in t:
        s1 = t["comm_quant_scale_1"].double().max()
        s2 = t["comm_quant_scale_2"].double().max()
        tol = tol + ws * s1 + s2
    return tol
