"""ARCHITECTURE.md's rule, checked: no step imports another step, and nothing imports the
entry points (cli, pipeline) — at module level or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cai_ray"
STEPS = {
    "generate": ("cai_ray.generate",),
    "label": ("cai_ray.label", "cai_ray.pairs"),
    "train": ("cai_ray.train",),
    "eval": ("cai_ray.evaluate", "cai_ray.eval_stages", "cai_ray.report"),
    "serve": ("cai_ray.serve",),
}
ENTRY = ("cai_ray.cli", "cai_ray.pipeline")
# deprecated aliases, kept for one release (each says so when used)
ALLOWED = {("cai_ray.config", "cai_ray.pipeline"), ("cai_ray.sl", "cai_ray.generate")}


def _step(module: str) -> str | None:
    for step, prefixes in STEPS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return step
    return None


def _imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("cai_ray"):
                    yield module, name


def test_no_step_imports_another_step_and_nothing_imports_the_entry_points():
    bad = []
    for module, name in _imports():
        if (module, name) in ALLOWED or any((module, name.rsplit(".", 1)[0]) == a for a in ALLOWED):
            continue
        mine, theirs = _step(module), _step(name)
        if mine and theirs and mine != theirs:
            bad.append(f"{module} imports {name} (step {mine} -> step {theirs})")
        if any(name == e or name.startswith(e + ".") for e in ENTRY) and module not in ENTRY:
            bad.append(f"{module} imports the entry point {name}")
    assert not bad, "\n".join(bad)
