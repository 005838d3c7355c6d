#!/usr/bin/env bash
# Run the test suite on another torch / Python pair than the default environment's (by hand; CI
# keeps the fast Python 3.11 + torch 2.13 run of scripts/test.sh).
#
#   bash scripts/test-compat.sh TORCH PYTHON [pytest args...]
#   bash scripts/test-compat.sh 2.7.1 3.10          # the vllm-ascend pair
#
# Builds (or reuses) .cache/compat/py$PYTHON-torch$TORCH, installs torch==$TORCH first, then the
# project with a plain `pip install .` (not editable: this checks the packaging; fails if it
# changed torch), then `pip install .[test,hf,megatron] torch==$TORCH`, and runs
# `pytest -m "not slow"` from the tree. Pip downloads are cached in
# .cache/compat/pip and torch's wheels (with its CUDA libraries) in .cache/compat/wheels. The
# suite gets ASCEND_CONFORMANCE_VERSIONS=$TORCH: torch_npu pairs one-to-one with torch, so the
# conformance tests run on the newest torch_npu $TORCH[.postN] for that Python (tests/npu_conformance.py).
#
# Environment:
#   COMPAT_TORCH_INDEX  index URL for the torch step only (e.g. PyTorch's CPU wheel index, far
#                       smaller than PyPI's CUDA build); unset: torch from the default index.
#   COMPAT_EXTRAS       extras to install (default test,hf,megatron).
#   COMPAT_PINS         more requirement specs for the extras line, space-separated: with torch
#                       2.5.1 use COMPAT_PINS="transformers<5" (transformers 5 disables its torch
#                       support below torch 2.6 at import time, its metadata does not say so).
#   COMPAT_FRESH=1      delete the venv first.
#   COMPAT_TEST_TIMEOUT seconds per test (pytest-timeout; default 900).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 TORCH PYTHON [pytest args...]   e.g. $0 2.7.1 3.10" >&2
    exit 2
fi
torch_v="$1"
py_v="$2"
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/compat"
venv="$cache/py$py_v-torch$torch_v"
extras="${COMPAT_EXTRAS-test,hf,megatron}"
export PIP_CACHE_DIR="$cache/pip"
mkdir -p "$cache"

find_python() {
    local c
    for c in "python$py_v" /root/.pyenv/versions/"$py_v"*/bin/python "$HOME"/.pyenv/versions/"$py_v"*/bin/python; do
        if command -v "$c" >/dev/null 2>&1 \
            && [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$py_v" ]; then
            command -v "$c"
            return 0
        fi
    done
    echo "[compat] no Python $py_v found (looked for python$py_v and pyenv versions)" >&2
    return 1
}

[ "${COMPAT_FRESH:-0}" = 1 ] && rm -rf "$venv"
if [ ! -x "$venv/bin/python" ]; then
    "$(find_python)" -m venv "$venv"
fi
py="$venv/bin/python"
log="$venv/install.log"
: > "$log"
pip_install() {
    if ! "$py" -m pip install "$@" </dev/null >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "[compat] pip install $* failed (full log: $log)" >&2
        exit 1
    fi
}
torch_now() { "$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true; }

t0=$(date +%s)
if [ "$(torch_now)" != "$torch_v" ]; then
    echo "[compat] installing torch==$torch_v into $venv (log: $log)" >&2
    # Wheels kept in .cache/compat/wheels (pip's own HTTP cache is not relied on: it keeps only
    # what the index allows it to); a second venv of the same torch downloads nothing.
    wheels="$cache/wheels"
    mkdir -p "$wheels"
    if [ -n "${COMPAT_TORCH_INDEX:-}" ]; then
        "$py" -m pip download -q -d "$wheels" "torch==$torch_v" --index-url "$COMPAT_TORCH_INDEX" \
            </dev/null >>"$log" 2>&1 || { tail -n 40 "$log" >&2; exit 1; }
    else
        "$py" -m pip download -q -d "$wheels" "torch==$torch_v" </dev/null >>"$log" 2>&1 \
            || { tail -n 40 "$log" >&2; exit 1; }
    fi
    pip_install --no-index --find-links "$wheels" "torch==$torch_v"
fi
t1=$(date +%s)
# Install from a copy of the tree's files (tracked and untracked, not ignored): pip builds in the
# source folder, and setuptools' build/ would otherwise carry modules deleted from the tree.
src="$venv.src"  # one per venv: runs of different pairs may overlap
rm -rf "$src"
mkdir -p "$src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
        2>/dev/null | tar -xf - -C "$src"
else
    tar -C "$root" --exclude=./.cache --exclude=./.venv --exclude=./build -cf - . | tar -xf - -C "$src"
fi
# The plain install must leave the user's torch alone: nothing pinned, torch checked after.
echo "[compat] pip install . (from $src)" >&2
pip_install "$src"
if [ "$(torch_now)" != "$torch_v" ]; then
    echo "[compat] FAIL: pip install . changed torch $torch_v -> $(torch_now) (log: $log)" >&2
    exit 1
fi
echo "[compat] pip install . kept torch $(torch_now)" >&2
# Extras with torch named on the same line, as a user with a torch_npu pair installs them: an
# extra's newest release may want a newer torch (megatron-core 0.15.3+ need >=2.6), and the pin makes
# pip pick an older release of the extra instead of replacing torch.
if [ -n "$extras" ]; then
    echo "[compat] pip install .[$extras] torch==$torch_v ${COMPAT_PINS:-}" >&2
    # shellcheck disable=SC2086  # COMPAT_PINS is a list of requirement specs
    pip_install "$src[$extras]" "torch==$torch_v" ${COMPAT_PINS:-} \
        ${COMPAT_TORCH_INDEX:+--extra-index-url "$COMPAT_TORCH_INDEX"}
fi
if "$py" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torch_npu') else 1)"; then
    echo "[compat] torch_npu found in $venv: removing it (it breaks import torch without CANN)" >&2
    "$py" -m pip uninstall -y -q torch_npu </dev/null
fi
t2=$(date +%s)
"$py" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E '^(torch|numpy|safetensors|transformers|accelerate|megatron-core|gguf|pytest|hypothesis)==' >&2 || true
echo "[compat] install: torch $((t1 - t0)) s, project $((t2 - t1)) s; venv $(du -sh "$venv" | cut -f1), wheels $(du -sh "$cache/wheels" 2>/dev/null | cut -f1)" >&2

cd "$root"
export ASCEND_CONFORMANCE_VERSIONS="$torch_v"
# torch_npu builds a release for some Pythons only (2.5.1: up to cp311); without one for this
# Python there is no such Ascend pair, so the tests on that release are left out (index
# unreachable: the conformance fixtures skip them themselves).
npu_versions="$("$py" -m pip index versions torch_npu --python-version "$py_v" 2>/dev/null \
    | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n')" || true
no_pair=()
if [ -n "$npu_versions" ] && ! grep -qxE "${torch_v//./\\.}(\.post[0-9]+)?" <<<"$npu_versions"; then
    echo "[compat] torch_npu has no $torch_v wheel for Python $py_v: no such Ascend pair," \
        "tests on torch_npu $torch_v deselected (-k \"not $torch_v\")" >&2
    no_pair=(-k "not $torch_v")
fi
set +e
# A per-test timeout turns a hang into a failure: a safety net only, every test shuts its gloo
# groups down cleanly (tests/mp_harness.py, destroy_group_cleanly).
"$py" -m pytest -q -p no:cacheprovider -m "not slow" --timeout "${COMPAT_TEST_TIMEOUT:-900}" \
    ${no_pair[@]+"${no_pair[@]}"} "$@"
rc=$?
set -e
echo "[compat] python $py_v + torch $torch_v: pytest exit $rc, tests $(( $(date +%s) - t2 )) s" >&2
exit $rc
