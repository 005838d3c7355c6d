"""No code execution from data, and no silent overwrite of the user's files.

1. A static scan of the project's Python sources (ascend_ops, quant, tp_layers, examples, bench)
   for every way a data file can run code when loaded: ``torch.load`` without
   ``weights_only=True``, pickle / dill / cloudpickle / joblib / marshal / shelve loads,
   ``numpy.load(allow_pickle=True)``, ``yaml.load`` without a safe loader, and ``eval`` /
   ``exec``. The scan parses the sources (ast) instead of grepping the text, so strings and
   comments (the loader's hint "torch.load(..., weights_only=True)") and method calls such as
   ``model.eval()`` are not matched, and ``from pickle import loads`` aliases are. A self-test
   plants each pattern in a snippet so the scan cannot silently match nothing.
2. What tests/test_quant_checkpoint.py and tests/test_quant_cli.py do not cover yet about
   overwriting: an output that appears while the writer runs, ``--out`` naming the model
   directory (or a symlink to it) even with ``--force``, and ``--out`` naming a regular file.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("ascend_ops", "quant", "tp_layers", "examples", "bench")

# Calls that deserialize with code execution whatever their arguments.
_ALWAYS_UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.unsafe_load",
    "yaml.full_load",
    "eval",
    "exec",
    "builtins.eval",
    "builtins.exec",
}
_TORCH_LOAD = {"torch.load", "torch.serialization.load"}
_NUMPY_LOAD = {"numpy.load"}
_YAML_LOAD = {"yaml.load"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


class _Scanner(ast.NodeVisitor):
    """Collects (line, description) of unsafe calls, resolving import aliases."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> dotted origin
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = (
                a.name if a.asname else a.name.split(".")[0]
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def _dotted(self, node: ast.expr) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None  # a method call on an expression (model.eval(), ...)
        if not parts and node.id in ("eval", "exec") and node.id not in self.aliases:
            return node.id  # the builtins
        base = self.aliases.get(node.id)
        if base is None:
            return None  # a local variable's method, not a module function
        base = {"np": "numpy"}.get(base, base)
        return ".".join([base, *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name in _ALWAYS_UNSAFE:
            self.found.append((node.lineno, f"{name}(...)"))
        elif name in _TORCH_LOAD and not _is_true(_kwarg(node, "weights_only")):
            self.found.append((node.lineno, f"{name}(...) without weights_only=True"))
        elif name in _NUMPY_LOAD and _kwarg(node, "allow_pickle") is not None:
            if not (
                isinstance(_kwarg(node, "allow_pickle"), ast.Constant)
                and _kwarg(node, "allow_pickle").value is False
            ):
                self.found.append((node.lineno, f"{name}(..., allow_pickle=...)"))
        elif name in _YAML_LOAD:
            loader = _kwarg(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            safe = loader is not None and "Safe" in ast.unparse(loader)
            if not safe:
                self.found.append((node.lineno, f"{name}(...) without a SafeLoader"))
        self.generic_visit(node)


def scan_source(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename))
    return scanner.found


def _project_files() -> list[Path]:
    files = []
    for d in SCANNED:
        files += [p for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def test_project_sources_never_execute_code_from_data() -> None:
    files = _project_files()
    for d in SCANNED:  # the scan is not vacuous: every directory has sources
        assert any(p.is_relative_to(ROOT / d) for p in files), f"no Python sources in {d}/"
    hits = [
        f"{p.relative_to(ROOT)}:{line}: {what}"
        for p in files
        for line, what in scan_source(p.read_text(encoding="utf-8"), str(p))
    ]
    assert not hits, "code execution from data:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "import torch\ntorch.load(path, map_location='cpu', weights_only=flag)",
        "from torch import load\nload(path)",
        "import torch as t\nt.serialization.load(path)",
        "import pickle\npickle.load(f)",
        "import pickle as pk\npk.loads(b)",
        "from pickle import loads\nloads(b)",
        "import pickle\npickle.Unpickler(f).load()",
        "import dill\ndill.loads(b)",
        "import marshal\nmarshal.loads(b)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "eval(text)",
        "exec(open(path).read())",
        "import builtins\nbuiltins.eval(s)",
    ],
)
def test_scan_finds_each_unsafe_pattern(snippet: str) -> None:
    assert scan_source(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path, weights_only=True)",
        "import torch\nmodel.eval()",
        "s = 'torch.load(path)  pickle.loads(b)  eval(x)'",
        "# torch.load(path)\nx = 1",
        "import numpy as np\nnp.load(path)",
        "import numpy as np\nnp.load(path, allow_pickle=False)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(text)",
        "from safetensors.torch import load_file\nload_file(path)",
        "loader.load(path)",
    ],
)
def test_scan_accepts_safe_code(snippet: str) -> None:
    assert scan_source(snippet) == [], snippet


# -- no overwrite without force (only what test_quant_checkpoint / test_quant_cli lack) ----------


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _temp_leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_writer_refuses_an_output_that_appears_while_writing(tmp_path: Path) -> None:
    from quant.checkpoint import CheckpointWriter

    target = tmp_path / "ckpt"
    wr = CheckpointWriter(target)
    wr.add("a.weight", torch.ones(4))
    target.mkdir()  # someone else creates the output meanwhile
    (target / "theirs.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="appeared while writing"):
        wr.commit("FLOAT")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert (target / "theirs.txt").read_text() == "keep"
    assert _temp_leftovers(tmp_path, "ckpt") == []


def _tiny_model(root: Path) -> Path:
    d = root / "model"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.randn(32, 64, generator=g).bfloat16()},
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _cli(*argv: str) -> int:
    from quant.cli import main

    return main(["--no-progress", "--scheme", "w8a16", *argv])


def test_cli_never_writes_over_the_model_directory(tmp_path: Path, capsys) -> None:
    model = _tiny_model(tmp_path)
    before = _tree_digest(model)
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    for out in (model, link):
        for force in ((), ("--force",)):
            assert _cli("--model", str(model), "--out", str(out), *force) == 2
            assert "is the model directory" in capsys.readouterr().err
            assert _tree_digest(model) == before
    assert _temp_leftovers(tmp_path, "model") == [] and _temp_leftovers(tmp_path, "link") == []


def test_cli_refuses_an_existing_output_file_without_force(tmp_path: Path, capsys) -> None:
    model = _tiny_model(tmp_path)
    out = tmp_path / "out"
    out.write_text("not a checkpoint, but mine")
    assert _cli("--model", str(model), "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "not a checkpoint, but mine"
    assert _temp_leftovers(tmp_path, "out") == []
