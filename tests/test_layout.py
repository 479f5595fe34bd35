"""The package's layout holds: packages import downward only, Keras internals stay in `_compat`."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dg2pf_tf"

# Bottom to top. A module may import its own layer and those below it, never one above.
LAYERS = (
    ("_compat", "checks", "settings", "counting", "atomic"),
    ("model",),
    ("criteria",),
    ("channels",),
    ("core",),
    ("procedure",),
    ("deploy",),
    ("__init__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}

# Names that only Keras' internals carry: read through `_compat`, which says why for each.
INTERNALS = ("keras.src", "_keras_history", "_flatten_layers", "_nodes_by_depth", "_inbound_nodes",
             ".extended._", "_compat.sublayers")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _top(path):
    """The layer name of a module: its package inside dg2pf_tf, or its own name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported(path):
    """(line, top-level dg2pf_tf name) of every import of the package in `path`, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dg2pf_tf"):
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write it absolute")
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[1]) for alias in node.names
                      if alias.name.startswith("dg2pf_tf.")]
    return found


def test_every_module_belongs_to_a_layer():
    unknown = {_top(path) for path in _modules()} - set(RANK)
    assert not unknown, f"add {sorted(unknown)} to LAYERS in {__file__}"


def test_packages_import_only_their_own_layer_and_those_below():
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports dg2pf_tf.{name}"
              for path in _modules() for line, name in _imported(path)
              if RANK[name] > RANK[_top(path)]]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_keras_internals_are_read_only_in_compat():
    uses = []
    for path in _modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            allowed = {"_compat.py": INTERNALS, "walk.py": ("_compat.sublayers",)}.get(path.name, ())
            uses += [f"{path.relative_to(PACKAGE.parent)}:{number}: {name}"
                     for name in INTERNALS if name in code and name not in allowed]
    assert not uses, "Keras internals outside _compat (add an accessor there):\n" + "\n".join(uses)


@pytest.mark.parametrize("upward", ["from dg2pf_tf.procedure import run", "import dg2pf_tf.deploy.export"])
def test_the_layer_check_sees_an_upward_import(upward, tmp_path):
    module = tmp_path / "dg2pf_tf" / "model" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text(upward + "\n")
    names = [name for _, name in _imported(module)]
    assert any(RANK[name] > RANK["model"] for name in names)
