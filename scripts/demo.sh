#!/usr/bin/env bash
# Run the main demo in the project's venv (created on first use). Extra args go to the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
exec .venv/bin/python examples/mm_all_reduce_demo.py "$@"
