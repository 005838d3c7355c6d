"""``quantize_checkpoint``: float safetensors model directory -> msmodelslim quantized directory.

Streams one tensor at a time (``safe_open`` per source shard), writes output shards
incrementally through ``CheckpointWriter`` (atomic; nothing is left behind on error), and
validates everything it can *before* writing: the scheme against every layer shape, the
calibration coverage, the output path. The jobs live in their own modules: calibration
(``quant.calibration``), one layer (``quant.convert_layer``), smoothing groups
(``quant.convert_smooth``), GPTQ (``quant.gptq``), the report (``quant.report``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quant.calibration import Calibration, load_calibration, quiet_progress
from quant.checkpoint import CheckpointReader, CheckpointWriter, check_output_path
from quant.convert_layer import LayerJob, convert_layer
from quant.convert_smooth import check_smooth, convert_group, plan_smoothing
from quant.modules import is_skipped
from quant.report import ConvertResult, LayerReport, format_report
from quant.schemes import W8A8, W8A16, Scheme
from quant.smooth import DownSmoothGroup, SmoothGroup

__all__ = ["ConvertResult", "LayerReport", "format_report", "quantize_checkpoint"]

log_ = logging.getLogger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class _Progress:
    """tqdm when available and stderr is a TTY, else silent (the caller prints a summary)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        self._count = 0
        self._total = total
        self._plain = False
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="tensor", desc="quantize", file=sys.stderr)
            except ImportError:
                self._plain = True

    def update(self, name: str) -> None:
        self._count += 1
        if self._bar is not None:
            self._bar.set_postfix_str(name[-40:], refresh=False)
            self._bar.update(1)
        elif self._plain:
            print(f"\r[{self._count}/{self._total}] {name[-60:]:<60}", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            print(file=sys.stderr)


@dataclass
class _Plan:
    """What to do with each tensor, decided before writing."""

    layers: dict[str, tuple[int, int]]  # module -> (n, k) to quantize
    excluded: list[str]  # linears kept FLOAT by exclude globs
    groups: list[SmoothGroup] = field(default_factory=list)
    downs: list[DownSmoothGroup | None] = field(default_factory=list)
    member: dict[str, int] = field(default_factory=dict)  # tensor -> its smooth group


def _plan_layers(
    reader: CheckpointReader, config: Scheme, skip: tuple[str, ...], exclude: tuple[str, ...]
) -> _Plan:
    """The linears to quantize; one summarized line per distinct shape error."""
    layers: dict[str, tuple[int, int]] = {}
    excluded: list[str] = []
    errors: dict[str, list[str]] = {}
    for name in reader.names():
        info = reader.info(name)
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in _FLOATS:
            continue
        module = name[: -len(".weight")]
        if is_skipped(module, skip):
            continue
        if any(fnmatch.fnmatchcase(module, g) for g in exclude):
            excluded.append(module)
            continue
        n, k = info.shape
        try:
            config.validate_layer(n, k)
        except ValueError as e:
            errors.setdefault(str(e), []).append(f"{module} (n={n}, k={k})")
        layers[module] = (n, k)
    if errors:
        lines = [
            f"{msg}: {len(mods)} layer(s): "
            + ", ".join(mods[:3])
            + (" ..." if len(mods) > 3 else "")
            for msg, mods in errors.items()
        ]
        raise ValueError(
            f"cannot quantize with {config.name}:\n  "
            + "\n  ".join(lines)
            + "\n(use --skip PATTERN to keep such layers in float)"
        )
    if not layers:
        raise ValueError(f"no 2-D float '*.weight' tensors to quantize in {reader.path}")
    return _Plan(layers, excluded)


def _check_coverage(
    cal: Calibration | None, layers: Iterable[str], what: str, per_channel: bool
) -> None:
    """Raise when ``cal`` lacks inputs of some layers (naming what the file does hold)."""
    if cal is None:
        raise ValueError(f"{what} needs calibration data: pass --calib FILE")
    have = set(cal.activations) if per_channel else cal.modules()
    missing = sorted(set(layers) - have)
    if not missing:
        return
    held = sorted(cal.modules())
    shown = ", ".join(held[:6]) + (" ..." if len(held) > 6 else "")
    raise ValueError(
        f"calib data has no {'activations' if per_channel else 'inputs'} for {len(missing)} "
        "layer(s): "
        + ", ".join(missing[:6])
        + (" ..." if len(missing) > 6 else "")
        + f"; it holds {len(held)} entr{'y' if len(held) == 1 else 'ies'}"
        + (f": {shown}" if held else "")
        + f" ({what}; add them to the calib file or --skip them)"
    )


def _load_cal(
    calib: str | os.PathLike[str] | Calibration | None,
    src: Path,
    samples: int,
    seq_len: int,
    progress: bool,
) -> Calibration | None:
    if calib is None or isinstance(calib, Calibration):
        return calib
    with quiet_progress(not progress):
        return load_calibration(calib, model_dir=src, samples=samples, seq_len=seq_len)


def _plan_smooth(plan: _Plan, reader: CheckpointReader, src: Path, cal: Calibration) -> None:
    plan.groups, plan.downs = plan_smoothing(reader, src, cal)
    for i, (g, dg) in enumerate(zip(plan.groups, plan.downs, strict=True)):
        for mod in (g.norm, *g.linears, *(() if dg is None else (dg.down,))):
            for suffix in ("weight", "bias"):
                if f"{mod}.{suffix}" in reader:
                    plan.member[f"{mod}.{suffix}"] = i


def _write_tensors(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    plan: _Plan,
    job: LayerJob,
    smooth: float | str | None,
    bar: _Progress,
) -> None:
    """Every source tensor, in source order: quantized, smoothed group by group, or FLOAT."""
    done: set[int] = set()
    for _file, infos in reader.infos_by_file():
        for info in infos:
            name = info.name
            module = name.rpartition(".")[0]
            if name in plan.member:
                i = plan.member[name]
                if i not in done:
                    done.add(i)
                    assert smooth is not None
                    convert_group(
                        reader, writer, plan.groups[i], plan.downs[i], smooth, plan.layers, job
                    )
            elif name.endswith(".bias") and module in plan.layers:
                pass  # written with its weight
            elif name.endswith(".weight") and module in plan.layers:
                convert_layer(reader, writer, module, job)
            else:
                t = reader.get_tensor(name)
                if job.model_dtype is not None and t.dtype in _FLOATS:
                    t = t.to(job.model_dtype)
                writer.add(name, t, "FLOAT")
                job.result.kept_float.append(name)
            bar.update(name)


def _check_args(
    config: Scheme, model_dtype: torch.dtype | None, src: Path, dst: Path, force: bool
) -> None:
    if not isinstance(config, Scheme):
        raise TypeError(f"config: expected a quant.schemes scheme, got {type(config).__name__}")
    if not config.is_quantized:
        raise ValueError("config: FLOAT is not a quantization scheme")
    if model_dtype is not None and model_dtype not in _FLOATS:
        raise ValueError(f"model_dtype: must be float16, bfloat16 or float32, got {model_dtype}")
    if not src.is_dir():
        raise FileNotFoundError(f"model directory not found: {src}")
    check_output_path(src, dst, force=force)


def _load_dtype(reader: CheckpointReader, config: Scheme, model_dtype: torch.dtype | None) -> str:
    """The dtype a W8A8 output must be loaded in (its kernels output float16 / bfloat16
    only, dtype table 3): float16 for float16 scales, else bfloat16; "" for other schemes."""
    if not isinstance(config, W8A8):
        return ""
    dt = model_dtype or next(
        (reader.info(n).dtype for n in reader.names() if reader.info(n).dtype in _FLOATS), None
    )
    return "torch.float16" if dt == torch.float16 else "torch.bfloat16"


def _warn_known_bad(config: Scheme, smooth: float | str | None, observer: str) -> None:
    if isinstance(config, W8A8) and not config.dynamic and smooth is None:
        log_.warning(
            "static W8A8 without smoothing loses much accuracy on LLMs (per-tensor ranges of "
            "outlier channels; SmolLM2-135M: +94% perplexity with min-max, more with the "
            "percentile observer): use the recommended recipe (--smooth 0.8 --gptq, the CLI "
            "default with --calib), see the README quant section"
        )


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: Scheme,
    *,
    calib: str | os.PathLike[str] | Calibration | None = None,
    calib_samples: int = 8,
    calib_seq_len: int = 512,
    skip: Iterable[str] = (),
    exclude: Iterable[str] = (),
    fallback: int = 0,
    force: bool = False,
    report: bool = False,
    observer: str = "minmax",
    percentile: float = 99.99,
    act_symmetric: bool = False,
    model_dtype: torch.dtype | None = None,
    smooth: float | str | None = None,
    gptq: bool = False,
    best_effort: Iterable[str] = (),
    max_shard_size: int | str = "2GB",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Quantize the float safetensors model in ``src`` into an msmodelslim checkpoint ``dst``.

    Every 2-D floating ``*.weight`` whose module name matches no skip pattern (defaults: lm_head,
    embeddings, norms; ``skip`` adds ``re.search`` patterns) and no ``exclude`` glob
    (``fnmatch`` on the module name, msmodelslim's ``disable_names``) is quantized with
    ``config``; everything else is copied as ``FLOAT``. fallback: also keep the N linears of
    largest relative output error on the calibration activations (measured by a first
    conversion of the same settings) FLOAT. model_dtype: dtype of the float tensors and scales
    of the output (default: each tensor's source dtype). Static W8A8, ``smooth``, ``gptq`` and
    ``fallback`` need ``calib`` (a calib file, see ``quant.calibration``: activations, token
    ids, plain text or JSONL prompts, of which ``calib_samples`` sequences of ``calib_seq_len``
    tokens are used; or a loaded ``Calibration``). observer: ``"minmax"``, ``"percentile"`` or
    ``"mse"``. gptq: GPTQ weight rounding (``quant.gptq``) from each layer's calib inputs.
    best_effort: names among ``"smooth"``, ``"gptq"`` dropped with a warning when the model
    (architecture) or the calib data (ranges only) cannot support them, instead of raising
    (the CLI's recommended recipe).
    Side files (config.json, tokenizer) are copied. Raises FileNotFoundError / FileExistsError
    / ValueError before writing anything when inputs are wrong; the output appears atomically
    or not at all.

    smooth: W8A8 (static or dynamic) only, off by default. ``"auto"`` searches alpha per group
    (``quant.smooth.search_alpha``: the alpha of least quantized output error of the group's
    linears on the calib activations, msmodelslim's "flex smooth"); a number in [0, 1] uses
    that alpha everywhere. For each norm -> linears group of a known architecture
    (``config.json`` ``model_type``, see ``quant.smooth``) the norm's weight (and bias) is
    divided by per-channel factors and the linears' weight columns multiplied by them; the
    norms are written FLOAT, activation ranges are observed on the smoothed inputs. down_proj
    (gated MLPs) is smoothed through up_proj's output rows and o_proj through v_proj's (per kv
    channel), both exact in float. A group's tensors are handled together when the first of
    them comes up; memory stays near one layer group.
    """
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    _check_args(config, model_dtype, src, dst, force)
    skip, exclude = tuple(skip), tuple(exclude)
    if smooth is not None:
        check_smooth(smooth, config, calib)
    if fallback < 0:
        raise ValueError(f"fallback: must be >= 0 layers, got {fallback}")
    kw = dict(
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        skip=skip,
        observer=observer,
        percentile=percentile,
        act_symmetric=act_symmetric,
        model_dtype=model_dtype,
        smooth=smooth,
        best_effort=tuple(best_effort),
        gptq=gptq,
        max_shard_size=max_shard_size,
        progress=progress,
    )
    if fallback:
        cal = _load_cal(calib, src, calib_samples, calib_seq_len, progress)
        exclude = exclude + tuple(_worst_layers(src, dst, config, cal, exclude, fallback, kw))
        calib = cal
    result = _convert(src, dst, config, calib, exclude, force, report, kw)
    result.seconds = time.monotonic() - t0
    if log is not None:
        log(result.summary())
    return result


def _worst_layers(
    src: Path,
    dst: Path,
    config: Scheme,
    cal: Calibration | None,
    exclude: tuple[str, ...],
    n: int,
    kw: dict,
) -> list[str]:
    """The n quantized linears of largest output error on the calib data (a trial
    conversion into a temporary directory next to ``dst``)."""
    if cal is None:
        raise ValueError("fallback needs calibration data: pass --calib FILE")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fallback-", dir=dst.parent))
    try:
        trial = _convert(src, tmp / "trial", config, cal, exclude, False, True, kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ranked = sorted(
        (r for r in trial.reports if r.out_rel_err is not None),
        key=lambda r: r.out_rel_err or 0.0,
        reverse=True,
    )
    worst = [r.name for r in ranked[:n]]
    log_.info("fallback to float: %s", ", ".join(worst))
    return worst


def _plan_recipe(
    plan: _Plan,
    reader: CheckpointReader,
    src: Path,
    cal: Calibration | None,
    job: LayerJob,
    kw: dict,
) -> dict:
    """Validate GPTQ coverage and plan smoothing; with ``best_effort`` drop what cannot be
    done (warning). Returns the settings actually used."""
    try:
        if kw["gptq"]:
            _check_coverage(cal, plan.layers, "GPTQ", per_channel=True)
    except ValueError as e:
        if "gptq" not in kw["best_effort"]:
            raise
        log_.warning("recipe: no GPTQ (%s)", " ".join(str(e).split())[:300])
        kw, job.gptq = {**kw, "gptq": False}, False
    try:
        if kw["smooth"] is not None:
            assert cal is not None
            _plan_smooth(plan, reader, src, cal)
    except ValueError as e:
        if "smooth" not in kw["best_effort"]:
            raise
        log_.warning("recipe: no smoothing (%s)", " ".join(str(e).split())[:300])
        plan.groups, plan.downs, plan.member = [], [], {}
        kw = {**kw, "smooth": None}
    return kw


def _convert(
    src: Path,
    dst: Path,
    config: Scheme,
    calib: str | os.PathLike[str] | Calibration | None,
    exclude: tuple[str, ...],
    force: bool,
    report: bool,
    kw: dict,
) -> ConvertResult:
    """One conversion (see ``quantize_checkpoint``)."""
    with CheckpointReader(src) as reader:
        if reader.description is not None and reader.model_quant_type != "FLOAT":
            raise ValueError(f"{src} is already quantized ({reader.model_quant_type})")
        plan = _plan_layers(reader, config, kw["skip"], exclude)
        cal = _load_cal(calib, src, kw["calib_samples"], kw["calib_seq_len"], kw["progress"])
        job = LayerJob(
            config,
            cal,
            ConvertResult(out_dir=dst, scheme=config.name),
            kw["observer"],
            kw["percentile"],
            kw["act_symmetric"],
            kw["model_dtype"],
            report,
            kw["gptq"],
        )
        if job.static:
            _check_coverage(cal, plan.layers, "static W8A8", per_channel=False)
        kw = _plan_recipe(plan, reader, src, cal, job, kw)
        _warn_known_bad(config, kw["smooth"], kw["observer"])
        job.result.excluded = list(plan.excluded)
        job.result.load_dtype = _load_dtype(reader, config, kw["model_dtype"])
        bar = _Progress(len(reader.names()), kw["progress"])
        try:
            with CheckpointWriter(dst, max_shard_bytes=kw["max_shard_size"], force=force) as writer:
                _write_tensors(reader, writer, plan, job, kw["smooth"], bar)
                writer.copy_side_files(src)
                writer.flush()
                job.result.shards = writer.num_shards
                group = config.group_size if isinstance(config, W8A16) else 0
                writer.commit(config.name, group_size=group)
        finally:
            bar.close()
    return job.result
