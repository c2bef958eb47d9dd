"""The meta-test of the classroom exercises (EXERCISES.md, tests/exercises.py, tests/teacher.py).
Teacher's material: a handout leaves this file out.

Every exercise's check can fail. It runs in fresh pytest processes with the target swapped
(conftest.py's --exercise-swap, before any test module is imported): for a stub raising
NotImplementedError, where every one of its tests must fail (as many as EXERCISES.md promises), and
for each wrong version in tests/teacher.py, where the check must fail too. That the real
implementation passes is the normal suite's job (the same tests run there); the open-ended
exercise 9 has no implementation in the code, so its sample solution is swapped in and must pass.
Also: `blank` rewrites only the target's body, a blanked file fails its check end to end, a handout
holds no teacher's material and no solution text, and an unknown `--exercise N` is a one-line
error."""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import exercises
import teacher

ROOT = exercises.ROOT


def pytest_run(args, cwd=ROOT, first_failure=True):
    """Start `python -m pytest args` quietly (stopping at the first failure unless told not to)."""
    stop = ["-x"] if first_failure else []
    command = [sys.executable, "-m", "pytest", *stop, "-q", "-p", "no:cacheprovider", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def run(args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("n", sorted(exercises.EXERCISES))
def test_check_fails_with_a_stub_and_with_every_wrong_version(n):
    ex = exercises.EXERCISES[n]
    check = shlex.split(ex.check)
    assert os.path.exists(os.path.join(ROOT, check[0])), ex.check
    hows = ["stub"] + [f.__name__ for f in teacher.WRONG[n]]
    if n in teacher.SOLUTIONS:
        hows.append("solution")
    procs = {}
    for how in hows:  # in parallel; the stub runs every test of the check (each must fail)
        swap = ["--exercise-swap", f"{n}:{how}"]
        procs[how] = pytest_run([*check, *swap], first_failure=how != "stub")
    results = {how: finish(p) for how, p in procs.items()}
    problems = []
    rc, out = results.pop("stub")  # 1: tests ran, failed (5: none selected, 2-4: usage, internal)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if rc != 1 or f"NotImplementedError: EXERCISE {n}" not in out:
        problems.append(f"the stub of exercise {n} passed its check:\n{out}")
    elif not re.match(rf"{ex.passed} failed, \d+ deselected", summary):
        problems.append(f"with a stub all {ex.passed} tests of exercise {n} must fail: {summary}")
    if "solution" in results:
        rc, out = results.pop("solution")
        if rc != 0:
            problems.append(f"the sample solution of exercise {n} does not pass its check:\n{out}")
    for how, (rc, out) in results.items():
        if rc != 1 or "NotImplementedError" in out:
            problems.append(f"the wrong version {how} of exercise {n} passed its check:\n{out}")
    assert not problems, "\n".join(problems)


def test_exercises_md_states_each_checks_count_and_time():
    with open(os.path.join(ROOT, "EXERCISES.md")) as f:
        text = f.read()
    for n, ex in exercises.EXERCISES.items():
        section = text.split(f"\n### {n}. ")[1].split("\n### ")[0]
        assert f"`{ex.passed} passed" in section, f"EXERCISES.md {n}: say `{ex.passed} passed`"
        assert f"**Time:** {ex.minutes}" in section, f"EXERCISES.md {n}: give the time"


@pytest.mark.parametrize("n", sorted(exercises.EXERCISES))
def test_blank_replaces_only_the_body(n):
    ex = exercises.EXERCISES[n]
    path = exercises.source_file(n)
    with open(path) as f:
        src = f.read()
    new = exercises.blank_source(src, n)
    if new is None and n in teacher.SOLUTIONS:  # open-ended: the function does not exist (yet)
        return
    assert new is not None, f"{ex.target} not found in {path}"
    body = exercises.body_of(exercises.find_target(ast.parse(new), n))
    assert len(body) == 1 and isinstance(body[0], ast.Raise)
    assert f"EXERCISE {n}:" in ast.unparse(body[0])
    old_lines = src.splitlines()
    new_lines = new.splitlines()
    start = body[0].lineno - 1  # signature, decorators, docstring and all around are unchanged
    assert new_lines[:start] == old_lines[:start]
    assert new_lines[start + 1:] == old_lines[len(old_lines) - len(new_lines) + start + 1:]


def test_blanked_file_fails_its_check_end_to_end(tmp_path):
    """The teacher's in-place workflow on a copy of the repository: blank exercise 1, the student's
    check fails. (That it passes again with the reference body: the handout test below.)"""
    for f in os.listdir(ROOT):
        if f.endswith(".py") or f == "pytest.ini":
            shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(ROOT, "tests"), tmp_path / "tests", ignore=ignore)
    done = run(["tests/exercises.py", "blank", "1"], cwd=tmp_path)
    assert done.returncode == 0 and "blanked ausm:HistoryMarker.forward" in done.stdout, done.stderr
    listed = run(["tests/exercises.py", "list"], cwd=tmp_path)
    for n in exercises.EXERCISES:
        assert f"python -m pytest --exercise {n}" in listed.stdout, listed.stderr
    rc, out = finish(pytest_run(["--exercise", "1"], cwd=tmp_path))
    assert rc == 1 and "NotImplementedError: EXERCISE 1" in out, out


# ----------------------------------------------------------------------------- the handout
def normalised(line):
    """A source line without indentation and trailing comment: how a copied line would look."""
    return line.split("  #")[0].strip()


def solution_lines(n, root=ROOT):
    """The lines (20 characters or more) of exercise n's reference body that appear nowhere else
    in what a student receives (lines shared with, say, Mamba.forward are visible anyway)."""
    path = exercises.source_file(n, root)
    with open(path) as f:
        src = f.read()
    body = exercises.body_of(exercises.find_target(ast.parse(src), n))
    lines = src.splitlines()
    first = body[0].lineno - 1
    last = body[-1].end_lineno
    own = {normalised(x) for x in lines[first:last] if len(normalised(x)) >= 20}
    elsewhere = set()
    for rel in exercises.repository_files(root):
        if not rel.endswith((".py", ".md")) or rel.replace(os.sep, "/") in exercises.TEACHER_FILES:
            continue
        with open(os.path.join(root, rel)) as f:
            text = f.read().splitlines()
        if os.path.samefile(os.path.join(root, rel), path):
            text = text[:first] + text[last:]
        elsewhere |= {normalised(x) for x in text}
    return own - elsewhere


def leaks(folder, lines):
    """(file, line) for every one of `lines` that is a line (normalised) of a file under folder."""
    found = []
    for place, _, names in os.walk(folder):
        for name in names:
            try:
                with open(os.path.join(place, name)) as f:
                    text = f.read()
            except UnicodeDecodeError:  # the README's GIF
                continue
            present = {normalised(y) for y in text.splitlines()} & lines
            found += [(os.path.join(place, name), x) for x in present]
    return found


def paste_reference_back(folder, n):
    """Put exercise n's reference body (from the repository) in place of the stub in folder."""
    with open(exercises.source_file(n)) as f:
        reference = f.read()
    node = exercises.find_target(ast.parse(reference), n)
    first = exercises.body_of(node)[0].lineno - 1
    solved = reference.splitlines(keepends=True)[first:node.end_lineno]
    path = exercises.source_file(n, folder)
    with open(path) as f:
        mine = f.read().splitlines(keepends=True)
    stub = next(i for i, x in enumerate(mine) if f'raise NotImplementedError("EXERCISE {n}:' in x)
    with open(path, "w") as f:
        f.write("".join(mine[:stub] + solved + mine[stub + 1:]))


def test_handout_has_no_teacher_material_and_its_checks_work(tmp_path):
    out = tmp_path / "handout"
    blanked = [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    done = run(["tests/exercises.py", "handout", *map(str, blanked), "9", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    names = set()
    for place, _, files in os.walk(out):
        names |= {os.path.relpath(os.path.join(place, f), out).replace(os.sep, "/") for f in files}
    assert not os.path.exists(out / ".git") and not any(f.startswith(".git/") for f in names)
    assert not names & set(exercises.TEACHER_FILES)
    assert {"tests/exercises.py", "ausm.py", "EXERCISES.md"} <= names
    code = "".join((out / f).read_text() for f in names if f.endswith((".py", ".md")))
    versions = [f for n in teacher.WRONG for f in teacher.WRONG[n]]
    versions += list(teacher.SOLUTIONS.values())
    for version in versions:
        assert f"def {version.__name__}(" not in code, f"the handout holds {version.__name__}"
    lines = {n: solution_lines(n) for n in blanked}
    assert all(lines.values()), f"no distinctive solution line to look for: {lines}"
    found = leaks(out, set().union(*lines.values()))
    assert not found, f"solution text in the handout: {found}"
    spy = tmp_path / "spy"  # the leak detector itself finds a copied reference
    spy.mkdir()
    shutil.copy(os.path.join(ROOT, "ausm.py"), spy / "ausm_copy.py")
    assert leaks(spy, lines[1]) and leaks(spy, lines[2])
    rc, text = finish(pytest_run(["--exercise", "1"], cwd=out))  # the check fails on the blank ...
    assert rc == 1 and "NotImplementedError: EXERCISE 1" in text, text
    paste_reference_back(out, 1)
    rc, text = finish(pytest_run(["--exercise", "1"], cwd=out))  # ... passes with the reference
    assert rc == 0 and f"{exercises.EXERCISES[1].passed} passed" in text, text
    swap = run(["-m", "pytest", "-q", "--exercise", "1", "--exercise-swap", "1:marker_sum"],
               cwd=out)
    assert swap.returncode == 4 and "needs tests/teacher.py" in swap.stderr  # no teacher.py there
    assert "INTERNALERROR" not in swap.stdout + swap.stderr


def test_handout_refuses_an_existing_folder(tmp_path):
    done = run(["tests/exercises.py", "handout", "1", "--out", str(tmp_path)])
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "exists" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_unknown_exercise_is_a_one_line_error():
    unknown = max(exercises.EXERCISES) + 1
    done = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--exercise", str(unknown)])
    assert done.returncode == 4, done.stdout + done.stderr  # a usage error, not 3 (internal error)
    assert "INTERNALERROR" not in done.stdout + done.stderr
    known = sorted(exercises.EXERCISES)
    want = f"ERROR: --exercise {unknown}: there are exercises {known}; see EXERCISES.md"
    assert done.stderr.strip().splitlines() == [want], done.stderr
