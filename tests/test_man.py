"""--help and the manual pages in contrib/man: --help gives every option a
line, C's first; the pages are clean for mandoc and groff, in step with
--help (every option each lists is in the other), and shipped by the
package (pyproject's data-files; tests/test_contrib.py checks the image's).

mandoc and groff come from the Debian packages tests/run.sh installs;
without them the lint tests skip, except under CI=true, where they fail.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SPIPED_PY, unavailable

MAN = os.path.join(ROOT, "contrib", "man")
PAGES = ("spiped.1", "spipe.1", "spiped-keygen.1")

# The command whose --help each page must match.
HELP = {
    "spiped.1": [sys.executable, SPIPED_PY, "--help"],
    "spipe.1": [sys.executable, SPIPED_PY, "spipe", "--help"],
    "spiped-keygen.1": [sys.executable, os.path.join(ROOT, "keygen.py"), "--help"],
}


def need(tool, package):
    if shutil.which(tool) is None:
        unavailable("%s not installed (apt-get install %s)" % (tool, package))


def page_text(name):
    with open(os.path.join(MAN, name), encoding="utf-8") as f:
        return f.read()


def sections(text):
    """{section name: its source lines} of a man page (the lines after .SH NAME)."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith(".SH "):
            name = line[4:].strip().strip('"')
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def page_options(text):
    """The options the OPTIONS section gives an entry to: the tags of its .TP items."""
    lines = sections(text)["OPTIONS"]
    found = []
    for tp, tag in zip(lines, lines[1:]):
        if tp == ".TP":
            # The tag's first words are the option names ("\-h ", " \-\-help");
            # what follows them is the argument, in italics.
            words = tag.replace("\\-", "-").split(None, 1)[1]
            found += OPTION.findall(re.split(r'"\s*[^-"\s,]', words)[0])
    return found


def help_options(text):
    """The options --help gives a line to: lines that start "  -x" or "  -h, --help"."""
    found = []
    for match in re.finditer(r"(?m)^  (-[^\s,]+(?:, -[^\s,]+)*)", text):
        found += match.group(1).split(", ")
    return found


def run_help(command):
    r = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    return r.stdout


C_OPTIONS = {
    "spiped": ["-e", "-d", "-s", "-t", "-k", "-b", "-D", "-F", "-j", "-f", "-g", "-n", "-o",
               "-p", "-r", "-R", "-u", "-v", "--syslog"],
    "spipe": ["-t", "-k", "-b", "-f", "-g", "-j", "-o", "-v"],
}


@pytest.mark.parametrize("prog", ["spiped", "spipe"])
def test_help_gives_every_option_a_line_c_options_first(prog):
    """A line per option of the table, C's own (with their defaults) before the extensions."""
    import spiped
    table = spiped.SPIPED_OPTIONS if prog == "spiped" else spiped.SPIPE_OPTIONS
    text = run_help(HELP[prog + ".1"])
    assert text.startswith(spiped.SPIPED_USAGE if prog == "spiped" else spiped.SPIPE_USAGE)
    options = help_options(text)
    assert sorted(options) == sorted(table), text  # each once, none unknown
    c_part, _, extensions = text.partition("\nExtensions")
    assert help_options(c_part) == C_OPTIONS[prog], text
    assert extensions and not set(help_options(extensions)) & set(C_OPTIONS[prog])
    defaults = ["default 5"] + (["default 100", "default 60", "SOURCE.pid"]
                                if prog == "spiped" else [])
    assert all(d in c_part for d in defaults), defaults


@pytest.mark.parametrize("name", PAGES)
def test_mandoc_lint_is_clean(name):
    need("mandoc", "mandoc")
    p = subprocess.run(["mandoc", "-T", "lint", "-W", "all", os.path.join(MAN, name)],
                       capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


@pytest.mark.parametrize("name", PAGES)
def test_groff_has_no_warnings(name):
    need("groff", "groff-base")
    p = subprocess.run(["groff", "-ww", "-man", "-z", os.path.join(MAN, name)],
                       capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


@pytest.mark.parametrize("name", PAGES)
def test_page_and_help_list_the_same_options(name):
    in_help = help_options(run_help(HELP[name]))
    in_page = page_options(page_text(name))
    assert in_help and len(set(in_page)) == len(in_page), in_page
    assert sorted(in_page) == sorted(in_help), (sorted(set(in_help) - set(in_page)),
                                                sorted(set(in_page) - set(in_help)))


def test_page_options_reads_every_kind_of_tag():
    """page_options() finds a flag, an option with an argument, and two names of one option."""
    text = ('.SH OPTIONS\n.TP\n.B \\-F\nx\n.TP\n.BI \\-s " source"\nx\n'
            '.TP\n.BI \\-\\-keepalive " idle" [, interval ]\nx\n'
            '.TP\n.BR \\-h ", " \\-\\-help\nx\n.SH SIGNALS\n.TP\n.B SIGTERM\n')
    assert page_options(text) == ["-F", "-s", "--keepalive", "-h", "--help"]


@pytest.mark.parametrize("name", PAGES)
def test_page_has_the_usual_sections(name):
    have = sections(page_text(name))
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES",
                    "SEE ALSO"):
        assert section in have, section
    header = page_text(name).splitlines()[0].split()
    assert header[:3] == [".TH", name[:-2].upper().replace("-", "\\-"), "1"], header


def test_spiped_page_tells_signals_files_and_environment():
    have = sections(page_text("spiped.1"))
    signals = "\n".join(have["SIGNALS"])
    for signal in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGINT"):
        assert ".B " + signal in signals, signal
    assert "drain" in "\n".join(have["SIGNALS"]).lower()
    assert "FILES" in have and "ENVIRONMENT" in have and "CONFIGURATION FILE" in have


def test_pages_carry_the_version():
    import spiped
    for name in PAGES:
        assert '"spiped.py %s"' % spiped.__version__ in page_text(name).splitlines()[0], name


def test_pyproject_installs_every_page_under_share_man():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    section = text.partition("[tool.setuptools.data-files]")[2].partition("\n[")[0]
    entry = re.search(r'(?m)^"share/man/man1"\s*=\s*\[(.*)\]', section)
    assert entry, section
    listed = re.findall(r'"([^"]+)"', entry.group(1))
    assert sorted(listed) == sorted("contrib/man/" + p for p in PAGES)
    assert sorted(os.listdir(MAN)) == sorted(PAGES)
