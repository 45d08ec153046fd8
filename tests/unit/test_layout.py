"""The floor plan, measured from the package's own imports: layers without cycles, short chains, public names once."""

from __future__ import annotations

import ast
import functools
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import modeswap
from modeswap import passes
from modeswap.records.modes import Kind
from modeswap.table import rules

PER_NODE = rules.Sentinel.PER_NODE

PACKAGE = Path(modeswap.__file__).parent
#: The longest chain of module-level imports from any module down to the bottom (docs/architecture.md).
LONGEST_CHAIN = 10


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, *, runtime_module_level: bool) -> set[tuple[str, str]]:
    """The package modules ``name`` imports, each with the name it imports (``""`` for a whole module).

    With ``runtime_module_level``, only the imports that run when the module is
    imported: at module level, outside ``if TYPE_CHECKING:``.
    """
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if runtime_module_level:
        nodes = [
            node
            for node in tree.body
            if not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
            for node in ([node] if not isinstance(node, ast.If | ast.Try) else ast.walk(node))
        ]
    else:
        nodes = list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, str]] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "modeswap"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base.split(".")[0] != "modeswap":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((submodule, "") if submodule in MODULES else (base, alias.name))
    return {(module, what) for module, what in found if module != name}


def _graph(*, runtime_module_level: bool) -> dict[str, set[str]]:
    return {
        name: {module for module, _ in _imports(name, runtime_module_level=runtime_module_level)} for name in MODULES
    }


def test_no_import_cycle_counting_every_import():
    # Function-level and TYPE_CHECKING imports count too: a cycle through either is a muddled layer.
    graph = _graph(runtime_module_level=False)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                cycles.append([*stack[stack.index(imported) :], imported])
            elif imported not in state:
                visit(imported, stack)
        stack.pop()
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [])
    assert cycles == []


def test_nothing_inside_imports_the_package_top():
    importers = sorted(name for name, imported in _graph(runtime_module_level=False).items() if "modeswap" in imported)
    assert importers == []


def test_the_longest_chain_of_imports_is_at_most_ten_modules():
    graph = _graph(runtime_module_level=True)

    @functools.cache
    def chain(name: str) -> tuple[str, ...]:
        return (name, *max((chain(imported) for imported in graph[name]), key=len, default=()))

    longest = max((chain(name) for name in MODULES), key=len)
    assert len(longest) <= LONGEST_CHAIN, " -> ".join(longest)


def test_no_private_name_is_imported_across_modules():
    private = sorted(
        f"{name} imports {module}.{what}"
        for name in MODULES
        for module, what in _imports(name, runtime_module_level=False)
        if what.startswith("_")
    )
    assert private == []


@pytest.mark.parametrize("name", modeswap.__all__)
def test_every_public_name_imports(name):
    namespace: dict[str, object] = {}
    exec(f"from modeswap import {name}", namespace)
    assert namespace[name] is getattr(modeswap, name)
    assert name in dir(modeswap)


def test_the_public_names_are_those_of_the_design_card():
    # DESIGN.md's public API; code outside this repo calls these names.
    contract = {
        *("to_eval", "to_train", "swap", "mode_of", "is_exported", "allow_train_eval", "passes", "pipeline"),
        *("testing", "check", "capture", "save", "load", "Mode", "Site", "Change", "ModeReport", "Swap"),
        *("Fidelity", "Options", "ModalModule", "ModeswapError", "ModeswapWarning"),
    }
    assert contract <= set(modeswap.__all__)
    assert sorted(modeswap.__all__) == modeswap.__all__


def test_importing_the_package_loads_no_public_module_until_a_name_is_used():
    # `modeswap --version` and `import modeswap` do not pay for torch: the names load on first use.
    code = "import sys, modeswap; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'modeswap')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["modeswap", "modeswap.records", "modeswap.records.version"]


def test_a_misspelt_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'to_evall'"):
        importlib.import_module("modeswap").to_evall  # noqa: B018


def test_the_kind_literal_names_the_kinds_of_the_table():
    assert typing.get_args(Kind) == rules.KINDS


@pytest.mark.parametrize("kind", rules.KINDS)
def test_every_kind_of_the_table_has_its_public_swap(kind):
    factory = getattr(passes, f"swap_{kind}")
    assert factory is passes.SWAPS[kind]
    assert f"swap_{kind}" in passes.__all__
    assert factory("eval").name == f"swap_{kind}(eval)"
    probability = any(rule.kind == kind and (rule.gated or rule.train is PER_NODE) for rule in rules.RULES)
    if not probability:  # batch norm, instance norm, rrelu, rnn, drop path: nothing for dropout= to state
        with pytest.raises(modeswap.InvalidOptionError, match=f"swap_{kind} takes no dropout="):
            factory("train", dropout={"": 0.1})


def test_the_factories_are_the_kinds_of_the_table_and_the_old_name():
    named = {name for name in passes.__all__ if name.startswith("swap_") and callable(getattr(passes, name))}
    generic = {"swap_kind", "swap_passes", "swap_pipeline"}
    assert named - generic == {f"swap_{kind}" for kind in rules.KINDS} | {"swap_batchnorm"}
    assert passes.swap_batchnorm is passes.swap_batch_norm
