#!/usr/bin/env bash
# The README demo: greedy generation with the KV cache on a real small LLM (SmolLM2-135M,
# see examples/make_demo_model.py) at tensor-parallel size 2 on CPU, prefill through the fused
# matmul+all-reduce, decode through matmul then all-reduce. Extra args go to generate.py.
# Runs offline (HF_HUB_OFFLINE=1); the demo model is created on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
export HF_HUB_OFFLINE=1
.venv/bin/python examples/make_demo_model.py >/dev/null
exec .venv/bin/torchrun --nproc-per-node 2 examples/generate.py "$@"
