"""Every command the docs give is one its program accepts as written: the READMEs, the study and cluster files'
comments, and the usage lines of every module's docstring (which are also its --help text).

For each `python -m ray_cifar.X ...`, `python benchmarks/X.py ...`, `ray up|submit|down FILE ...` and `make ...`
line: the program's own argument parser takes the arguments (it is stopped right after parsing: nothing runs),
every file of this repository the command names exists, and a study's or run's config loads and validates with
its --set values, --smoke-test and --budget-scale (as `python -m ray_cifar.tune` does before Ray starts). Words
in capitals (DIR, OUT, OUTPUT, FILE, YOUR-BUCKET, ...) and `...` stand for what the reader fills in.

A command is a line (or a `...` span in Markdown) that starts with the program; a program named in running text
is not a command."""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted({path for pattern in ("*.md", "*/README.md", "studies/*.yaml", "benchmarks/*.yaml", "cluster/*.yaml",
                                     "cluster/*.py", "benchmarks/*.py", "ray_cifar/**/*.py")
                for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)})

PYTHON = r"(?:[A-Z_]+=\S+\s+)*(?:python3?(?:\.\d+)?|\S*/bin/python)\s+"
PROGRAM = re.compile(PYTHON + r"(?:-m\s+ray_cifar\.\w+|benchmarks/\w+\.py|cluster/\w+\.py)(?=\s|$)"
                     r"|ray\s+(?:up|down|submit|attach|exec)\s|make(?:\s|$)")
PLACEHOLDER = re.compile(r"\.\.\.|YOUR-|(?<![a-z])[A-Z][A-Z0-9_]*(?![a-z])")
REPO_FILE = re.compile(r"^(?:[\w.-]+/)*[\w.-]+\.(?:ya?ml|json|py|md|parquet)$")


def _candidates(path: str) -> list[tuple[int, str]]:
    """(line number, text) of the lines or spans of PATH where a command may start (a span's text is marked
    with a leading "`")."""
    text = open(path, encoding="utf-8").read()
    lines = text.split("\n")
    if path.endswith(".py"):
        doc = ast.get_docstring(ast.parse(text), clean=False) or ""
        start = text.index(doc.split("\n", 1)[0]) if doc else 0
        first = text[:start].count("\n") + 1
        return [(first + i, line) for i, line in enumerate(doc.split("\n"))]
    if path.endswith((".yaml", ".yml")):
        return [(i + 1, line.lstrip()[1:]) for i, line in enumerate(lines) if line.lstrip().startswith("#")]
    found, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            found.append((i + 1, line))
        found += [(i + 1, "`" + span) for span in re.findall(r"`([^`]+)`", line)]
    return found


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every command the docs give, continuation lines joined."""
    commands = []
    for path in DOCS:
        candidates = _candidates(path)
        for k, (number, text) in enumerate(candidates):
            span = text.startswith("`")
            text = re.sub(r"^`?\s*(?:\$\s+)?", "", text)
            if not PROGRAM.match(text) or span and PROGRAM.fullmatch(text.strip()):
                continue  # not a command; or, in running text, a program named
            while text.rstrip().endswith("\\") and k + 1 < len(candidates):
                k += 1
                text = text.rstrip()[:-1] + " " + candidates[k][1].strip().lstrip("#")
            commands.append((f"{os.path.relpath(path, ROOT)}:{number}", text.strip()))
    return commands


COMMANDS = doc_commands()


class Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


@pytest.fixture
def stop_at_parse(monkeypatch):
    """Every argparse parser raises Parsed with its namespace once it has parsed: the program goes no further."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def words_of(command: str) -> list[str]:
    """The command's words, its comment cut: `[--out DIR]` is taken as given, a lone `...` (more options) dropped."""
    words = shlex.split(command, comments=True)
    words = [w.strip("[]") for w in words]
    return [w for i, w in enumerate(words) if w != "..." or (i > 0 and words[i - 1].startswith("--"))]


def is_placeholder(word: str) -> bool:
    return bool(PLACEHOLDER.search(word))


def check_repo_files(words: list[str]) -> None:
    for word in words:
        value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
        if REPO_FILE.match(value) and not is_placeholder(value):
            assert os.path.exists(os.path.join(ROOT, value)), f"{value}: no such file in the repository"


def run_parser(words: list[str], monkeypatch) -> argparse.Namespace | None:
    """The program's parser over its arguments (None where --help ended it, as it ends the program)."""
    program, args = _program(words)
    monkeypatch.setattr(sys, "argv", [program, *args])
    # What a program sets before it parses (cluster/study.py: RAY_ADDRESS=auto) stays in this test.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.chdir(ROOT)
    try:
        if program.startswith("ray_cifar."):
            module = importlib.import_module(program)
            module.main(args)
        else:
            spec = importlib.util.spec_from_file_location(f"docs_{os.path.basename(program)[:-3]}",
                                                          os.path.join(ROOT, program))
            module = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
            monkeypatch.setattr(sys, "path", list(sys.path))  # a benchmark puts its folders on it
            spec.loader.exec_module(module)
            module.main(*([args] if inspect.signature(module.main).parameters else []))
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        assert e.code in (0, None), f"{shlex.join(words)}: the parser refused it (exit {e.code})"
        return None
    pytest.fail(f"{program} ran without parsing arguments")


def _program(words: list[str]) -> tuple[str, list[str]]:
    while "=" in words[0]:  # VAR=value before the interpreter
        words = words[1:]
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


def check_config(namespace: argparse.Namespace) -> None:
    """What `prepare` resolves first: the config file, --smoke-test, every --set, --budget-scale, validated."""
    from ray_cifar.validation import load_config

    if getattr(namespace, "resume", None) or namespace.help_config:
        return
    config = None if namespace.config is None or is_placeholder(namespace.config) else namespace.config
    load_config(config, namespace.sets, smoke_test=namespace.smoke_test, budget_scale=namespace.budget_scale)


def check_make(words: list[str]) -> None:
    """The target exists and make takes the line (-n: it prints what it would run, runs nothing)."""
    proc = subprocess.run(["make", "-n", "-C", ROOT, *words[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{shlex.join(words)}: {proc.stderr.strip()}"


def program_of(command: str) -> str:
    """ray_cifar.tune, benchmarks/gpu_check.py, cluster/study.py, make, ray submit, ..."""
    words = words_of(command)
    if words[0] in ("make", "ray"):
        return " ".join(words[:2]) if words[0] == "ray" else "make"
    return _program(words)[0]


def test_the_docs_give_commands_of_every_kind():
    """The extraction finds what the docs hold (a broken pattern would check nothing)."""
    programs = {program_of(c) for _, c in COMMANDS}
    assert len(COMMANDS) >= 80
    assert {"ray_cifar.tune", "ray_cifar.train", "ray_cifar.report", "benchmarks/gpu_check.py", "make",
            "ray submit"} <= programs, programs


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_is_accepted_as_written(where, command, stop_at_parse, monkeypatch):
    """WHERE gives COMMAND (see the module's docstring)."""
    words = words_of(command)
    check_repo_files(words)
    if words[0] == "make":
        check_make(words)
        return
    if words[0] == "ray":  # ray submit [--tmux] CLUSTER.yaml cluster/study.py -- ARGS: ARGS are the study's
        if words[1] != "submit" or "--" not in words:
            return  # the cluster file exists (above); the rest is Ray's
        assert words[words.index("--") - 1] == "cluster/study.py", command
        words = ["python", "cluster/study.py", *words[words.index("--") + 1:]]
    namespace = run_parser(words, monkeypatch)
    if namespace is not None and hasattr(namespace, "sets") and hasattr(namespace, "smoke_test"):
        check_config(namespace)


def test_the_readmes_pandas_one_liners_run_and_say_what_they_compute(tmp_path):
    """README's "pandas one-liners", run as written on a study's files: its "mean ± std over seeds" grouped the best
    epochs by optimizer and lr alone, so two batch sizes' trials of one seed were averaged as if they were seeds."""
    import pandas as pd

    from ray_cifar.results import ResultsLog, write_rows

    out = tmp_path / "OUT"
    rows = [{"trial_id": f"t{lr}-{batch}-{seed}", "epoch": e, "optim.lr": lr, "train.global_batch_size": batch,
             "train.seed": seed, "val_acc": lr + batch / 1000 + seed / 100 + e / 1000, "images_per_second": 100.0 * e,
             "diverged": False} for lr in (0.1, 0.2) for batch in (128, 256) for seed in (0, 1) for e in (1, 2)]
    rows.append({**rows[-1], "epoch": 3, "val_acc": 0.99, "diverged": True})  # no score, though the highest
    log = ResultsLog(str(out))
    log.append(rows)
    log.compact()  # results.parquet, as a finished study leaves it
    write_rows([{"trial_id": t, "best_metric": 0.5} for t in sorted({r["trial_id"] for r in rows})],
               str(out / "trials.parquet"))
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"\*\*pandas one-liners\*\*.*?```python\n(.*?)```", text, re.S).group(1)
    names = {"pd": pd}
    for line in block.replace('"OUT/', f'"{out}/').splitlines():
        exec(line.split("  #")[0], names)  # each as written (the comment after two spaces)
    table = eval('best.groupby(point, dropna=False)["val_acc"].agg(["mean", "std", "count"])', names)
    assert list(table.index.names) == ["optim.lr", "train.global_batch_size"] and set(table["count"]) == {2}
    assert names["best"]["val_acc"].max() < 0.99 and len(names["best"]) == 8
