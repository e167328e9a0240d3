"""Every third-party module the package imports is installed by `pip install -e .` (pyproject's dependencies, no
extras): a module only the test extra brought once crashed the first Quickstart command for every new user."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "proposals", "detector", "pipelines")


def _imported_top_levels() -> dict[str, str]:
    found: dict[str, str] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_runtime_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in deps}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for mod, where in sorted(_imported_top_levels().items()):
        if mod in sys.stdlib_module_names or mod in PACKAGES or mod == "__future__":
            continue
        dists = providers.get(mod)
        assert dists, f"{where}: imports '{mod}', which no installed distribution provides"
        if not any(_norm(d) in declared for d in dists):
            missing.append(f"{where}: '{mod}' (from {', '.join(dists)})")
    assert not missing, "imported by the package but not in pyproject's dependencies: " + "; ".join(missing)


def test_the_scan_sees_the_known_imports():
    mods = _imported_top_levels()
    assert {"torch", "torchvision", "cv2", "pycocotools", "numpy", "yaml", "skimage"} <= set(mods)
