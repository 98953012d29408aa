"""README.md against the code: the flags its commands show exist in those commands' parsers, and the signatures it
shows for the Python API name parameters (and defaults) that the functions have, all of them where they show the
keyword-only ``*``."""

import argparse
import ast
import importlib
import inspect
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
COMMAND = re.compile(r"(qwen-jax(?: bench)? [a-z]+|python -m (?:qwen_jax\.bench|pallas_kernels)\.[a-z_]+)")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def _readme_code() -> list[str]:
    """README's code: each line of its code blocks (a command's continuation lines joined to it: after a backslash,
    and the indented lines of a usage listing that go on with more flags) and each inline code span."""
    units, prose, fenced = [], [], False
    for line in open(README).read().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and units and re.match(r"\s+[\[-]", line) and COMMAND.search(units[-1]):
            units[-1] += " " + line.strip()
        elif fenced:
            units.append(line)
        else:
            prose.append(line)
    return units + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(prose))]


def readme_commands() -> list[tuple[str, str]]:
    """(command, flag) for every --flag README shows after a command, up to the end of its code span or line, or a
    comment."""
    found = []
    for line in _readme_code():
        starts = list(COMMAND.finditer(line))
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
            rest = line[m.end():end].split("#")[0]
            found += [(m.group(1), flag) for flag in FLAG.findall(rest)]
    return found


class _Parsed(Exception):
    pass


def _module_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a benchmark's main() builds: caught at its parse_args."""
    def grab(self, args=None, namespace=None):
        raise _Parsed(self)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed) as caught:
            importlib.import_module(module).main([])
    return caught.value.args[0]


def command_parser(command: str, monkeypatch) -> argparse.ArgumentParser | None:
    from qwen_jax.cli import BENCHMARKS, build_parser
    words = command.split()
    if words[0] == "python":
        return _module_parser(words[2], monkeypatch)
    if words[1:2] == ["bench"] and len(words) == 3:
        return _module_parser(BENCHMARKS[words[2]], monkeypatch)
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices.get(words[1])


def test_every_flag_readme_shows_exists_in_its_commands_parser(monkeypatch):
    shown = readme_commands()
    commands = {c for c, _ in shown}
    assert {"qwen-jax generate", "qwen-jax passkey", "qwen-jax plan", "qwen-jax bench decode"} <= commands
    assert ("qwen-jax generate", "--kv-cache-dtype") in shown      # the usage block's continuation lines are read
    parsers = {c: command_parser(c, monkeypatch) for c in commands}
    unknown_commands = sorted(c for c, p in parsers.items() if p is None)
    assert not unknown_commands, f"README shows commands the CLI does not have: {unknown_commands}"
    missing = sorted({(c, f) for c, f in shown if f not in parsers[c]._option_string_actions})
    assert not missing, f"README shows flags these commands do not take: {missing}"


def _split_params(text: str) -> list[str]:
    """Top-level comma-separated parameters of a signature as README writes it."""
    params, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += ch
    return params + [current.strip()] if current.strip() else params


def readme_signatures() -> list[tuple[str, str]]:
    """(name, parameters) of every `name(...)` README gives as a signature: the pure-function table's first column,
    the Python API section's bullets, and each `qwen_jax.x.y(...)` / `pallas_kernels.x(...)` code span."""
    text = open(README).read()
    api = text[text.index("## Python API"):text.index("## Dual Chunk Attention")]
    shown = [sig for cell in re.findall(r"^\| (`.*?) \|", api, re.M) for sig in re.findall(r"`([a-z_]+)\((.*?)\)`", cell)]
    shown += [(n, p.replace("\n", " ")) for n, p in re.findall(r"^- `((?:qwen_jax|Model)\.[a-z_]+)\(([^`]*?)\)`", api,
                                                                 re.M | re.S)]
    return shown + [(n, p.replace("\n", " ")) for n, p in re.findall(
        r"`((?:qwen_jax|pallas_kernels)(?:\.[a-z_]+)+)\(([^`]*)\)`", text, re.S) if n != "qwen_jax.load"]


def _function(name: str):
    import qwen_jax
    owner, _, attr = name.rpartition(".")
    if owner in ("", "Model"):
        return getattr(qwen_jax.Model if owner == "Model" else qwen_jax, attr)
    words = name.split(".")
    for cut in range(len(words) - 1, 0, -1):
        try:
            found = importlib.import_module(".".join(words[:cut]))
        except ImportError:
            continue
        for word in words[cut:]:
            found = getattr(found, word)
        return found


def test_readme_signatures_match_the_functions():
    shown = readme_signatures()
    names = {n for n, _ in shown}
    assert {"forward", "prefill", "decode_step", "init_cache", "cache_prefix", "qwen_jax.load", "Model.generate",
            "Model.cache_prefix"} <= names
    problems = []
    for name, params in shown:
        signature = inspect.signature(_function(name)).parameters
        takes_keywords = any(p.kind == p.VAR_KEYWORD for p in signature.values())
        listed = [p for p in _split_params(params) if re.fullmatch(r"\*{0,2}[a-z_]*(=.*)?", p)]
        if "*" in listed and "..." not in params:       # a signature showing its keyword-only * lists every parameter
            named = {param.partition("=")[0].lstrip("*") for param in listed}
            left_out = [p for p in signature if p != "self" and p not in named]
            if left_out:
                problems.append(f"{name}: README leaves out {left_out}")
        for param in listed:
            if param == "*" or param.startswith("**") and takes_keywords:
                continue
            key, _, default = param.partition("=")
            if key not in signature and not (default and takes_keywords):
                problems.append(f"{name}: no parameter {key!r}")
            if default and key in signature and default != "..." and not default.endswith(")"):
                try:
                    value = ast.literal_eval(default)
                except ValueError:
                    continue
                if signature[key].default != value:
                    problems.append(f"{name}: {key} defaults to {signature[key].default!r}, README says {default}")
    assert not problems, problems
