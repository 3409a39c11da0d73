"""A seeded mutation pass, as a reviewer would run one: break one line, run the tests, see whether any fails.

Each mutation swaps one operator or name on a code line inside a function (`-` -> `+`, `<` -> `<=`, `mean` -> `sum`,
`argmin` -> `argmax`, `True` -> `False`, a dropped `.detach()`, ...; never in strings, comments, logging or input
checks), at most one per line, drawn per file with --seed. Each runs in a copy of the committed tree (git archive
HEAD) against the file's own tests, stopping at the first failure, and the table says which test caught it.
A surviving mutation is either a missing test or an equivalent mutation (no behaviour changes): read it.

Run:     python tests/mutate.py --files mae.py,common/vit.py --per-file 12 --seed 1 > mutations.md
Results: docs/FIDELITY.md#how-strong-the-tests-are
"""
import argparse
import ast
import io
import random
import re
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*", "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
         "and": "or", "or": "and", "True": "False", "False": "True", "mean": "sum", "sum": "mean", "max": "min",
         "min": "max", "argmin": "argmax", "argmax": "argmin", "softmax": "log_softmax", "cos": "sin", "exp": "log",
         "detach": ""}
METHODS = ("mean", "sum", "max", "min", "argmin", "argmax", "softmax", "cos", "exp")
NOT_METHOD_CODE = ("log(", "raise ", "print(", "UserError", "assert ", 'f"', "f'", "warn", "tqdm", "write_log", "help")
SKIP_FUNCTIONS = ("check", "main", "parse", "log", "bench", "help", "epilog", "__repr__", "write")
TESTS = {"common/vit.py": ["tests/test_common.py"], "common/data.py": ["tests/test_data.py", "tests/test_common.py"],
         "common/training.py": ["tests/test_common.py"], "common/evaluation.py": ["tests/test_evaluation.py"]}


def function_body_lines(source):
    """Line numbers inside functions that define the method (not input checks, main() wiring or logging)."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and not any(s in node.name for s in SKIP_FUNCTIONS):
            first = node.body[0]
            has_doc = ast.get_docstring(node) is not None
            lines |= set(range(first.end_lineno + 1 if has_doc else first.lineno, node.end_lineno + 1))
    return lines


def mutations(source):
    """Every candidate mutation of a file's source: (line number, original line, mutated line, description)."""
    lines, body = source.splitlines(), function_body_lines(source)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.OP, tokenize.NAME) or tok.string not in SWAPS:
            continue
        n, (a, b) = tok.start[0], (tok.start[1], tok.end[1])
        line = lines[n - 1]
        if n not in body or any(s in line for s in NOT_METHOD_CODE) or \
                line.lstrip().startswith(("def ", "class ", "@", "return f")):  # (return f...: mostly messages)
            continue
        if tok.string == "-" and line[b:b + 1] != " " or tok.string == "*" and line[a:a + 2] == "**":
            continue  # binary minus only; not the power operator
        if tok.string in METHODS and line[a - 1:a] != "." and line[a - 2:a] != "F.":
            continue  # a variable called mean/sum/...: only calls are swapped
        if tok.string == "detach":
            if line[b:b + 2] != "()":
                continue
            found.append((n, line, line[:a - 1] + line[b + 2:], "drop `.detach()`"))
        else:
            found.append((n, line, line[:a] + SWAPS[tok.string] + line[b:], f"`{tok.string}` -> `{SWAPS[tok.string]}`"))
    return found


def pick(path, source, per_file, seed):
    """per_file mutations of one file, at most one per line, a seeded draw (per file path); in line order."""
    candidates = mutations(source)
    random.Random(f"{seed}{path}").shuffle(candidates)
    chosen, used = [], set()
    for m in candidates:
        if m[0] not in used and len(chosen) < per_file:
            used.add(m[0])
            chosen.append(m)
    return sorted(chosen)


def first_failure(tree, path):
    """The first test of the file's own tests that fails with the mutation in place, or None."""
    for test in TESTS.get(path, [f"tests/test_{Path(path).stem}.py"]):
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", test],
                               cwd=tree, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"{test} (timeout)"
        if r.returncode:
            failed = re.search(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
            return failed.group(1) if failed else f"{test} (exit {r.returncode})"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", required=True, help="comma list of files, e.g. mae.py,common/vit.py")
    p.add_argument("--per-file", type=int, default=12, help="mutations drawn per file")
    p.add_argument("--seed", type=int, default=1, help="the draw")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        print("| file:line | mutation | mutated line | caught by |\n|---|---|---|---|")
        for path in args.files.split(","):
            target = Path(tree) / path
            original = target.read_text()
            for n, _, mutated, what in pick(path, original, args.per_file, args.seed):
                lines = original.split("\n")
                lines[n - 1] = mutated
                target.write_text("\n".join(lines))
                try:
                    caught = first_failure(tree, path)
                finally:
                    target.write_text(original)
                print(f"| {path}:{n} | {what} | `{mutated.strip()[:80]}` | {caught or 'NOT CAUGHT'} |", flush=True)


if __name__ == "__main__":
    main()
