"""Every command that README.md and docs/*.md show runs, on a tiny model.

Fenced ``bash`` blocks are commands (one per line; backslash-continued lines joined, comment lines
ignored), ``console`` blocks are transcripts whose ``$ `` lines are commands, ``python`` blocks
are run whole as scripts, and ``text``/``yaml``/``json`` blocks are not run. A page's commands run
in order in one temporary directory per page (with ``bench/``, ``tests/``, ``examples/`` and the
build files linked in, as in the checkout's root), so a command may use what an earlier one wrote.

Before it runs, a command is rewritten for a tiny model: the model names of the docs become the
tiny checkpoints of ``tests/tiny_models.py``, data sources the tiny calibration file, and the
heavy flags of ``TINY`` tiny values, added where the subcommand has the flag and the command does
not; ``probprune-fast`` runs as ``python -m probprune``, ``python`` and ``pytest`` under this
interpreter. A block that cannot run here carries a marker on the line right before its fence::

    <!-- docs-test: gpu [REASON] -->    needs a CUDA GPU (runs where there are enough of them)
    <!-- docs-test: network [REASON] --> needs a network (the hub, pip)
    <!-- docs-test: make -->            make targets, checked with ``make -n TARGET``
    <!-- docs-test: skip REASON -->     anything else, with its reason

and is reported as skipped with that reason. A block without a marker must run.

Besides: inline ``probprune-fast ...`` commands of the prose use flags the command line has,
README.md is at most 150 lines, and every relative link points to an existing file and heading.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 150

MARKERS = ("gpu", "network", "make", "skip")
COMMAND_LANGS = ("bash", "sh", "console", "python")
OTHER_LANGS = ("text", "yaml", "json", "toml")

# flag -> tiny value, applied to every subcommand that has the flag (added where missing)
TINY = {
    "--steps": "2", "--seqlen": "16", "--nsamples": "12", "--val-windows": "3",
    "--select-windows": "4", "--compensate-windows": "8", "--init-windows": "4",
    "--search-refit-windows": "4", "--max-windows": "4", "--eval-every": "1", "--k": "2",
    "--batch-size": "2", "--rounds": "1", "--repeats": "1", "--new-tokens": "2",
    "--speed-tokens": "2", "--speed-rounds": "1",
    "--channel-block": "8",  # divides the tiny models' 72 MLP channels (--shape uniform needs it)
}
DATA_FLAGS = ("--calib", "--eval", "--data")  # -> the tiny calibration file
DROPPED_FLAGS = ("--data-file",)  # the local copy of wikitext2, which the tiny file replaces

# embedded models and hub organisations -> the tiny architecture that stands in for them
EMBEDDED = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}
HUB = re.compile(r"^(meta-llama|HuggingFaceTB|mistralai|Qwen|google|TinyLlama)/[\w.-]+$")


def tiny_arch(name: str) -> Optional[str]:
    """The tiny architecture that stands in for a model name of the docs, or None for a path."""
    if name in EMBEDDED:
        return EMBEDDED[name]
    if not HUB.match(name):
        return None
    low = name.lower()
    for key, arch in (("gemma", "gemma3"), ("qwen3", "qwen3"), ("qwen", "qwen2"),
                      ("mistral", "mistral"), ("llama-3", "llama3")):
        if key in low:
            return arch
    return "llama"


# ---------------------------------------------------------------------------------------------
# Reading the pages

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass
class Command:
    page: str
    index: int  # 1-based, in page order
    line: int  # of the command in the page
    lang: str  # bash or python
    text: str
    marker: Optional[str] = None
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"


def fenced_blocks(text: str):
    """(lang, first line number of the body, body lines, marker line or '') of every fenced
    block; raises on an unclosed fence."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"line {start + 1}: fence never closed")
        marker = lines[start - 1] if start > 0 else ""
        yield m.group(1).lower(), start + 2, lines[start + 1:j], marker
        i = j + 1


def _logical_lines(body: List[str], first: int):
    """(line number, text) of each command line: continuations joined."""
    out, buf, at = [], "", None
    for n, line in enumerate(body, first):
        if at is None:
            at = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((at, buf + line))
        buf, at = "", None
    if buf:
        out.append((at, buf))
    return out


def page_commands(page: str, text: Optional[str] = None) -> List[Command]:
    if text is None:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    commands: List[Command] = []
    for lang, first, body, marker_line in fenced_blocks(text):
        marker, reason = None, ""
        m = MARKER.match(marker_line.strip())
        if m:
            marker, reason = m.group(1), m.group(2)
        if lang == "python":
            texts = [(first, "\n".join(body))]
        elif lang in ("bash", "sh"):
            texts = [(n, t.strip()) for n, t in _logical_lines(body, first)
                     if t.strip() and not t.strip().startswith("#")]
        elif lang == "console":
            texts = []
            for n, t in _logical_lines(body, first):
                if t.startswith("$ "):
                    texts.append((n, t[2:].strip()))
        else:
            continue
        for n, t in texts:
            commands.append(Command(page, len(commands) + 1, n, "python" if lang == "python"
                                    else "bash", t, marker, reason))
    return commands


ALL_COMMANDS = [c for page in PAGES for c in page_commands(page)]


# ---------------------------------------------------------------------------------------------
# Rewriting a command for a tiny model

def subcommand_flags() -> Dict[str, Dict[str, object]]:
    """{subcommand: {flag: argparse action}} of probprune-fast."""
    import argparse

    from probprune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {opt: act for act in p._actions for opt in act.option_strings}
            for name, p in sub.choices.items()}


@dataclass
class Tiny:
    """What a rewrite needs: the tiny model directories and the calibration file."""
    models: Dict[str, str]
    calib: str
    flags: Dict[str, Dict[str, object]] = field(default_factory=subcommand_flags)

    def model(self, name: str) -> str:
        arch = tiny_arch(name)
        return self.models[arch] if arch else name


class NeedsMarker(Exception):
    """A command that cannot run here is not marked."""


SHELL_OPS = {"&&", "||", ";", "|", "&"}


def split_shell(line: str) -> List[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def rewrite_python(code: str, tiny: Tiny) -> str:
    """Model names in string constants -> tiny checkpoints; ``probprune.prune(...)`` gets the
    tiny settings as keywords (its keywords are the prune flags with underscores)."""
    prune_flags = tiny.flags["prune"]
    keywords = {f.lstrip("-").replace("-", "_"): v for f, v in TINY.items() if f in prune_flags}
    keywords.update({f.lstrip("-"): tiny.calib for f in DATA_FLAGS if f in prune_flags})

    class Rewrite(ast.NodeTransformer):
        def visit_Constant(self, node):
            if isinstance(node.value, str) and tiny_arch(node.value):
                return ast.copy_location(ast.Constant(tiny.model(node.value)), node)
            return node

        def visit_Call(self, node):
            self.generic_visit(node)
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "prune"
                    and isinstance(f.value, ast.Name) and f.value.id == "probprune"):
                node.keywords = [k for k in node.keywords if k.arg not in keywords]
                for key, value in keywords.items():
                    value = int(value) if value.isdigit() else value
                    node.keywords.append(ast.keyword(arg=key, value=ast.Constant(value)))
            return node

    tree = Rewrite().visit(ast.parse(code))
    return ast.unparse(ast.fix_missing_locations(tree))


def rewrite_simple(tokens: List[str], tiny: Tiny, gpu: bool = False) -> List[str]:
    """One simple command (no shell operators), rewritten."""
    env = []
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        env.append(tokens.pop(0))
    if not tokens:
        return env
    prog, args = tokens[0], tokens[1:]
    if prog in ("pip", "pip3", "curl", "wget", "git", "huggingface-cli", "hf"):
        raise NeedsMarker(f"{prog} needs a network: mark the block <!-- docs-test: network -->")
    if prog == "make":
        raise NeedsMarker("make targets: mark the block <!-- docs-test: make -->")
    names_cuda = any(re.match(r"^--devices?=cuda", a) for a in args) or any(
        a in ("--device", "--devices") and args[i + 1:i + 2] and "cuda" in args[i + 1]
        for i, a in enumerate(args))
    if names_cuda and not gpu:
        raise NeedsMarker("a CUDA device: mark the block <!-- docs-test: gpu -->")
    if prog == "probprune-fast":
        argv = [sys.executable, "-m", "probprune"] + args
    elif prog in ("python", "python3"):
        argv = [sys.executable] + args
    elif prog == "pytest":
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"] + args
    elif prog == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + args
    else:
        argv = tokens
    # python -c CODE: the code rewritten as a python block is
    if argv[0] == sys.executable and len(argv) > 2 and argv[1] == "-c":
        argv[2] = rewrite_python(argv[2], tiny)
    # python -m probprune SUBCOMMAND ...: models, data and heavy flags
    for i in range(len(argv) - 2):
        if argv[i] == "-m" and argv[i + 1] == "probprune" and argv[i + 2] in tiny.flags:
            head, rest = argv[:i + 3], argv[i + 3:]
            nproc = 1
            if "--nproc-per-node" in head:
                nproc = int(head[head.index("--nproc-per-node") + 1])
            argv = head + rewrite_flags(argv[i + 2], rest, tiny, nproc)
            break
    return env + argv


def rewrite_flags(sub: str, args: List[str], tiny: Tiny, nproc: int = 1) -> List[str]:
    have = tiny.flags[sub]
    if "--help" in args or "-h" in args:
        return args
    tiny_values = {f: v for f, v in TINY.items() if f in have}
    if "--k" in tiny_values:
        tiny_values["--k"] = str(max(2, nproc))
    out, seen, i = [], set(), 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        takes_value = flag in have and getattr(have[flag], "nargs", None) != 0
        if flag in DROPPED_FLAGS:
            i += 1 if eq else 2
            continue
        if flag.startswith("--") and takes_value:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            seen.add(flag)
            if flag == "--model":
                value = tiny.model(value)
            elif flag in DATA_FLAGS:
                value = tiny.calib
            elif flag in tiny_values:
                value = tiny_values[flag]
            out += [flag, value]
        else:
            out.append(a)
        i += 1
    for flag, value in tiny_values.items():
        if flag not in seen:
            out += [flag, value]
    for flag in DATA_FLAGS:
        if flag in have and flag not in seen:
            out += [flag, tiny.calib]
    return out


def rewrite_shell(line: str, tiny: Tiny, gpu: bool = False) -> str:
    """The command line as bash runs it, each simple command rewritten."""
    parts, current = [], []
    for tok in split_shell(line):
        if tok in SHELL_OPS:
            parts.append(rewrite_simple(current, tiny, gpu) if current else [])
            parts.append(tok)
            current = []
        else:
            current.append(tok)
    if current:
        parts.append(rewrite_simple(current, tiny, gpu))
    return " ".join(p if isinstance(p, str) else shlex.join(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# Running a page

@dataclass
class Result:
    command: Command
    ran: str = ""  # what ran, after rewriting
    rc: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    skip: str = ""  # the reason it did not run
    error: str = ""  # why it failed without a return code


LINKED = ("bench", "tests", "examples", "csrc", "Makefile", "pyproject.toml", "setup.py")


def environment(workdir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", MPLBACKEND="Agg",
               HF_DATASETS_CACHE=os.path.join(workdir, ".cache", "datasets"),
               PROBPRUNE_CACHE=os.path.join(workdir, ".cache", "probprune"))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def gpus_needed(text: str) -> int:
    return max([int(n) + 1 for n in re.findall(r"cuda:(\d+)", text)] or [1])


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_command(cmd: Command, workdir: str, tiny: Tiny, env: Dict[str, str]) -> Result:
    res = Result(cmd)
    if cmd.marker not in (None,) + MARKERS:
        res.error = f"unknown marker {cmd.marker!r} (one of {', '.join(MARKERS)})"
        return res
    if cmd.marker == "network":
        res.skip = "needs a network" + (f": {cmd.reason}" if cmd.reason else "")
        return res
    if cmd.marker == "skip":
        res.skip = cmd.reason or "marked skip without a reason"
        if not cmd.reason:
            res.error = "<!-- docs-test: skip --> needs a reason"
        return res
    if cmd.marker == "gpu" and gpu_count() < gpus_needed(cmd.text):
        n = gpus_needed(cmd.text)
        res.skip = ("needs a CUDA GPU" if n == 1 else f"needs {n} CUDA GPUs") + (
            f": {cmd.reason}" if cmd.reason else "")
        return res
    if cmd.marker == "make":
        targets = [t for t in split_shell(cmd.text) if not t.startswith("-")]
        if not targets or targets[0] != "make":
            res.error = "a make block holds make commands only"
            return res
        res.ran = shlex.join(["make", "-n"] + targets[1:])
        p = subprocess.run(["make", "-n"] + targets[1:], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        res.rc, res.stdout, res.stderr = p.returncode, p.stdout, p.stderr
        return res
    try:
        if cmd.lang == "python":
            script = os.path.join(workdir, f"docs_block_{cmd.index}.py")
            with open(script, "w") as f:
                f.write(rewrite_python(cmd.text, tiny))
            argv, shell = [sys.executable, script], False
            res.ran = f"{sys.executable} {script}"
        else:
            res.ran = rewrite_shell(cmd.text, tiny, gpu=cmd.marker == "gpu")
            argv, shell = res.ran, True
    except NeedsMarker as e:
        res.error = str(e)
        return res
    try:
        p = subprocess.run(argv, shell=shell, executable="/bin/bash" if shell else None,
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        res.error = f"timed out after {e.timeout} s"
        return res
    res.rc, res.stdout, res.stderr = p.returncode, p.stdout, p.stderr
    return res


def run_page(page: str, workdir: str, tiny: Tiny) -> List[Result]:
    """Runs the page's commands in order; after a failure the rest do not run."""
    for name in LINKED:
        if os.path.exists(os.path.join(ROOT, name)) and not os.path.exists(
                os.path.join(workdir, name)):
            os.symlink(os.path.join(ROOT, name), os.path.join(workdir, name))
    env = environment(workdir)
    results: List[Result] = []
    failed: Optional[Result] = None
    for cmd in page_commands(page):
        if failed is not None and cmd.marker is None:
            r = Result(cmd, error=f"not run: {failed.command.id} (line {failed.command.line}) "
                                  f"failed before it")
        else:
            r = run_command(cmd, workdir, tiny, env)
            if failed is None and not r.skip and (r.error or r.rc != 0):
                failed = r
        results.append(r)
    return results


@pytest.fixture(scope="module")
def page_results(request, tiny_model_dirs, calib_file, tmp_path_factory):
    """page -> its commands' results. The pages of the selected tests run when the first of them
    asks, two pages at a time (each page's commands in order)."""
    from concurrent.futures import ThreadPoolExecutor

    tiny = Tiny(tiny_model_dirs, calib_file)
    pages = [p for p in PAGES if any(
        getattr(item, "callspec", None) is not None
        and getattr(item.callspec.params.get("cmd"), "page", None) == p
        for item in request.session.items)]
    cache: Dict[str, List[Result]] = {}

    def run(page: str) -> List[Result]:
        return run_page(page, str(tmp_path_factory.mktemp(re.sub(r"\W", "_", page))), tiny)

    def get(page: str) -> List[Result]:
        if not cache:
            with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
                cache.update(zip(pages, pool.map(run, pages)))
        if page not in cache:
            cache[page] = run(page)
        return cache[page]
    return get


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=[c.id for c in ALL_COMMANDS])
def test_command_runs(page_results, cmd):
    res = page_results(cmd.page)[cmd.index - 1]
    assert res.command.text == cmd.text
    where = f"{cmd.id} (line {cmd.line}): {cmd.text}"
    if res.error:
        pytest.fail(f"{where}\n{res.error}" + (f"\nran: {res.ran}" if res.ran else ""),
                    pytrace=False)
    if res.skip:
        pytest.skip(f"{cmd.id}: {res.skip}")
    assert res.rc == 0, (f"{where}\nran: {res.ran}\nexit code {res.rc}\n"
                         f"--- stderr ---\n{_tail(res.stderr)}\n--- stdout ---\n{_tail(res.stdout)}")


# ---------------------------------------------------------------------------------------------
# Checks without running anything

def test_every_block_is_labelled_and_every_marker_known():
    problems = []
    for page in PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for lang, first, _, marker in fenced_blocks(text):
            if lang not in COMMAND_LANGS + OTHER_LANGS:
                problems.append(f"{page}:{first - 1}: fence language {lang!r}: label it "
                                f"({', '.join(COMMAND_LANGS + OTHER_LANGS)})")
            m = MARKER.match(marker.strip())
            if marker.strip().startswith("<!-- docs-test") and not m:
                problems.append(f"{page}:{first - 2}: unreadable marker {marker!r}")
            if m and m.group(1) not in MARKERS:
                problems.append(f"{page}:{first - 2}: unknown marker {m.group(1)!r}")
            if m and lang not in COMMAND_LANGS:
                problems.append(f"{page}:{first - 2}: a marker on a {lang!r} block")
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    n = len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES}"


def _without_code(text: str) -> str:
    """The page with its fenced blocks blanked (line numbers kept)."""
    lines = text.splitlines()
    inside = False
    for i, line in enumerate(lines):
        if FENCE.match(line) or (inside and line.rstrip() == "```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: str) -> set:
    found, seen = set(), {}
    for line in _without_code(open(path, encoding="utf-8").read()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = _without_code(open(os.path.join(ROOT, page), encoding="utf-8").read())
    text = re.sub(r"`[^`]*`", "", text)  # links inside inline code are not links
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path \
            else os.path.join(ROOT, page)
        rel = os.path.relpath(full, ROOT)
        if not os.path.exists(full):
            problems.append(f"{target}: {rel} does not exist")
            continue
        if anchor and full.endswith(".md") and anchor not in anchors(full):
            problems.append(f"{target}: no heading #{anchor} in {rel}")
    assert not problems, f"{page}:\n" + "\n".join(problems)


def inline_commands(page: str):
    """(line, text) of every inline code span of the prose that is a probprune-fast command."""
    text = _without_code(open(os.path.join(ROOT, page), encoding="utf-8").read())
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        words = span.split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        if len(words) >= 2 and words[0] == "probprune-fast":
            yield text.count("\n", 0, m.start()) + 1, " ".join(words)


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # S, SEED, DIR, OUTDIR, ...


@pytest.mark.parametrize("page", PAGES)
def test_inline_commands_use_existing_flags(page):
    """A command in the prose (how a measurement was made, say) uses flags and values the
    command line accepts; placeholders (S, SEED, DIR, ...) and ``...`` stand for any value."""
    flags = subcommand_flags()
    problems = []
    for line, span in inline_commands(page):
        words = [w for w in shlex.split(span) if w != "..."]
        sub = words[1]
        if PLACEHOLDER.match(sub):
            continue
        if sub not in flags:
            problems.append(f"line {line}: `{span}`: no subcommand {sub!r}")
            continue
        have = flags[sub]
        i = 2
        while i < len(words):
            flag, eq, value = words[i].partition("=")
            if flag.startswith("-"):
                if flag not in have:
                    problems.append(f"line {line}: `{span}`: {sub} has no {flag}")
                    i += 1
                    continue
                action = have[flag]
                if getattr(action, "nargs", None) != 0:
                    if not eq:
                        i += 1
                        value = words[i] if i < len(words) else None
                    if value is None:
                        problems.append(f"line {line}: `{span}`: {flag} without a value")
                    elif not PLACEHOLDER.match(value):
                        try:
                            converted = action.type(value) if action.type else value
                            if action.choices and converted not in action.choices:
                                raise ValueError(f"not one of {list(action.choices)}")
                        except Exception as e:  # argparse's own conversion and choices
                            problems.append(f"line {line}: `{span}`: {flag} {value}: {e}")
            i += 1
    assert not problems, f"{page}:\n" + "\n".join(problems)


SAMPLE = """# A page

```bash
# a comment line
probprune-fast prune --model smollm2-135m --sparsity 0.3 \\
    --steps 400 --data-file wiki.test.raw --out runs/x   # trailing comment
```

<!-- docs-test: skip takes an hour -->
```console
$ probprune-fast eval --model runs/x --data wikitext2
perplexity 12.3
$ python -c "print('smollm2-135m')"
```

```python
import probprune
r = probprune.prune("meta-llama/Llama-2-7b-hf", sparsity=0.5, steps=100)
```

```text
$ not a command
```
"""


def test_extraction_and_rewriting_of_a_sample_page():
    """The rules above, on a page written for the purpose."""
    cmds = page_commands("sample.md", SAMPLE)
    assert [(c.index, c.lang, c.marker) for c in cmds] == [
        (1, "bash", None), (2, "bash", "skip"), (3, "bash", "skip"), (4, "python", None)]
    assert cmds[0].text.startswith("probprune-fast prune --model smollm2-135m --sparsity 0.3")
    assert "--steps 400" in cmds[0].text and cmds[1].reason == "takes an hour"
    assert cmds[1].text == "probprune-fast eval --model runs/x --data wikitext2"

    tiny = Tiny({"llama": "/tiny/llama", "gemma3": "/tiny/gemma3"}, "/tiny/calib.txt")
    argv = shlex.split(rewrite_shell(cmds[0].text, tiny))
    assert argv[:3] == [sys.executable, "-m", "probprune"]
    opts = dict(zip(argv[4::2], argv[5::2]))
    assert opts["--model"] == "/tiny/llama" and opts["--steps"] == "2"
    assert opts["--calib"] == opts["--eval"] == "/tiny/calib.txt"
    assert opts["--sparsity"] == "0.3" and opts["--out"] == "runs/x"
    assert "--data-file" not in opts and opts["--k"] == "2" and opts["--seqlen"] == "16"
    code = rewrite_python(cmds[3].text, tiny)
    assert "'/tiny/llama'" in code and "steps=2" in code and "calib='/tiny/calib.txt'" in code
    assert "sparsity=0.5" in code
    with pytest.raises(NeedsMarker, match="gpu"):
        rewrite_shell("probprune-fast eval --model smollm2-135m --device cuda", tiny)
    with pytest.raises(NeedsMarker, match="network"):
        rewrite_shell("pip install probprune", tiny)

