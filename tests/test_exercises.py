"""The meta-test of the classroom exercises (EXERCISES.md, tests/exercises.py): every exercise's checking test
can fail. For each exercise its check runs in a fresh pytest process with the target swapped (conftest.py's
--exercise-swap, before any test module is imported) for a stub raising NotImplementedError and for a subtly
wrong version; both runs must fail. That the real implementation passes is the normal suite's job (the same
tests run there); the open-ended exercise 9 has no implementation in the code, so its sample solution is swapped
in and must pass. Also: `blank` rewrites only the target's body, and a blanked file fails its check end to end."""
import ast
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import exercises

ROOT = exercises.ROOT


def pytest_run(args, cwd=ROOT):
    """Start `python -m pytest args` quietly, stopping at the first failure."""
    return subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.parametrize("n", sorted(exercises.EXERCISES))
def test_check_fails_with_a_stub_and_with_the_wrong_version(n):
    ex = exercises.EXERCISES[n]
    assert os.path.exists(os.path.join(ROOT, shlex.split(ex.check)[0])), ex.check
    hows = ["stub", "wrong"] + ["solution"] * (ex.solution is not None)
    procs = {how: pytest_run([*shlex.split(ex.check), "--exercise-swap", f"{n}:{how}"]) for how in hows}  # in parallel
    results = {how: finish(p) for how, p in procs.items()}
    rc, out = results["stub"]  # 1 = tests ran and failed (not 5 = none selected, not 2-4 = usage or internal error)
    assert rc == 1 and f"NotImplementedError: EXERCISE {n}" in out, f"the stub of exercise {n} passed:\n{out}"
    rc, out = results["wrong"]
    assert rc == 1 and "NotImplementedError" not in out, f"the wrong version of exercise {n} passed its check:\n{out}"
    if ex.solution is not None:
        rc, out = results["solution"]
        assert rc == 0, f"the sample solution of exercise {n} does not pass its check:\n{out}"


@pytest.mark.parametrize("n", sorted(exercises.EXERCISES))
def test_blank_replaces_only_the_body(n):
    ex = exercises.EXERCISES[n]
    path = os.path.join(ROOT, ex.target.partition(":")[0] + ".py")
    with open(path) as f:
        src = f.read()
    new = exercises.blank_source(src, n)
    if new is None and ex.solution is not None:  # open-ended: the function does not exist (yet)
        return
    assert new is not None, f"{ex.target} not found in {path}"
    node = ast.parse(new)
    for name in ex.target.partition(":")[2].split("."):
        node = next(c for c in node.body if isinstance(c, (ast.ClassDef, ast.FunctionDef)) and c.name == name)
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    assert len(body) == 1 and isinstance(body[0], ast.Raise) and f"EXERCISE {n}:" in ast.unparse(body[0])
    old_lines, new_lines = src.splitlines(), new.splitlines()
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
