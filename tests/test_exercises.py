"""The meta-test of the classroom exercises (EXERCISES.md, tests/exercises.py, tests/teacher.py). Teacher's
material: a handout leaves this file out.

Every exercise's check can fail: it runs in a fresh pytest process with the target swapped (conftest.py's
--exercise-swap, before any test module is imported) for a stub raising NotImplementedError, where every one of
its tests must fail (and their number is the one EXERCISES.md promises), and for each wrong version in
tests/teacher.py, where the check must fail too. That the real implementation passes is the normal suite's job
(the same tests run there); the open-ended exercise 9 has no implementation in the code, so its sample solution
is swapped in and must pass. Also: `blank` rewrites only the target's body, a blanked file fails its check end
to end, a handout holds no teacher's material and no solution text, and `--exercise 10` is a one-line error."""
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
    """Start `python -m pytest args` quietly (stopping at the first failure unless told otherwise)."""
    stop = ["-x"] if first_failure else []
    return subprocess.Popen([sys.executable, "-m", "pytest", *stop, "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.parametrize("n", sorted(exercises.EXERCISES))
def test_check_fails_with_a_stub_and_with_every_wrong_version(n):
    ex = exercises.EXERCISES[n]
    check = shlex.split(ex.check)
    assert os.path.exists(os.path.join(ROOT, check[0])), ex.check
    hows = ["stub"] + [f.__name__ for f in teacher.WRONG[n]] + ["solution"] * (n in teacher.SOLUTIONS)
    procs = {}
    for how in hows:  # in parallel; the stub runs every test of the check (each must fail)
        procs[how] = pytest_run([*check, "--exercise-swap", f"{n}:{how}"], first_failure=how != "stub")
    results = {how: finish(p) for how, p in procs.items()}
    problems = []
    rc, out = results.pop("stub")  # 1 = tests ran and failed (not 5 = none selected, not 2-4 = usage or internal)
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if rc != 1 or f"NotImplementedError: EXERCISE {n}" not in out:
        problems.append(f"the stub of exercise {n} passed its check:\n{out}")
    elif not re.match(rf"{ex.passed} failed, \d+ deselected", summary):
        problems.append(f"with a stub, all {ex.passed} tests of exercise {n} (EXERCISES.md) must fail: {summary}")
    if "solution" in results:
        rc, out = results.pop("solution")
        if rc != 0:
            problems.append(f"the sample solution of exercise {n} does not pass its check:\n{out}")
    for how, (rc, out) in results.items():
        if rc != 1 or "NotImplementedError" in out:
            problems.append(f"the wrong version {how} of exercise {n} passed its check:\n{out}")
    assert not problems, "\n".join(problems)


def test_exercises_md_states_each_checks_count_and_time():
    text = open(os.path.join(ROOT, "EXERCISES.md")).read()
    for n, ex in exercises.EXERCISES.items():
        section = text.split(f"\n### {n}. ")[1].split("\n### ")[0]
        assert f"`{ex.passed} passed" in section, f"EXERCISES.md, exercise {n}: say it ends with {ex.passed} passed"
        assert f"**Time:** {ex.minutes}" in section, f"EXERCISES.md, exercise {n}: give the time, {ex.minutes}"


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
    assert len(body) == 1 and isinstance(body[0], ast.Raise) and f"EXERCISE {n}:" in ast.unparse(body[0])
    old_lines = src.splitlines()
    new_lines = new.splitlines()
    start = body[0].lineno - 1  # the signature, decorators, docstring and everything around are unchanged
    assert new_lines[:start] == old_lines[:start]
    assert new_lines[start + 1:] == old_lines[len(old_lines) - len(new_lines) + start + 1:]


def test_blanked_file_fails_its_check_end_to_end(tmp_path):
    """The teacher's workflow on a copy of the repo: blank exercise 1, the student's check fails, restore, passes."""
    for f in os.listdir(ROOT):
        if f.endswith(".py") or f == "pytest.ini":
            shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    shutil.copytree(os.path.join(ROOT, "tests"), tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    pristine = (tmp_path / "ausm.py").read_text()
    done = subprocess.run([sys.executable, "tests/exercises.py", "blank", "1"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "blanked ausm:HistoryMarker.forward" in done.stdout, done.stderr
    listed = subprocess.run([sys.executable, "tests/exercises.py", "list"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert all(f"python -m pytest --exercise {n}" in listed.stdout for n in exercises.EXERCISES), listed.stderr
    rc, out = finish(pytest_run(["--exercise", "1"], cwd=tmp_path))
    assert rc == 1 and "NotImplementedError: EXERCISE 1" in out, out
    (tmp_path / "ausm.py").write_text(pristine)
    rc, out = finish(pytest_run(["--exercise", "1"], cwd=tmp_path))
    assert rc == 0, out


# ----------------------------------------------------------------------------- the handout
def normalised(line):
    """A source line without indentation and trailing comment: how a copied solution line would look."""
    return line.split("  #")[0].strip()


def solution_lines(n, root=ROOT):
    """The lines of exercise n's reference body that appear nowhere else in what a student receives (other
    lines, like Mamba.forward's, are visible anyway): at least 20 characters each."""
    path = exercises.source_file(n, root)
    src = open(path).read()
    body = exercises.body_of(exercises.find_target(ast.parse(src), n))
    lines = src.splitlines()
    first = body[0].lineno - 1
    last = body[-1].end_lineno
    own = {normalised(x) for x in lines[first:last] if len(normalised(x)) >= 20}
    elsewhere = set()
    for rel in exercises.repository_files(root):
        if rel.endswith((".py", ".md")) and rel.replace(os.sep, "/") not in exercises.TEACHER_FILES:
            text = open(os.path.join(root, rel)).read().splitlines()
            if os.path.abspath(os.path.join(root, rel)) == os.path.abspath(path):
                text = text[:first] + text[last:]
            elsewhere |= {normalised(x) for x in text}
    return own - elsewhere


def leaks(folder, lines):
    """(file, line) for every solution line that is a line (normalised) of a file under folder."""
    found = []
    for place, dirs, names in os.walk(folder):
        for name in names:
            try:
                text = open(os.path.join(place, name)).read()
            except UnicodeDecodeError:  # the README's GIF
                continue
            found += [(os.path.join(place, name), x) for x in {normalised(y) for y in text.splitlines()} & lines]
    return found


def test_handout_has_no_teacher_material_and_its_checks_work(tmp_path):
    out = tmp_path / "handout"
    blanked = [1, 2, 3, 4, 5, 6, 7, 8]
    done = subprocess.run([sys.executable, "tests/exercises.py", "handout", *map(str, blanked), "9", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = {os.path.relpath(os.path.join(p, f), out).replace(os.sep, "/") for p, _, fs in os.walk(out) for f in fs}
    assert not os.path.exists(out / ".git") and not any(f.startswith(".git/") for f in names)
    assert not names & set(exercises.TEACHER_FILES) and "tests/exercises.py" in names and "ausm.py" in names
    everything = "".join(open(out / f).read() for f in names if f.endswith((".py", ".md")))
    for version in [*(f for n in teacher.WRONG for f in teacher.WRONG[n]), *teacher.SOLUTIONS.values()]:
        assert f"def {version.__name__}(" not in everything, f"the handout holds {version.__name__}"
    lines = {n: solution_lines(n) for n in blanked}
    assert all(lines.values()), f"no distinctive solution line to look for: {lines}"
    found = leaks(out, set().union(*lines.values()))
    assert not found, f"solution text in the handout: {found}"
    spy = tmp_path / "spy"  # the leak detector itself finds a copied reference
    spy.mkdir()
    shutil.copy(os.path.join(ROOT, "ausm.py"), spy / "ausm_copy.py")
    assert leaks(spy, lines[1]) and leaks(spy, lines[2])
    rc, text = finish(pytest_run(["--exercise", "1"], cwd=out))  # the student's check: fails on the blank ...
    assert rc == 1 and "NotImplementedError: EXERCISE 1" in text, text
    reference = open(os.path.join(ROOT, "ausm.py")).read()
    node = exercises.find_target(ast.parse(reference), 1)
    body = exercises.body_of(node)
    solved = reference.splitlines(keepends=True)[body[0].lineno - 1:node.end_lineno]
    mine = (out / "ausm.py").read_text().splitlines(keepends=True)
    stub = next(i for i, x in enumerate(mine) if 'raise NotImplementedError("EXERCISE 1:' in x)
    (out / "ausm.py").write_text("".join(mine[:stub] + solved + mine[stub + 1:]))
    rc, text = finish(pytest_run(["--exercise", "1"], cwd=out))  # ... and passes with the reference copied back
    assert rc == 0 and f"{exercises.EXERCISES[1].passed} passed" in text, text
    swap = subprocess.run([sys.executable, "-m", "pytest", "-q", "--exercise", "1", "--exercise-swap", "1:marker_sum"],
                          cwd=out, capture_output=True, text=True)  # no teacher.py: a one-line usage error
    assert swap.returncode == 4 and "needs tests/teacher.py" in swap.stderr and "INTERNALERROR" not in swap.stderr


def test_handout_refuses_an_existing_folder(tmp_path):
    done = subprocess.run([sys.executable, "tests/exercises.py", "handout", "1", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "exists" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_unknown_exercise_is_a_one_line_error():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--exercise", "10"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error, not 3 (internal error)
    assert "INTERNALERROR" not in done.stdout + done.stderr
    want = f"ERROR: --exercise 10: there are exercises {sorted(exercises.EXERCISES)}; see EXERCISES.md"
    assert done.stderr.strip().splitlines() == [want], done.stderr
