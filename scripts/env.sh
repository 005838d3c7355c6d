#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv and install the project into it.
# Idempotent: a stamp file records the hash of pyproject.toml, so a second run costs ~0.1 s.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
stamp="$venv/.installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[env] installing into $venv (first run takes a few minutes; log: $venv/install.log)" >&2
    log="$venv/install.log"
    : > "$log"
    pip_install() {
        if ! "$venv/bin/python" -m pip install -q "$@" </dev/null >>"$log" 2>&1; then
            tail -n 40 "$log" >&2
            echo "[env] pip install $* failed (full log: $log)" >&2
            exit 1
        fi
    }
    pip_install --upgrade pip
    # torch first, pinned, so nothing else can pull a CUDA build.
    pip_install "torch==2.13.0"
    pip_install -e "$root[test,hf,megatron,bench,dev]"
    if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torch_npu') else 1)"; then
        echo "[env] torch_npu found in the venv: removing it (it breaks import torch without CANN)" >&2
        "$venv/bin/python" -m pip uninstall -y -q torch_npu </dev/null
    fi
    echo "$want" > "$stamp"
fi
