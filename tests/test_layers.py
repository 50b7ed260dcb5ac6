"""The package picture in docs/how-it-works.md stays true: no file imports a package on a floor above its own (or a
neighbour on its floor), every top-level module and package stands on a floor, the diagram's arrows are the code's.
Read from the source (ast), nothing imported: fast, no torch."""
import ast
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "autollm_lf"
DOC = (REPO / "docs" / "how-it-works.md").read_text(encoding="utf-8")
MAX_LINES = 400
MAX_CLASS_LINES = 150


def floors() -> tuple[dict[str, int], dict[str, str]]:
    """unit (a top-level module or package of autollm_lf) -> its floor, and -> its group (`core`, `top`, or itself)."""
    block = re.search(r"<!-- floors:.*?-->\n```text\n(.*?)```", DOC, re.S).group(1)
    floor, group = {}, {}
    for line in block.splitlines():
        number, rest = line.split(None, 1)
        if ":" in rest:  # a group: its modules import each other freely
            name, members = rest.split(":", 1)
            units = [(m, name.strip()) for m in members.split()]
        else:  # neighbours on one floor: none imports another
            units = [(u.strip(), u.strip().rstrip("/")) for u in rest.split("|")]
        for unit, grp in units:
            floor[unit.rstrip("/")], group[unit.rstrip("/")] = int(number), grp
    return floor, group


def drawn_arrows() -> set[tuple[str, str]]:
    block = re.search(r"```mermaid\n(.*?)```", DOC[DOC.index("## The packages"):], re.S).group(1)
    return set(re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*$", block, re.M))


def unit_of(module: str) -> str:
    """autollm_lf.search.loop -> search; autollm_lf.session -> session; autollm_lf -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """Every autollm_lf module this file imports (at the top, inside functions, under TYPE_CHECKING), absolute."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "autollm_lf":  # `from autollm_lf import x` / `from . import x` at the top
                found += [(node.lineno, f"autollm_lf.{a.name}") for a in node.names]
            elif target.startswith("autollm_lf."):
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("autollm_lf.")]
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def code_arrows() -> dict[tuple[str, str], str]:
    """(group, group) -> one place that imports so."""
    _, group = floors()
    arrows = {}
    for path in sources():
        here = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        for line, target in imports(path):
            a, b = group.get(here, here), group.get(unit_of(target), unit_of(target))
            if a != b:
                arrows.setdefault((a, b), f"{path.relative_to(REPO)}:{line} imports {target}")
    return arrows


def test_every_top_level_module_and_package_stands_on_a_floor():
    floor, _ = floors()
    units = {p.stem for p in PACKAGE.glob("*.py")}
    units |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert units - set(floor) == set(), "draw it in docs/how-it-works.md's floors (or move it into a package)"
    assert set(floor) - units == set(), "the floors name what autollm_lf/ does not have"


def test_no_package_imports_one_above_it_or_beside_it():
    floor, group = floors()
    wrong = []
    for path in sources():
        here = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts))
        for line, target in imports(path):
            there = unit_of(target)
            if group[here] == group[there]:
                continue  # itself, or a module of its own group
            if floor[there] >= floor[here]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {here} (floor {floor[here]}) imports {target} "
                             f"(floor {floor[there]})")
    assert wrong == [], "\n".join(wrong)


def test_the_diagram_draws_the_code():
    drawn, code = drawn_arrows(), code_arrows()
    assert drawn - set(code) == set(), "drawn in docs/how-it-works.md, but no import runs so"

    def reach(a):
        seen, todo = set(), [a]
        while todo:
            for x, y in drawn:
                if x == todo[-1] and y not in seen:
                    seen.add(y)
                    todo.insert(0, y)
            todo.pop()
        return seen

    missing = [where for (a, b), where in code.items() if b not in reach(a)]
    assert missing == [], "draw these arrows in docs/how-it-works.md:\n" + "\n".join(missing)


def test_module_names_are_unique_and_shadow_nothing():
    names = Counter(p.parent.name if p.stem == "__init__" else p.stem for p in sources()
                    if p.parent != PACKAGE or p.stem not in ("__init__", "__main__"))
    assert [n for n, count in names.items() if count > 1] == []
    assert sorted(n for n in names if n in sys.stdlib_module_names) == []


def test_no_file_over_the_limit():
    long = {str(p.relative_to(REPO)): n for p in sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these along a natural seam (at most {MAX_LINES} lines)"


def test_no_class_over_the_limit():
    long = {f"{p.relative_to(REPO)}:{node.name}": n for p in sources()
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) if isinstance(node, ast.ClassDef)
            if (n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES}
    assert long == {}, f"move what is not the class's own state out of it (at most {MAX_CLASS_LINES} lines)"
