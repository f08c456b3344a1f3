"""Every text file the package and its tools read or write names UTF-8: under an ASCII locale
(Python's UTF-8 mode off) the `±` of rsmatch-report's tables could not be written, and a config
file was decoded as ASCII. A lint, since no locale test runs in CI: it lists each
`read_text`/`write_text`/text-mode `open` call without an `encoding`."""

import ast

from .conftest import ROOT


def _unnamed_encodings(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in ("read_text", "write_text"):
            yield f"{path.relative_to(ROOT)}:{node.lineno}"
        elif isinstance(fn, ast.Name) and fn.id == "open":
            mode = node.args[1] if len(node.args) > 1 else None
            mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
            if mode is None or (isinstance(mode, ast.Constant) and "b" not in mode.value):
                yield f"{path.relative_to(ROOT)}:{node.lineno}"


def test_text_files_are_read_and_written_as_utf8():
    files = [p for d in ("rsmatch", "launch", "tools", "studies") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    assert [hit for f in sorted(files) for hit in _unnamed_encodings(f)] == []
