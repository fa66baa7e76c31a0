"""Mutation testing: break relay.py in small plausible ways and see whether the suite notices.

Each mutant is one change: a comparison flipped (< to <=, == to !=, ...), `and` swapped with `or`,
a `not` dropped, a number moved by one, a True made False, a statement that is a call removed, a
returned value replaced by None. Each mutant is written into a copy of the project and the test
suite runs against it (the in-process tests first, stopping at the first failure). A mutant the
suite does not fail "survives".

    python bench/mutate.py                 # a seeded sample of 120 mutants of relay.py
    python bench/mutate.py --count 0       # every mutant (hours)
    python bench/mutate.py --list          # list the mutants without running anything
    python bench/mutate.py --again bench/results/mutants-X.json   # that run's survivors, today's suite

It prints each survivor (line, change) and the score, and writes bench/results/mutants-*.json.
It is not part of the default test run: each mutant costs a run of the suite.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "relay.py"
FLIPS = {
    ast.Lt: "<=",
    ast.LtE: "<",
    ast.Gt: ">=",
    ast.GtE: ">",
    ast.Eq: "!=",
    ast.NotEq: "==",
    ast.In: "not in",
    ast.NotIn: "in",
    ast.Is: "is not",
    ast.IsNot: "is",
}
# Sections of relay.py worth breaking; the CLI's wording and `describe` are left alone.
SKIP_FUNCTIONS = {"describe", "main", "cmd_check", "cmd_setup", "check_numbers", "cmd_send", "tame_library_logging"}


@dataclass(frozen=True)
class Mutant:
    line: int
    start: int  # offsets into the source text
    end: int
    replacement: str
    description: str

    def apply(self, text: str) -> str:
        return text[: self.start] + self.replacement + text[self.end :]


def offsets(text: str) -> list[int]:
    """Offset of each line's start (1-based line numbers index into it)."""
    starts, total = [0, 0], 0
    for line in text.splitlines(keepends=True):
        total += len(line)
        starts.append(total)
    return starts


class Finder(ast.NodeVisitor):
    def __init__(self, text: str):
        self.text = text
        self.line_at = offsets(text)
        self.mutants: list[Mutant] = []
        self.skip_depth = 0

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (
            self.line_at[node.lineno] + node.col_offset,
            self.line_at[node.end_lineno] + node.end_col_offset,
        )

    def add(self, node: ast.AST, replacement: str, description: str) -> None:
        if self.skip_depth:
            return
        start, end = self.span(node)
        self.mutants.append(Mutant(node.lineno, start, end, replacement, description))

    def source(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.text[start:end]

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        skipped = node.name in SKIP_FUNCTIONS
        self.skip_depth += skipped
        self.generic_visit(node)
        self.skip_depth -= skipped

    def visit_Compare(self, node: ast.Compare) -> None:
        if len(node.ops) == 1 and type(node.ops[0]) in FLIPS:
            left, right = self.source(node.left), self.source(node.comparators[0])
            flipped = FLIPS[type(node.ops[0])]
            self.add(node, f"({left} {flipped} {right})", f"comparison flipped to {flipped}")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other = " or " if isinstance(node.op, ast.And) else " and "
        self.add(
            node, "(" + other.join(f"({self.source(v)})" for v in node.values) + ")", f"{other.strip()} swapped in"
        )
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self.add(node, f"({self.source(node.operand)})", "`not` dropped")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, bool):
            self.add(node, str(not node.value), f"{node.value} made {not node.value}")
        elif isinstance(node.value, int | float) and not isinstance(node.value, bool):
            self.add(node, repr(node.value + 1), f"{node.value!r} made {node.value + 1!r}")

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call):
            self.add(node, "pass", f"call removed: {self.source(node.value)[:50]}")
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.add(node, "return None", "returns None")
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # positions inside f-strings are not worth breaking one by one


def find_mutants(text: str) -> list[Mutant]:
    finder = Finder(text)
    for node in ast.parse(text).body[1:]:  # the module docstring holds no behaviour
        finder.visit(node)
    valid = []
    for mutant in finder.mutants:
        try:
            compile(mutant.apply(text), "relay.py", "exec")
        except SyntaxError:
            continue
        valid.append(mutant)
    return valid


# The in-process tests first: most mutants die there in seconds, and only the rest pay for the
# whole suite (which runs them again). The slow property-based web test waits for the second stage.
QUICK_STAGE = [
    *(f"tests/test_{name}.py" for name in ("config", "cost_caps", "rules", "store", "web")),
    "--deselect",
    "tests/test_web.py::test_malformed_requests_get_a_clear_4xx_and_change_nothing",
]
STAGES = [QUICK_STAGE, []]


def run_suite(workdir: Path, timeout: float) -> tuple[bool, float, str]:
    """(killed, seconds, the first failing test or why)."""
    started = time.monotonic()
    for stage in STAGES:
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *stage]
        try:
            done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, time.monotonic() - started, "timeout"
        if done.returncode != 0:
            failed = next((line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
            return True, time.monotonic() - started, failed[:160]
    return False, time.monotonic() - started, ""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def sample(mutants: list[Mutant], count: int, seed: int, lines: str | None = None) -> list[Mutant]:
    """`count` of them drawn with `seed`, from those on `lines` (e.g. "100-250") if given."""
    if lines:  # before the draw, so that it is drawn from those lines
        low, _, high = lines.partition("-")
        mutants = [m for m in mutants if int(low) <= m.line <= int(high or low)]
    if count and count < len(mutants):
        return sorted(random.Random(seed).sample(mutants, count), key=lambda m: m.start)
    return mutants


def where(text: str, mutants: list[Mutant]) -> list[tuple[str, str, int]]:
    """Each mutant as (its line's text, its change, which such one): the same break in an edited file."""
    lines, seen, keys = text.splitlines(), {}, []
    for mutant in mutants:
        key = (lines[mutant.line - 1].strip(), mutant.description)
        seen[key] = seen.get(key, -1) + 1
        keys.append((*key, seen[key]))
    return keys


def survivors_again(results: dict, text: str) -> list[Mutant]:
    """The survivors of an earlier run (of relay.py as at its commit), found again in today's relay.py."""
    old_text = git("show", f"{results['commit']}:relay.py")
    old_all = find_mutants(old_text)
    old = sample(old_all, results["count"], results["seed"], results.get("lines"))
    old = old[: len(results["mutants"])]  # a run may stop early
    assert [(m.line, m.description) for m in old] == [(r["line"], r["change"]) for r in results["mutants"]]
    old_keys = dict(zip(old_all, where(old_text, old_all), strict=True))
    new_all = find_mutants(text)
    new_by_key = dict(zip(where(text, new_all), new_all, strict=True))
    found = []
    for mutant, result in zip(old, results["mutants"], strict=True):
        if result["killed"]:
            continue
        if old_keys[mutant] in new_by_key:
            found.append(new_by_key[old_keys[mutant]])
        else:
            print(f"gone: relay.py:{mutant.line}: {mutant.description} (the code changed)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=120, help="how many mutants to try (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one run of the suite")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    parser.add_argument("--lines", help="only mutants on these lines, e.g. 100-250")
    parser.add_argument("--again", type=Path, help="a results file: run its survivors against today's suite")
    parser.add_argument("--at", help="with --again, the commit that run broke, if its file does not say")
    # With --again, --count, --seed and --lines are that run's, where its file does not say them.
    args = parser.parse_args()

    text = SOURCE.read_text()
    if args.again:
        earlier = {"commit": args.at, "count": args.count, "seed": args.seed, "lines": args.lines}
        mutants = survivors_again(earlier | json.loads(args.again.read_text()), text)
    else:
        mutants = sample(find_mutants(text), args.count, args.seed, args.lines)
    if args.list:
        for mutant in mutants:
            print(f"relay.py:{mutant.line}: {mutant.description}")
        print(f"{len(mutants)} mutants")
        return 0

    commit = git("rev-parse", "--short", "HEAD").strip() + (
        "+edits" if git("status", "--porcelain", "relay.py") else ""
    )
    with tempfile.TemporaryDirectory(prefix="relay-mutants-") as tmp:
        workdir = Path(tmp) / "project"
        shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(".venv", ".git", ".prism", "state", "mutants"))
        results = []
        for n, mutant in enumerate(mutants, start=1):
            (workdir / "relay.py").write_text(mutant.apply(text))
            killed, seconds, why = run_suite(workdir, args.timeout)
            results.append({"line": mutant.line, "change": mutant.description, "killed": killed, "by": why})
            mark = "killed " if killed else "SURVIVED"
            print(
                f"[{n}/{len(mutants)}] {mark} relay.py:{mutant.line}: {mutant.description} ({seconds:.0f}s)", flush=True
            )
        (workdir / "relay.py").write_text(text)

    killed = sum(r["killed"] for r in results)
    print(f"\n{killed} of {len(results)} mutants killed ({100 * killed / max(1, len(results)):.1f} %)")
    for r in results:
        if not r["killed"]:
            print(f"  survived: relay.py:{r['line']}: {r['change']}")
    out = ROOT / "bench" / "results" / f"mutants-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    summary = {
        "commit": commit,
        "count": args.count,
        "seed": args.seed,
        "lines": args.lines,
        "again": str(args.again or "") or None,
        "killed": killed,
        "total": len(results),
        "mutants": results,
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
