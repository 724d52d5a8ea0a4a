"""The dependency rule of docs/architecture.md, checked on every module's imports (top-level and function-local):

    entry points → engine/, Dataset/ → Models/ → Utils/

Utils/ imports nothing of the project above it; Models/ never imports engine/, Dataset/ or an entry point;
Dataset/ never imports engine/; nothing below the entry points imports an entry point (a top-level script)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("Utils", "Models", "Dataset", "engine")
# what each package may import of the project (besides itself)
ALLOWED = {
    "Utils": set(),
    "Models": {"Utils"},
    "Dataset": {"Models", "Utils"},
    "engine": {"Dataset", "Models", "Utils"},
}


def _entry_points():
    return {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def _modules():
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield pkg, os.path.join(dirpath, f)


def _imported_roots(path):
    """(line, top-level name) of every absolute import in the file, function-local ones included."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_every_package_module_imports_only_downwards():
    entry = _entry_points()
    assert {"Math", "inference", "engine_finetune"} <= entry                 # the scan sees the entry points
    bad = []
    n = 0
    for pkg, path in _modules():
        n += 1
        for line, root in _imported_roots(path):
            rel = os.path.relpath(path, ROOT)
            if root in PACKAGES and root != pkg and root not in ALLOWED[pkg]:
                bad.append("%s:%d imports %s" % (rel, line, root))
            elif root in entry:
                bad.append("%s:%d imports the entry point %s" % (rel, line, root))
    assert n > 50                                                              # the walk found the packages
    assert not bad, "imports against docs/architecture.md's dependency rule:\n" + "\n".join(bad)


def test_benchmarks_do_not_import_entry_points():
    """bench/ drives the engine and the models, never a training script (Math.py once carried its optimizer)."""
    entry = _entry_points()
    bad = []
    for f in sorted(os.listdir(os.path.join(ROOT, "bench"))):
        if f.endswith(".py"):
            path = os.path.join(ROOT, "bench", f)
            bad += ["bench/%s:%d imports %s" % (f, line, root) for line, root in _imported_roots(path) if root in entry]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The scanner itself: an upward import inside a function is found."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from Models.llama import Transformer\n    import Math\n")
    assert list(_imported_roots(str(p))) == [(2, "Models"), (3, "Math")]
