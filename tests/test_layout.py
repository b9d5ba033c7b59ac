"""The package's layout, computed from the source by tools/layout.py: no import circles among
edtool's modules (function-level imports included), at most one import back up a layer, and no module
taking another's underscore names. Module sizes are only reported (`python tools/layout.py`)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("layout", REPO / "tools" / "layout.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)


@pytest.fixture(scope="module")
def edtool_modules():
    return layout.scan(REPO / "edtool")


def test_the_scan_sees_the_package(edtool_modules):
    """The scan finds edtool's modules and their imports (so the assertions below are about something)."""
    assert {"edtool.cli", "edtool.store.run", "edtool.jacobian.ed", "edtool.study.compute"} <= set(edtool_modules)
    graph = layout.edges(edtool_modules)
    assert "edtool.store.runstore" in graph["edtool.store.run"]
    assert "edtool.errors" in graph["edtool.store.layout"]


def test_no_import_circles(edtool_modules):
    found = layout.circles(layout.edges(edtool_modules, module_level_only=True))
    assert found == [], f"module-level import circles: {found} (python tools/layout.py shows the graph)"
    found = layout.circles(layout.edges(edtool_modules, module_level_only=False))
    assert found == [], f"import circles through function-level imports: {found}"


def test_no_module_level_import_runs_back_up_a_layer(edtool_modules):
    """Layers (tools/layout.py LAYERS): utilities < jacobian, els, networks, store < study < cli. A module
    never imports a higher layer when it is loaded, and at most one function-level import does."""
    found = [f"{i.source}:{i.line} -> {i.target}" for i in layout.upward(edtool_modules, "edtool") if i.module_level]
    assert found == [], f"module-level imports that run back up a layer: {found}"
    found = [f"{i.source}:{i.line} -> {i.target}" for i in layout.upward(edtool_modules, "edtool")]
    assert len(found) <= 1, f"at most one import may run back up a layer, found: {found}"


def test_no_module_takes_another_modules_underscore_names(edtool_modules):
    found = layout.private_uses(edtool_modules)
    assert found == [], f"underscore names used across modules (give them a public home): {found}"


def _package(root: Path, files: dict) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checks_find_a_circle_an_upward_import_and_a_private_name(tmp_path):
    """The detector itself, on a small package with one of each fault: a module-level circle through a
    subpackage (relative and absolute imports), a function-level import that does not make one, an
    upward import from a lower layer, and underscore names taken by import and by attribute."""
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "errors.py": "from pkg.store import run\n",  # utilities -> parts: upward, and closes the circle
        "cli.py": "from pkg.study import compute\n",
        "store/__init__.py": "",
        "store/run.py": "from .layout import _check, new\nimport pkg.errors as errors\nx = errors._hidden\n",
        "store/layout.py": "import pkg.errors\n\ndef new():\n    from pkg import cli\n\ndef _check():\n    pass\n",
        "study/__init__.py": "",
        "study/compute.py": "from pkg.store.run import new\nfrom pkg.store import layout\nlayout.__doc__\n",
    })
    modules = layout.scan(pkg)
    assert layout.circles(layout.edges(modules)) == [["pkg.errors", "pkg.store.layout", "pkg.store.run"]]
    assert layout.circles(layout.edges(modules, module_level_only=False)) == [
        ["pkg.cli", "pkg.errors", "pkg.store.layout", "pkg.store.run", "pkg.study.compute"]]
    ups = {(i.source, i.target, i.module_level) for i in layout.upward(modules, "pkg")}
    assert ups == {("pkg.errors", "pkg.store.run", True), ("pkg.store.layout", "pkg.cli", False)}
    assert sorted(what for _, _, what in layout.private_uses(modules)) == ["pkg.errors._hidden",
                                                                          "pkg.store.layout._check"]
    text = layout.report(pkg)
    assert "import circles, module-level imports: 1" in text and "1 module-level, 1 function-level" in text


def test_the_report_runs_on_edtool():
    text = layout.report(REPO / "edtool")
    assert "store/" in text and "run.py" in text and "lines; over 500:" in text
