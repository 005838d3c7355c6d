#!/usr/bin/env bash
# The README demo: the vendor single-op example on 2 ranks, then greedy generation with the KV cache on a real small LLM (SmolLM2-135M,
# see examples/make_demo_model.py) at tensor-parallel size 2 on CPU, prefill through the fused
# matmul+all-reduce, decode through matmul then all-reduce. Extra args go to generate.py.
# Runs offline (HF_HUB_OFFLINE=1); the demo model is created on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
export HF_HUB_OFFLINE=1
echo "== 1/2: the vendor doc's single-op example (x1 [128, 512], x2 [512, 64]) on 2 CPU ranks"
.venv/bin/python examples/mm_all_reduce_demo.py --world-size 2 --brief
echo "== 2/2: greedy generation at TP=2 (fused prefill, unfused decode)"
.venv/bin/python examples/make_demo_model.py >/dev/null
exec .venv/bin/torchrun --nproc-per-node 2 examples/generate.py "$@"
