"""ARCHITECTURE.md's rule, checked on every import (at module level or inside a function):
imports go down the layers only, no step imports another step, nothing imports the entry
points (cli, pipeline)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cai_ray"
# lowest first; a module may import its own layer and the ones below it
LAYERS = {
    "config": ("cai_ray", "cai_ray.config", "cai_ray.runtime"),
    "core": ("cai_ray.core", "cai_ray.plots"),
    "engine": ("cai_ray.engine", "cai_ray.models"),
    "batch": ("cai_ray.batch",),
    "steps": (
        "cai_ray.generate",
        "cai_ray.label",
        "cai_ray.train",
        "cai_ray.eval",
        "cai_ray.serve",
        "cai_ray.collective",
    ),
    "entry": ("cai_ray.pipeline", "cai_ray.classifiers", "cai_ray.cli"),
}
ORDER = list(LAYERS)


def _prefix(module: str) -> tuple[str, str]:
    """(layer, package) of a module: the longest matching prefix."""
    best = ("", "")
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best[1]):
                best = (layer, p)
    return best


def _imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("cai_ray"):
                    yield module, name


def violations(imports=None) -> list[str]:
    bad = []
    for module, name in imports if imports is not None else _imports():
        (mine, my_pkg), (theirs, their_pkg) = _prefix(module), _prefix(name)
        if ORDER.index(theirs) > ORDER.index(mine):
            bad.append(f"{module} ({mine}) imports {name} ({theirs}): upwards")
        elif mine == theirs == "steps" and my_pkg != their_pkg:
            bad.append(f"{module} imports {name}: one step imports another")
        elif theirs == "entry" and my_pkg != their_pkg and module != "cai_ray.cli":
            bad.append(f"{module} imports the entry point {name}")
    return bad


def test_imports_go_down_the_layers_and_no_step_imports_another():
    assert not violations(), "\n".join(violations())


def test_every_module_is_in_a_layer():
    for module, _ in _imports():
        assert _prefix(module)[0], f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"


def test_the_check_catches_a_step_reaching_into_another_and_an_upward_import():
    """The rule can fail: probe imports are reported."""
    probe = [("cai_ray.label.run", "cai_ray.generate.run"), ("cai_ray.core.labeler", "cai_ray.batch.stage")]
    found = violations(probe)
    assert len(found) == 2 and "one step imports another" in found[0] and "upwards" in found[1]
