"""Benchmarks of the library against same-run baselines: ``python -m bench [name] [--quick]``.

Sub-benchmarks (each prints a table and its targets, and writes ``bench/results/<name>.json``
and ``.png``): op, kernels, overhead, loading, generation, overlap (a model of the fused
kernel's pipeline, calibrated to the vendor's published cases).
"""
