"""The README and the documentation's guide pages (docs/*.md) run as written.

Every Python block is executed, each on its own in a fresh namespace (they make their data with
``blockquant.bench.datasets.synthetic_data``). Bash blocks are too slow to run here (a full benchmark, a test
run): every command in them must exist and be given only options it has (``blockquant`` subcommands against
their argparse parsers, scripts against their files, pip's extras against setup.py).
"""
import ast
import importlib.util
import pathlib
import re
import shlex
import shutil
import textwrap

import pytest
import torch
import torch_geometric.typing as pyg_typing

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
HAS_SAMPLER = pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def _blocks(lang, page):
    """``(where, code)`` of every ``lang`` block of ``page``, list-item blocks (indented) included."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(f"{page}:{text[:m.start()].count(chr(10)) + 1}", textwrap.dedent(m.group(2)))
            for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```", text, re.S | re.M)]


PYTHON = [b for page in PAGES for b in _blocks("python", page)]
BASH = [b for page in PAGES for b in _blocks("bash", page)]


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_is_python_or_bash(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    checked = len(_blocks("python", page)) + len(_blocks("bash", page))
    # MyST directives ({include}, {toctree}, {eval-rst}) are not code
    assert checked == len(re.findall(r"^ *```\w+$", text, re.M)), f"{page}: a code block of another language"


def test_the_pages_have_code_to_check():
    assert len(_blocks("python", "README.md")) >= 2 and len(_blocks("bash", "README.md")) >= 3
    assert len(PYTHON) >= 6 and len(BASH) >= 15


def test_ci_runs_the_readme_test_and_docs_commands_as_written():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for marker in ("pytest -q", "sphinx-build"):
        (command,) = [code.strip() for where, code in BASH if marker in code and where.startswith("README.md:")]
        assert command in ci, f".ci/run does not run the README's command {command!r}"


@pytest.mark.parametrize("where,code", PYTHON, ids=[where for where, _ in PYTHON])
def test_python_block_runs(where, code, tmp_path, monkeypatch):
    if "NeighborLoader(" in code and not HAS_SAMPLER:
        pytest.skip("NeighborLoader needs pyg-lib or torch-sparse (tools/build_torch_sparse.sh runs this block)")
    monkeypatch.chdir(tmp_path)  # blocks may write files (plan.json)
    torch.manual_seed(0)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


# ----------------------------------------------------------------------------- bash blocks

def _commands(code):
    """Each simple command of a bash block as a token list (continuations joined, comments and env prefixes off)."""
    for raw in code.replace("\\\n", " ").splitlines():
        raw = raw.split("  #")[0]
        if raw.lstrip().startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;", raw):
            tokens = shlex.split(part)
            while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
                tokens = tokens[1:]
            if tokens:
                yield tokens


def _flags(tokens):
    return [t.split("=")[0] for t in tokens if t.startswith("--")]


def _setup_extras():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS":
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py: no EXTRAS = {...}")


def _parser_options(parser):
    return {o for a in parser._actions for o in a.option_strings}


def _check_blockquant(tokens):
    from blockquant.cli import build_parser

    sub = tokens[1]
    choices = next(a for a in build_parser()._actions if a.choices and sub in a.choices).choices
    unknown = set(_flags(tokens)) - _parser_options(choices[sub])
    assert not unknown, f"blockquant {sub} has no option {sorted(unknown)}"


def _check_python(tokens):
    if tokens[1] == "-m":
        module = tokens[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "torch.distributed.run":  # ... -m blockquant.bench.ddp ARGS: the worker's options
            from blockquant.bench.ddp import worker_parser

            worker = tokens.index("-m", 3)
            assert tokens[worker + 1] == "blockquant.bench.ddp", tokens
            unknown = set(_flags(tokens[worker + 2:])) - _parser_options(worker_parser())
            assert not unknown, f"python -m blockquant.bench.ddp has no option {sorted(unknown)}"
        return
    script = ROOT / tokens[1]
    assert script.is_file(), f"no script {tokens[1]}"
    source = script.read_text()
    missing = [f for f in _flags(tokens) if f'"{f}"' not in source]
    assert not missing, f"{tokens[1]} defines no option {missing}"


def _check_pip(tokens):
    assert tokens[1] == "install", tokens
    if "-c" in tokens:
        assert (ROOT / tokens[tokens.index("-c") + 1]).is_file(), "no constraints file"
    target = tokens[tokens.index("-e") + 1]
    extras = set((re.fullmatch(r"\.(?:\[(.*)\])?", target).group(1) or "").split(",")) - {""}
    assert extras <= _setup_extras(), f"setup.py has no extra {sorted(extras - _setup_extras())}"


def _check_shell_script(tokens):
    script = tokens[1] if tokens[0] == "bash" else tokens[0]
    path = ROOT / script
    assert path.is_file(), f"no script {script}"
    source = path.read_text()
    for arg in tokens[2:] if tokens[0] == "bash" else tokens[1:]:
        if not arg.startswith("-"):  # a step / target name: a case label of the script
            assert re.search(rf"(^|\s|\|){re.escape(arg)}(\||\))", source), f"{script} has no step {arg!r}"


def _check(tokens):
    head = tokens[0]
    if head == "blockquant":
        _check_blockquant(tokens)
    elif head == "python":
        _check_python(tokens)
    elif head == "pip":
        _check_pip(tokens)
    elif head == "bash" or head.endswith(".sh"):
        _check_shell_script(tokens)
    elif head in ("ruff", "pytest"):
        assert shutil.which(head) or importlib.util.find_spec(head), f"{head} is not installed"
    elif head == "sphinx-build":  # the [docs] extra may not be installed where the tests run: check the site
        assert (ROOT / "docs" / "conf.py").is_file() and "-W" in tokens, tokens
    else:
        raise AssertionError(f"the README runs {head!r}: teach tests/test_readme.py how to check it")


@pytest.mark.parametrize("where,code", BASH, ids=[where for where, _ in BASH])
def test_bash_block_names_only_commands_and_options_that_exist(where, code):
    commands = list(_commands(code))
    assert commands, code
    for tokens in commands:
        _check(tokens)


def test_bash_checks_catch_a_wrong_option():
    with pytest.raises(AssertionError, match="no option"):
        _check(["blockquant", "bench", "--epoch", "3"])
    with pytest.raises(AssertionError, match="no extra"):
        _check(["pip", "install", "-e", ".[benchmarks]"])
    with pytest.raises(AssertionError, match="no step"):
        _check(["bench/reproduce_readme.sh", "corra"])
