"""Layers point down: the models and pipelines depend on diffusers, torch and segdiff's small leaf modules only,
never on the command line, output writers, training plumbing or accelerate code of the layers above them.

Checked twice: by what a fresh interpreter has loaded after importing every pipeline (so an indirect import counts
too), and by the import statements of the lower layers' source (so a lazy import inside a function counts too).
"""

import ast
import json
import subprocess
import sys

from conftest import ROOT, SCRIPT_ENV

# The leaf modules a model or pipeline may use: each imports nothing of segdiff but other leaves.
LEAVES = {"segdiff.geometry", "segdiff.labels", "segdiff.prompts", "segdiff.schedulers", "segdiff.seeds"}
LOWER_LAYERS = ("segdiff/models", "segdiff/pipelines")
# What a lower layer must never import: command lines, writers, training and process plumbing, file layouts.
FORBIDDEN = ("accelerate", "argparse", "segdiff.training", "segdiff.generation", "segdiff.processes", "segdiff.data",
             "segdiff.files", "segdiff.runs", "segdiff.rendering", "segdiff.evaluation")  # fmt: skip


def imported_modules(path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


def forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def test_models_pipelines_and_leaves_import_nothing_from_the_layers_above():
    files = [path for layer in LOWER_LAYERS for path in (ROOT / layer).glob("*.py")]
    files += [ROOT / (leaf.replace(".", "/") + ".py") for leaf in LEAVES]
    assert len(files) > 8
    offending = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if forbidden(m)) for path in files
    }
    assert {path: modules for path, modules in offending.items() if modules} == {}
    for leaf in LEAVES:  # a leaf imports only other leaves of segdiff
        path = ROOT / (leaf.replace(".", "/") + ".py")
        inner = {m for m in imported_modules(path) if m.startswith("segdiff")}
        assert inner <= LEAVES, (leaf, inner - LEAVES)


def test_importing_every_pipeline_loads_only_models_pipelines_and_leaves():
    code = (
        "import json, sys\n"
        "import segdiff.pipelines.joint, segdiff.pipelines.layout, segdiff.pipelines.sdm\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('segdiff'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    allowed = LEAVES | {"segdiff", "segdiff.models", "segdiff.pipelines"}
    beyond = {m for m in loaded if m not in allowed and not m.startswith(("segdiff.models.", "segdiff.pipelines."))}
    assert beyond == set()
    assert {"segdiff.pipelines.sdm", "segdiff.schedulers"} <= loaded  # it did look at what it meant to
