"""kernels: the W8A16 and W8A8 local matmuls vs a bf16 ``nn.Linear``, across m (k = n = 4096).

Each quantized case is a world-size-1 ``tp_layers.ColumnParallelLinear`` of the scheme (its
whole local path: activation quantization for W8A8, the kernel, dequantization), loaded from
``quant.quantize_linear`` tensors of the same float weight as the ``nn.Linear``. Targets:
W8A16 at m <= 16 >= 4x faster than bf16; W8A8 at m = 2048 no slower than bf16.
"""

from __future__ import annotations

from statistics import median_high
from typing import Any

from bench.common import (
    Ratio,
    Target,
    interleaved,
    plot_bars,
    print_table,
    print_targets,
    ratio,
    save_results,
)

K = N = 4096


def make_layer(k: int, n: int, scheme: Any, weight: Any, tp: Any = None) -> Any:
    """A loaded, processed ColumnParallelLinear (no bias) of ``scheme`` holding ``weight``."""
    import torch

    import tp_layers
    from quant.algorithms import ActivationRange, quantize_linear

    tp = tp or tp_layers.TPContext.single()
    layer = tp_layers.ColumnParallelLinear(
        k, n, bias=False, quant=scheme, tp=tp, params_dtype=torch.bfloat16
    )
    tensors = quantize_linear(
        weight, None, scheme, model_dtype=torch.bfloat16, act_range=ActivationRange(-4.0, 4.0)
    )
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        params[name].weight_loader(params[name], t)
    layer.process_weights_after_loading()
    return layer


def run(quick: bool = False) -> list[Target]:
    """Measure, print, write bench/results/kernels.{json,png}."""
    import torch
    from torch import nn

    from quant.schemes import W8A8, W8A16

    torch.manual_seed(0)
    w = (torch.randn(N, K) / K**0.5).bfloat16()
    lin = nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    layers = {
        "w8a16": make_layer(K, N, W8A16(), w),
        "w8a8_dynamic": make_layer(K, N, W8A8(dynamic=True), w),
        "w8a8_static": make_layer(K, N, W8A8(), w),
    }
    ms = (1, 16, 2048) if quick else (1, 4, 16, 64, 256, 2048)
    rows: list[dict] = []
    with torch.no_grad():
        for m in ms:
            x = (torch.randn(m, K)).bfloat16()
            fns = {"bf16_linear": lambda x=x: lin(x)}
            for name, layer in layers.items():
                fns[name] = lambda x=x, layer=layer: layer(x)
            big = m >= 1024
            t = interleaved(fns, repeats=3 if big else (5 if quick else 7), iters=1 if big else 3)
            row = {"m": m, "ms": {n: [v * 1e3 for v in ts] for n, ts in t.items()}}
            row["speedup_vs_bf16"] = {n: ratio(t["bf16_linear"], t[n]).as_dict() for n in layers}
            rows.append(row)
    table = []
    for row in rows:
        med = {n: median_high(v) for n, v in row["ms"].items()}
        sp = {n: Ratio.from_dict(d) for n, d in row["speedup_vs_bf16"].items()}
        table.append(
            (row["m"], f"{med['bf16_linear']:.2f}", *(f"{med[n]:.2f} ({sp[n]})" for n in layers))
        )
    print_table(
        f"kernels: local matmul ms (speedup vs bf16 nn.Linear), k = n = {K}, "
        f"{torch.get_num_threads()} threads",
        ("m", "bf16 Linear", *layers),
        table,
    )

    def sp(m: int, name: str) -> Ratio:
        d = next(r for r in rows if r["m"] == m)["speedup_vs_bf16"][name]
        return Ratio.from_dict(d)

    small = [m for m in ms if m <= 16]
    worst16 = min(small, key=lambda m: sp(m, "w8a16").median)
    targets = [
        Target(
            f"kernels W8A16 speedup vs bf16 at m <= 16 (worst m={worst16})",
            sp(worst16, "w8a16"),
            ">=",
            4.0,
        ),
        Target(
            "kernels W8A8 dynamic speedup vs bf16 at m=2048", sp(2048, "w8a8_dynamic"), ">=", 1.0
        ),
        Target("kernels W8A8 static speedup vs bf16 at m=2048", sp(2048, "w8a8_static"), ">=", 1.0),
    ]
    print_targets(targets)
    plot_bars(
        "kernels",
        f"speedup over bf16 nn.Linear (k = n = {K}; dashed: 1x)",
        [f"m={r['m']}" for r in rows],
        {n: [sp(r["m"], n).median for r in rows] for n in layers},
        "speedup (x)",
        errors={n: [(sp(r["m"], n).lo, sp(r["m"], n).hi) for r in rows] for n in layers},
        hline=1.0,
    )
    save_results("kernels", {"quick": quick, "k": K, "n": N, "rows": rows}, targets)
    return targets
