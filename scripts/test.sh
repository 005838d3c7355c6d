#!/usr/bin/env bash
# Run the test suite in the project's venv (created on first use). Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
