"""The shape of spiped.py and keygen.py, checked statically (nothing is run).

Short functions and classes, no backslash continuations, one place that
installs signal handlers, and options that are looked up by name once
parsed, never by their C letter.  Each failure lists every offender.
"""
import ast
import io
import os
import re
import tokenize

import pytest

from conftest import ROOT, SPIPED_PY

KEYGEN_PY = os.path.join(ROOT, "keygen.py")
SOURCES = [SPIPED_PY, KEYGEN_PY]
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def source(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def named_nodes(tree, kinds):
    """(qualified name, node) for every node of KINDS, nested ones included."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if isinstance(child, kinds):
                    found.append((name, child))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def too_long(path, kinds, limit):
    tree = ast.parse(source(path), path)
    return ["%s (line %d): %d lines" % (name, node.lineno, node.end_lineno - node.lineno + 1)
            for name, node in named_nodes(tree, kinds)
            if node.end_lineno - node.lineno + 1 > limit]


def continuation_lines(path):
    """Numbers of the lines that end in a backslash outside strings and comments."""
    text = source(path)
    inside = []  # (start, end) of every string and comment token
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            inside.append((tok.start, tok.end))
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.rstrip().endswith("\\"):
            continue
        where = (number, len(line.rstrip()) - 1)
        if not any(start <= where < end for start, end in inside):
            lines.append(number)
    return lines


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_no_long_functions(path):
    long = too_long(path, (ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)
    assert not long, "%s: functions over %d lines:\n  %s" % (
        os.path.basename(path), MAX_FUNCTION_LINES, "\n  ".join(long))


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_no_long_classes(path):
    long = too_long(path, ast.ClassDef, MAX_CLASS_LINES)
    assert not long, "%s: classes over %d lines:\n  %s" % (
        os.path.basename(path), MAX_CLASS_LINES, "\n  ".join(long))


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_no_backslash_continuations(path):
    lines = continuation_lines(path)
    assert not lines, "%s: backslash continuations on lines %s" % (
        os.path.basename(path), ", ".join(map(str, lines)))


def is_signal_signal(node):
    """Whether NODE is a call signal.signal(...)."""
    func = getattr(node, "func", None)
    return (isinstance(node, ast.Call) and isinstance(func, ast.Attribute)
            and func.attr == "signal" and isinstance(func.value, ast.Name)
            and func.value.id == "signal")


def test_signal_handlers_are_installed_in_one_function():
    """Handlers nested in that function (e.g. one that restores a default) count as it."""
    tree = ast.parse(source(SPIPED_PY), SPIPED_PY)
    where = {}  # outermost enclosing function (or "<module>") -> lines of its calls

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if is_signal_signal(child):
                where.setdefault(function, []).append(child.lineno)
            if function == "<module>" and isinstance(child, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef)):
                visit(child, "%s (line %d)" % (child.name, child.lineno))
            else:
                visit(child, function)

    visit(tree, "<module>")
    places = ["%s: lines %s" % (f, ", ".join(map(str, lines)))
              for f, lines in sorted(where.items())]
    assert len(where) == 1 and "<module>" not in where, (
        "signal.signal( is called from %d places, want one function:\n  %s"
        % (len(where), "\n  ".join(places)))


def test_options_are_not_looked_up_by_their_letter():
    pattern = re.compile(r'"-[a-zA-Z]"\]')
    found = ["%d: %s" % (number, line.strip())
             for number, line in enumerate(source(SPIPED_PY).splitlines(), 1)
             if pattern.search(line)]
    assert not found, "options looked up by their C letter:\n  " + "\n  ".join(found)
