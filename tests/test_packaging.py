"""Packaging: every third-party module the package imports is a declared dependency, or an
optional one imported only where its absence is handled; the wheel installs without extras
into a fresh virtual environment and runs there."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightlong"

DISTRIBUTION = {"yaml": "PyYAML", "fla": "flash-linear-attention", "PIL": "Pillow"}
"""Import name -> distribution name, where the two differ."""

OPTIONAL = {
    "transformers": "extra [hf]: lightlong/hf.py; the parity bridge and benchmarks, in functions",
    "triton": "extra [triton]: the kernels in ops/lightning/triton/, which api.py imports "
    "only for backend 'triton'",
    "lm_eval": "extra [lm_eval]: eval/harness.py, which no other module imports",
    "yaml": "PyYAML, for .yaml training configs (train/config.py says to install it)",
    "fla": "flash-linear-attention, a benchmark baseline on CUDA when installed",
    "fastapi": "extra [serve]: lightlong/serve/",
    "uvicorn": "extra [serve]: lightlong/serve/server.py",
    "prometheus_client": "extra [serve]: lightlong/serve/metrics.py",
    "jinja2": "extra [serve]: chat templates, lightlong/serve/chat.py",
    "openai": "extra [dev]: the load generator of `lightlong bench serve`, in functions",
    "httpx": "extra [dev]: `lightlong bench serve` (a dependency of fastapi's tests and openai)",
}
"""Third-party modules that are not dependencies. Each may be imported only inside a function,
under a `try` that catches ImportError, or in a module that exists for its extra
(EXTRA_ONLY). TensorBoard needs no entry: it comes in as torch.utils.tensorboard, in a
function that catches ImportError. tomli is a dependency below Python 3.11 and is imported
only when tomllib is missing."""

EXTRA_ONLY = {
    "lightlong.hf": {"transformers"},  # transformers' Auto classes for lightlong checkpoints
    "lightlong.ops.lightning.triton": {"triton"},
    "lightlong.eval.harness": {"lm_eval"},
    "lightlong.serve": {"fastapi", "uvicorn", "prometheus_client", "jinja2"},
}
"""Modules (and packages) that exist for an extra's imports: they import them at their top,
and the rest of the package imports them only where the optional import is guarded
(`lightlong.serve.config` imports none, so the CLI may read it)."""


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_dependencies() -> set[str]:
    """Normalised names of `[project] dependencies` (markers and versions dropped)."""
    specs = pyproject()["project"]["dependencies"]
    return {normalise(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}


def module_name(path: Path, root: Path = ROOT) -> str:
    """lightlong/eval/harness.py -> lightlong.eval.harness (a package's __init__: the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def catches_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[str, int, bool]]:
    """(absolute module name, line, guarded) of each import in one file of the package.

    Relative imports are resolved; `from m import x` yields m and m.x (x may be a module).
    Guarded: inside a function, in the body of a `try` that catches ImportError, or under
    `if TYPE_CHECKING:` (never run).
    """
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]

    def walk(node: ast.AST, guarded: bool) -> Iterator[tuple[str, int, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, guarded
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module, node.lineno, guarded
            for alias in node.names:
                yield f"{module}.{alias.name}", node.lineno, guarded
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                yield from walk(child, True)
            for child in node.orelse:
                yield from walk(child, guarded)
            return
        if isinstance(node, ast.Try) and catches_import_error(node):
            for child in node.body:
                yield from walk(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                yield from walk(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, guarded)

    yield from walk(ast.parse(path.read_text(), filename=str(path)), False)


def in_extra_only(module: str) -> str | None:
    """The extra-only module (or package) that `module` is, or lies in; else None."""
    return next((m for m in EXTRA_ONLY if module == m or module.startswith(m + ".")), None)


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_third_party_import_is_a_declared_dependency():
    declared = declared_dependencies()
    problems, optional_seen = set(), set()
    for path in package_files():
        here = module_name(path)
        where = path.relative_to(ROOT)
        for module, line, guarded in imports(path):
            top = module.split(".")[0]
            if top == "lightlong":
                # an extra-only module is imported only from itself or where it is guarded
                target = in_extra_only(module)
                if target and not guarded and in_extra_only(here) != target:
                    problems.add(f"{where}:{line}: imports {module} ({EXTRA_ONLY[target]} "
                                 f"only) at module level")  # fmt: skip
                continue
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if normalise(DISTRIBUTION.get(top, top)) in declared:
                continue
            if top in OPTIONAL:
                optional_seen.add(top)
                extra_module = in_extra_only(here)
                if not guarded and (extra_module is None or top not in EXTRA_ONLY[extra_module]):
                    problems.add(f"{where}:{line}: optional {top} imported unguarded at "
                                 f"module level")  # fmt: skip
                continue
            problems.add(
                f"{where}:{line}: imports {top}, which is neither in [project] dependencies "
                f"(as {DISTRIBUTION.get(top, top)}) nor in OPTIONAL"
            )
    assert not problems, "\n".join(sorted(problems))
    # the allow-list stays honest: every entry is still imported somewhere
    assert optional_seen == set(OPTIONAL), (
        f"stale OPTIONAL entries: {set(OPTIONAL) - optional_seen}"
    )


def test_import_scan_sees_what_it_must_flag(tmp_path):
    """The scanner on a made-up file: module-level, function, try and TYPE_CHECKING imports."""
    source = tmp_path / "lightlong" / "pkg" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import numpy as np\n"
        "from .sub import thing\n"
        "from .. import other\n"
        "try:\n    import yaml\nexcept ImportError:\n    yaml = None\n"
        "if TYPE_CHECKING:\n    import transformers\n"
        "def f():\n    import triton\n"
    )
    assert list(imports(source, root=tmp_path)) == [
        ("numpy", 1, False),
        ("lightlong.pkg.sub", 2, False),
        ("lightlong.pkg.sub.thing", 2, False),
        ("lightlong", 3, False),
        ("lightlong.other", 3, False),
        ("yaml", 5, True),
        ("transformers", 9, True),
        ("triton", 11, True),
    ]


def test_optional_extras_are_declared_as_extras():
    extras = {
        normalise(re.match(r"[A-Za-z0-9._-]+", spec).group())
        for specs in pyproject()["project"]["optional-dependencies"].values()
        for spec in specs
    }
    for module in ("transformers", "triton", "lm_eval"):
        assert normalise(module) in extras, f"{module} is in OPTIONAL but in no extra"


# ------------------------------------------------------------------ wheel in a fresh venv


def makefile_torch_spec() -> list[str]:
    """TORCH_SPEC from the Makefile: the torch requirement and any pip flags after it."""
    match = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH_SPEC"
    return shlex.split(match.group(1))


def index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
    except OSError:
        return False
    return True


def run(cmd: list, cwd: Path, timeout: int, what: str) -> subprocess.CompletedProcess:
    """Runs cmd outside this checkout's Python path; fails (or, for pip when the package
    index is unreachable, skips) with the output's tail."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what}: no result after {timeout} s; output tail:\n{str(e.stderr)[-3000:]}")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        if "pip" in map(str, cmd) and not index_reachable():
            pytest.skip(f"{what} failed and the package index (pypi.org) is unreachable:\n{tail}")
        pytest.fail(f"{what}: exit {proc.returncode}; output tail:\n{tail}")
    return proc


def copy_source(dest: Path) -> Path:
    """What the wheel is built from (the build writes build/ and *.egg-info beside it)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(PACKAGE, dest / "lightlong", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wheel_installs_without_extras_and_generates(tmp_path):
    spec = makefile_torch_spec()
    pin = re.fullmatch(r"torch==([\w.]+)", spec[0])
    assert pin, f"TORCH_SPEC should pin torch exactly, got {spec[0]!r}"
    public = torch.__version__.split("+")[0]
    if pin.group(1) != public:
        pytest.skip(f"this venv's torch {torch.__version__} is not the Makefile's {spec[0]}")
    # the exact build this venv runs (2.13.0+cpu): neither a newer torch nor CUDA wheels
    torch_req = [f"torch=={torch.__version__}", *spec[1:]]

    src = copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, src], tmp_path, 900,
        "pip wheel")  # fmt: skip
    (wheel,) = wheels.glob("lightlong-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, 300, "python -m venv")
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", *torch_req], tmp_path, 1800, "pip install torch")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    run([py, "-m", "pip", "install", "-c", constraints, wheel], tmp_path, 1200,
        "pip install the wheel")  # fmt: skip

    listed = run([py, "-m", "pip", "list", "--format=json"], tmp_path, 120, "pip list")
    installed = {normalise(d["name"]): d["version"] for d in json.loads(listed.stdout)}
    assert installed["torch"] == torch.__version__
    extras = {"transformers", "triton", "lm-eval", "pytest"}
    assert not extras & installed.keys(), f"extras installed: {extras & installed.keys()}"
    assert not [n for n in installed if n.startswith("nvidia")], "CUDA packages were installed"

    model = tmp_path / "model"
    saved = run([py, "-c", "import sys, lightlong; from lightlong import HybridConfig, HybridLM; "
                 "HybridLM(HybridConfig.from_preset('tiny')).save_pretrained(sys.argv[1]); "
                 "print(lightlong.__file__)", model], tmp_path, 300, "save_pretrained")  # fmt: skip
    assert Path(saved.stdout.strip()).is_relative_to(venv), "imported lightlong from elsewhere"
    out = run([venv / "bin" / "lightlong", "generate", "--model", model, "--prompt", "hi",
               "--max-new-tokens", "4"], tmp_path, 300, "lightlong generate")  # fmt: skip
    assert "Traceback" not in out.stderr
