"""The package's shape: module imports form no cycle, counting the ones hidden inside functions
(a lazy import keeps Python from failing, not a reader from going round in circles), the layers'
boundaries hold (the code that runs in the sandbox reaches only the contract, util, program.blocks,
data.tokens and itself; only search/ imports search/; reporting/ reaches nothing of evaluation/),
only plasa_lab.settings reads the PLASA_* environment, and every module and function fits a reader's
attention (a module of the package in 600 lines, a function in 80, unless it says why)."""

import ast
import re

from plasa_lab import PROJECT_ROOT

PACKAGE = "plasa_lab"


def package_modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in sorted((PROJECT_ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def imports_of(name: str, tree: ast.Module, known: set[str], is_package: bool) -> set[str]:
    """The package modules that `name` imports anywhere in its code, functions included."""
    here = name if is_package else name.rpartition(".")[0]  # what `from .` means in this module
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):  # `from ..x`: one package up per extra dot
                base = base.rpartition(".")[0]
            source = ".".join(filter(None, [base, node.module])) if node.level else node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            found |= {f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    packages = {n for n in modules if (PROJECT_ROOT / n.replace(".", "/") / "__init__.py").exists()}
    return {name: imports_of(name, tree, set(modules), name in packages) for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (a depth-first search that remembers its path)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    # `from .judge import run_local` inside _remote_stage
    assert "plasa_lab.evaluation.judge" in graph["plasa_lab.evaluation.ray_runner"]
    assert "plasa_lab.rundir" in graph["plasa_lab.reporting"]  # `from .. import rundir`


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------------------------------------
# the layers' boundaries

SANDBOXED = "plasa_lab.evaluation.sandboxed"  # runs inside the sandbox, beside or in place of a child's code
SANDBOXED_MAY_IMPORT = {"plasa_lab.contract", "plasa_lab.util", "plasa_lab.program.blocks", "plasa_lab.data.tokens"}
SEARCH = "plasa_lab.search"
REPORTING = "plasa_lab.reporting"
EVALUATION = "plasa_lab.evaluation"


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def parents(module: str) -> set[str]:
    """The packages Python imports before `module` (their __init__ runs too)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def reached_from(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """Every module that importing `starts` runs: their imports, transitively, and the packages on the way."""
    reached, todo = set(), list(starts)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += sorted(graph.get(module, set()) | parents(module))
    return reached


def sandbox_leaks(graph: dict[str, set[str]]) -> set[str]:
    """Arrows by which code that runs in the sandbox reaches more than itself and what it may import."""
    sandboxed = {m for m in graph if inside(m, SANDBOXED)}
    may = sandboxed | SANDBOXED_MAY_IMPORT
    allowed = may | set().union(*map(parents, may))  # a package on the way: its __init__ is checked too
    return {f"{m} -> {t}" for m in reached_from(graph, sandboxed) for t in graph.get(m, set()) if t not in allowed}


def test_the_boundary_checks_find_a_crossing():
    worker, trunk = f"{SANDBOXED}.worker", f"{SANDBOXED}.trunk"
    graph = {worker: {"plasa_lab.contract", trunk}, trunk: {"plasa_lab.settings"}, "plasa_lab.contract": set()}
    assert sandbox_leaks(graph) == {f"{trunk} -> plasa_lab.settings"}
    graph[trunk] = {"plasa_lab.data.tokens"}
    graph["plasa_lab.data.tokens"] = {"plasa_lab.data.corpora"}  # an allowed module may not open the door
    assert sandbox_leaks(graph) == {"plasa_lab.data.tokens -> plasa_lab.data.corpora"}
    assert reached_from({"a.b": {"c"}, "c": {"d"}}, {"a.b"}) == {"a", "a.b", "c", "d"}


def test_code_in_the_sandbox_reaches_only_the_contract_util_blocks_tokens_and_itself():
    graph = import_graph()
    assert {f"{SANDBOXED}.worker", f"{SANDBOXED}.trunk", f"{SANDBOXED}.validation"} <= set(graph)
    assert sandbox_leaks(graph) == set()


def test_nothing_outside_search_imports_search():
    graph = import_graph()
    assert any(inside(m, SEARCH) for m in graph)
    crossings = {f"{m} -> {t}" for m, ts in graph.items() for t in ts if inside(t, SEARCH) and not inside(m, SEARCH)}
    assert crossings == set()


def test_reporting_reaches_no_module_of_evaluation():
    graph = import_graph()
    reporting = {m for m in graph if inside(m, REPORTING)}
    assert f"{REPORTING}.notebook" in reporting
    assert {m for m in reached_from(graph, reporting) if inside(m, EVALUATION)} == set()


def environment_reads(tree: ast.Module) -> list[str]:
    """The PLASA_* names a module reads with os.environ.get, os.getenv or os.environ[...]."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        else:
            continue
        if isinstance(key, ast.Constant) and str(key.value).startswith("PLASA_"):
            names.append(key.value)
    return names


def test_only_settings_reads_plasa_variables():
    assert environment_reads(ast.parse('os.environ.get("PLASA_LEDGER"); os.environ["PLASA_X"]')) == [
        "PLASA_LEDGER",
        "PLASA_X",
    ]
    readers = {name: found for name, tree in package_modules().items() if (found := environment_reads(tree))}
    assert set(readers) <= {"plasa_lab.settings"}, readers


# ---------------------------------------------------------------------------------------------
# sizes a reader can hold

MODULE_LINES = 600  # a module of the package
FUNCTION_LINES = 80  # a function or method anywhere in the package or the scripts, decorators and docstring included
REASON = "# long:"  # on the def line or the line above it: why this function is better whole


def long_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, line, length) of each function over FUNCTION_LINES that does not say why."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = node.end_lineno - first + 1
        above = lines[first - 2] if first >= 2 else ""
        if length > FUNCTION_LINES and REASON not in lines[node.lineno - 1] and not above.strip().startswith(REASON):
            found.append((node.name, node.lineno, length))
    return found


def checked_files() -> list:
    return sorted((PROJECT_ROOT / PACKAGE).rglob("*.py")) + sorted((PROJECT_ROOT / "scripts").glob("*.py"))


def test_the_length_check_finds_a_long_function_unless_it_says_why():
    body = lambda lines, indent="    ": "".join(f"{indent}x = {i}\n" for i in range(lines))
    assert long_functions(f"def f():\n{body(FUNCTION_LINES - 1)}") == []
    assert long_functions(f"def f():\n{body(FUNCTION_LINES)}") == [("f", 1, FUNCTION_LINES + 1)]
    assert long_functions(f"class A:\n    def f(self):\n{body(FUNCTION_LINES, ' ' * 8)}") == [("f", 2, 81)]
    assert long_functions(f"def f():  # long: one table, row by row\n{body(FUNCTION_LINES)}") == []
    assert long_functions(f"# long: one table, row by row\n@staticmethod\ndef f():\n{body(FUNCTION_LINES)}") == []


def test_no_module_of_the_package_is_over_600_lines():
    sizes = {str(p.relative_to(PROJECT_ROOT)): len(p.read_text().splitlines()) for p in checked_files()}
    assert {p: n for p, n in sizes.items() if p.startswith(PACKAGE) and n > MODULE_LINES} == {}


def test_no_function_is_over_80_lines_unless_it_says_why():
    found = {
        f"{path.relative_to(PROJECT_ROOT)}:{line} {name}": length
        for path in checked_files()
        for name, line, length in long_functions(path.read_text())
    }
    assert found == {}, f"split these, or say on the def line why not ({REASON} ...)"


# ---------------------------------------------------------------------------------------------
# the code map (docs/code.md) is the tree

CODE_MAP = "## The code map"


def code_map(page: str) -> tuple[list[str], list[str]]:
    """(folders, paths) the code map on a page names: each table's header names the folder its rows
    are in (`plasa_lab/search/`; a header without one, `path`, the project's root), and the first
    column of each row names paths in it."""
    section = page.split(f"\n{CODE_MAP}\n", 1)[1].split("\n## ", 1)[0]
    folders, paths, folder, previous = [], [], "", ""
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            names = re.findall(r"`([^`]+)`", line.split("|")[1])
            if not previous.startswith("|"):  # a table's header
                folder = names[0] if names else ""
                folders += names
            else:
                paths += [folder + name for name in names]
        previous = line
    return folders, paths


def test_the_code_map_reader_reads_folders_and_paths():
    page = (
        f"# x\n{CODE_MAP}\n\ntext `not/a/row.py`\n\n| path | what |\n| --- | --- |\n| `a.py`, `b/` | ab |\n\n"
        "| `pkg/sub/` | sub |\n| --- | --- |\n| `c.py`, `d.py` | `e.py` is a description |\n\n## Next\n| `f.py` | f |\n"
    )
    assert code_map(page) == (["pkg/sub/"], ["a.py", "b/", "pkg/sub/c.py", "pkg/sub/d.py"])


def test_the_code_map_in_docs_names_every_module_of_the_package_and_only_what_exists():
    folders, named = code_map((PROJECT_ROOT / "docs" / "code.md").read_text())
    package = PROJECT_ROOT / PACKAGE
    modules = {str(p.relative_to(PROJECT_ROOT)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    packages = {str(p.parent.relative_to(PROJECT_ROOT)) + "/" for p in package.rglob("__init__.py")}
    assert [p for p in folders + named if not (PROJECT_ROOT / p).exists()] == [], "named, not there"
    assert sorted(modules - set(named)) == [], "modules the code map (docs/code.md) does not name"
    assert sorted(packages - set(folders)) == [], "packages without a table of their own in the code map"
    assert len(named) == len(set(named)), "a path named twice"
