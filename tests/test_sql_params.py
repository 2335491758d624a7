"""All SQL is parameterised: no value ever enters SQL text, only `?` placeholders.

Two checks over the sources of `gateway/` and `sensors/`: ruff's S608 (SQL built
from strings), and an AST walk that follows the SQL text of every `execute`,
`executemany` and `executescript` call back to where it is built. The text may
be literal, a module constant (UPPER_CASE), an `int(...)`, or made of those
(f-strings, `+`, `" AND ".join(...)`, locals and loop variables over constants);
anything else, `.format()` and `%` included, is reported with file and line. A
function's parameter is followed to the function's callers in the same module.

An identifier cannot be a bound parameter: SQL that splices one (a table name read
from the database's own schema) is a reviewed exception, marked `# noqa: S608` on
its line as for ruff, or listed in KNOWN below with the reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["gateway", "sensors"]
EXECUTE = {"execute", "executemany", "executescript"}
KNOWN = {
    # TODO(security): `SELECT name FROM pragma_table_info(?)` binds the name.
    ("gateway/patients.py", "f'PRAGMA table_info(\"{table}\")'"): "schema name",
}


def test_ruff_finds_no_sql_built_from_strings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "S608", *SOURCES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout


class SqlText(ast.NodeVisitor):
    """Finds execute calls whose SQL text is not made of constants."""

    def __init__(self, path: Path, tree: ast.Module, root: Path) -> None:
        self.path = path
        self.root = root
        self.lines = path.read_text(encoding="utf-8").splitlines()
        self.calls = _calls(tree)
        self.found: list[str] = []
        self.bindings: list[dict[str, list[ast.expr]]] = [{}]

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        bound = _bindings(node)
        for i, arg in enumerate(node.args.args):
            bound.setdefault(arg.arg, []).extend(self._arguments(node.name, i, arg))
        self.bindings.append(bound)
        self.generic_visit(node)
        self.bindings.pop()

    def _arguments(self, func: str, i: int, arg: ast.arg) -> list[ast.expr]:
        """What the module's calls of `func` pass as its parameter `arg`."""
        passed: list[ast.expr] = []
        for call in self.calls.get(func, []):
            given = [k.value for k in call.keywords if k.arg == arg.arg]
            given += call.args[i : i + 1]
            passed += given or [ast.Name(id=f"<{arg.arg}: not passed>")]
        return passed or [ast.Name(id=f"<{arg.arg}: no caller>")]

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        executes = isinstance(func, ast.Attribute) and func.attr in EXECUTE
        if executes and node.args and not self.constant(node.args[0], depth=0):
            self._report(node.args[0])
        self.generic_visit(node)

    def _report(self, sql: ast.expr) -> None:
        name = self.path.relative_to(self.root).as_posix()
        lines = self.lines[sql.lineno - 1 : (sql.end_lineno or sql.lineno)]
        text = ast.unparse(sql)
        if any("noqa: S608" in line for line in lines) or (name, text) in KNOWN:
            return
        self.found.append(f"{name}:{sql.lineno}: {text}")

    def constant(self, node: ast.expr, depth: int) -> bool:
        if depth > 8:
            return False
        inner = lambda n: self.constant(n, depth + 1)  # noqa: E731
        match node:
            case ast.Constant(value=str() | int()):
                return True
            case ast.Name(id=name) if name.lstrip("_").isupper():
                return True
            case ast.Name(id=name) if name in self.bindings[-1]:
                return all(inner(v) for v in self.bindings[-1][name])
            case ast.JoinedStr(values=values):
                return all(inner(v) for v in values)
            case ast.FormattedValue(value=value):
                return inner(value)
            case ast.Call(func=ast.Name(id="int")):
                return True
            case ast.Call(func=ast.Attribute(value=ast.Constant(), attr="join")):
                return all(inner(a) for a in node.args)
            case ast.BinOp(op=ast.Add(), left=left, right=right):
                return inner(left) and inner(right)
            case ast.BoolOp(values=values) | ast.Tuple(elts=values):
                return all(inner(v) for v in values)
            case ast.GeneratorExp(elt=elt):
                return inner(elt)
            case ast.Subscript(value=value):
                return inner(value)  # an entry of a constant table
        return False


def _calls(tree: ast.Module) -> dict[str, list[ast.Call]]:
    """The module's calls of plain function names, by name."""
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.setdefault(node.func.id, []).append(node)
    return calls


def _bindings(func: ast.FunctionDef | ast.AsyncFunctionDef) -> dict:
    """What each local name may hold: assigned values and loop iterables."""
    bound: dict[str, list[ast.expr]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    bound.setdefault(target.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value:
            if isinstance(node.target, ast.Name):
                bound.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, ast.For | ast.comprehension) and isinstance(
            node.target, ast.Name
        ):
            bound.setdefault(node.target.id, []).append(node.iter)
    return bound


def unsafe_sql(path: Path, root: Path = ROOT) -> list[str]:
    """Each execute call in `path` whose SQL text is not made of constants."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checker = SqlText(path, tree, root)
    checker.visit(tree)
    return checker.found


def test_sql_text_is_made_of_constants_only() -> None:
    files = [p for s in SOURCES for p in sorted((ROOT / s).rglob("*.py"))]
    assert len(files) > 20
    assert [line for f in files for line in unsafe_sql(f)] == []


@pytest.mark.parametrize(
    "code",
    [
        "db.execute(f\"SELECT * FROM t WHERE ref = '{ref}'\")",
        "db.execute(\"SELECT * FROM t WHERE ref = '%s'\" % ref)",
        'db.execute("SELECT * FROM t WHERE ref = {}".format(ref))',
        'db.execute("DELETE FROM t WHERE ref = " + ref)',
        'sql = "SELECT " + column\ndb.execute(sql)',
    ],
)
def test_values_spliced_into_sql_are_found(code: str, tmp_path: Path) -> None:
    found = check_snippet(tmp_path, "def f(db, ref, column):\n" + indent(code))
    assert len(found) == 1 and found[0].startswith("bad.py:")


@pytest.mark.parametrize(
    "code",
    [
        'db.execute("SELECT * FROM t WHERE ref = ?", (ref,))',
        "db.execute(_SELECT, (ref,))",
        'db.execute(f"PRAGMA busy_timeout={int(5.0 * 1000)}")',
        'where = " AND ".join(_FILTERS[k] for k in given) or "1"\n'
        'db.execute(f"{_SELECT} WHERE {where}", tuple(given.values()))',
        'for name in ("a", "b"):\n    db.execute(f"PRAGMA {name}")',
    ],
)
def test_constant_sql_passes(code: str, tmp_path: Path) -> None:
    assert check_snippet(tmp_path, "def f(db, ref, given):\n" + indent(code)) == []


def indent(code: str) -> str:
    return "".join(f"    {line}\n" for line in code.splitlines())


def check_snippet(tmp_path: Path, source: str) -> list[str]:
    (tmp_path / "bad.py").write_text(source)
    return unsafe_sql(tmp_path / "bad.py", root=tmp_path)


def test_a_parameter_is_followed_to_its_callers(tmp_path: Path) -> None:
    select = "def select(db, sql, key):\n    return db.execute(sql, (key,))\n"
    good = select + "def use(db, ref):\n    select(db, _BY_REF, ref)\n"
    assert check_snippet(tmp_path, good) == []
    bad = good + 'def other(db, ref):\n    select(db, "SELECT " + ref, None)\n'
    assert check_snippet(tmp_path, bad) == ["bad.py:2: sql"]
