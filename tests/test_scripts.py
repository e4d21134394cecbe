"""Every script of ``scripts/`` is a thin command line over :mod:`atbptt_fairseq.experiments`."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
CALL_OF_MAIN = ast.dump(ast.parse('if __name__ == "__main__":\n    sys.exit(main())').body[0])


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 11, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_script_is_its_docstring_and_a_call_of_its_package_modules_main(script: Path) -> None:
    tree = ast.parse(script.read_text())
    assert ast.get_docstring(tree), f"{script.name} has no docstring"
    assert len(tree.body) == 4, f"{script.name} holds more than a docstring and a call of main"
    _, import_sys, import_main, guard = tree.body
    assert ast.dump(import_sys) == ast.dump(ast.parse("import sys").body[0])
    assert isinstance(import_main, ast.ImportFrom)
    assert import_main.module.startswith("atbptt_fairseq.experiments.")
    assert [alias.name for alias in import_main.names] == ["main"]
    assert ast.dump(guard) == CALL_OF_MAIN
    module = importlib.import_module(import_main.module)
    assert callable(module.main) and callable(module.build_parser)
