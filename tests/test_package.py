import os
import subprocess
import sys
from pathlib import Path

import pytest

import geko_core
from geko_core import GekoConfig
from geko_core._backend import resolve_backend

ROOT = Path(__file__).resolve().parents[1]


def test_import_from_elsewhere(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import geko_core, geko_core.kernels; print(geko_core.__version__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == geko_core.__version__


def test_info_reports_backends_and_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "geko_core.info"], cwd=tmp_path, capture_output=True, text=True, check=True)
    for needle in ("geko_core: ", "torch: ", "backends:", "cpp:", "omp_max_threads", "avx2"):
        assert needle in out.stdout


def test_config_defaults_come_from_cpp():
    cfg = GekoConfig()
    cpp = geko_core.config._C.Config()
    assert cfg.freeze_confidence == cpp.freeze_confidence == 0.85
    assert cfg.hard_confidence == 0.60 and cfg.freeze_q == 0.80 and cfg.q_alpha == 0.1 and cfg.q_init == 0.5
    assert GekoConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hard_confidence": 0.9}, "hard_confidence"),
        ({"freeze_confidence": 1.5}, "freeze_confidence"),
        ({"q_alpha": 0.0}, "q_alpha"),
        ({"loss_scale": float("nan")}, "loss_scale"),
        ({"noise_guard_visits": -1}, "noise_guard_visits"),
        ({"loss_ema_beta": 1.0}, "loss_ema_beta"),
    ],
)
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GekoConfig(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match="noise_guard_visits"):
        GekoConfig(noise_guard_visits=2.5)
    with pytest.raises(TypeError, match="freeze_q"):
        GekoConfig(freeze_q="high")
    with pytest.raises(ValueError, match="unknown"):
        GekoConfig.from_dict({"bogus": 1})


def test_backend_resolution():
    assert resolve_backend("cpu", None) == "cpp"
    assert resolve_backend("cpu", "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("cpu", "fast")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="CUDA"):
            resolve_backend("cpu", "triton")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line.split("=", 1)[1].strip().strip("'\"") for line in ci.splitlines() if line.startswith("TEST_COMMAND="))
    assert command in readme


def test_stub_mirrors_the_bindings():
    import ast

    stub = (Path(geko_core.__file__).parent / "_C.pyi").read_text()
    tree = ast.parse(stub)
    stub_all = next(
        ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "__all__"
    )
    compiled = geko_core.config._C
    public = sorted(name for name in dir(compiled) if not name.startswith("_"))
    assert sorted(stub_all) == public


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package (``kernels/`` as ``geko_core.kernels``) and the package
    modules it imports, at any level (lazy imports inside functions included)."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "geko_core").rglob("*.py")}
    files.update({"geko_core." + ".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "kernels").rglob("*.py")})
    files = {name.removesuffix(".__init__"): path for name, path in files.items()}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                edges.add(target)
                edges.update(f"{target}.{alias.name}" for alias in node.names)
        graph[name] = {edge for edge in edges if edge in files and edge != name}
    return graph


def test_no_import_cycle_in_the_package():
    # The package root aggregates the public API and is left out; so is geko_core.bench, the
    # research tooling that is leaving the installed package.
    graph = {name: edges - {"geko_core"} for name, edges in _import_graph().items() if not name.startswith("geko_core.bench")}
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for edge in sorted(graph.get(name, ())):
            if state.get(edge) == 1:
                cycles.append(path + [name, edge])
            elif edge in graph and not state.get(edge):
                visit(edge, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name != "geko_core" and not state.get(name):
            visit(name, [])
    assert not cycles, cycles


def test_kernels_import_only_triton_torch_and_the_standard_library():
    import ast

    allowed = {"triton", "torch", *sys.stdlib_module_names}
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue  # relative imports stay inside kernels/
            assert set(roots) <= allowed, (path.name, roots)


def test_import_geko_core_registers_the_operators(tmp_path):
    code = (
        "import torch, geko_core\n"
        "names = ['stats_forward', 'cross_entropy_backward', 'linear_token_forward', 'linear_token_backward']\n"
        "print(' '.join(name for name in names if hasattr(torch.ops.geko, name)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["stats_forward", "cross_entropy_backward", "linear_token_forward", "linear_token_backward"]
