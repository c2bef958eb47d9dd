"""Classroom exercises (EXERCISES.md): the table, the teacher's `blank` and `handout` commands.

    python tests/exercises.py list
        the table: number, target, paper section, expected time, checking command
    python tests/exercises.py blank N
        replace exercise N's body in its source file (in place) by
        raise NotImplementedError("EXERCISE N: ..."); `git checkout -- FILE` restores it
    python tests/exercises.py handout N [N ...] --out DIR
        a student copy in DIR: the repository's tracked files, exercises N ... blanked,
        no git history, none of the teacher's material (TEACHER_FILES)
    python -m pytest --exercise N
        run exercise N's checking tests (what a student runs when done)

Each exercise names a target "module:qualname" and the tests that check it ("file -k expr").
The teacher's material is not in a handout: tests/teacher.py (wrong versions, the sample
solution), tests/test_exercises.py (the meta-test proving that each check rejects a stub and
every wrong version) and TEACHER.md.
"""
import argparse
import ast
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_FILES = ("tests/teacher.py", "tests/test_exercises.py", "TEACHER.md")  # not in a handout
SKIPPED_DIRS = (".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache")  # walk, no git


@dataclass(frozen=True)
class Exercise:
    title: str
    target: str    # "module:qualname" of the function the student writes
    section: str   # where the paper (or Mamba, or DAVIS) defines it
    check: str     # "tests/test_x.py -k expr": the tests that must pass
    minutes: str   # the expected time for a student who has read the paper's section
    passed: int    # how many tests `python -m pytest --exercise N` runs (and passes when done)


EXERCISES = {
    1: Exercise("History Marker: paint ID vectors on the feature map",
                "ausm:HistoryMarker.forward", "AUSM Sec. 2.2 (History Marker / Token Mark)",
                "tests/test_ausm.py -k history_marker", "20-30", 6),
    2: Exercise("Mamba block, one recurrent step (conv state + SSM state)", "ausm:Mamba.step",
                "AUSM Sec. 2.2 (History Compressor), Mamba Sec. 3.4",
                "tests/test_ausm.py -k mamba_step", "30-45", 3),
    3: Exercise("Selective scan, the reference loop", "kernels:selective_scan_ref",
                "Mamba Sec. 3.2, Alg. 2",
                "tests/test_exercise_oracles.py -k scan_closed_form", "30-45", 6),
    4: Exercise("Selective scan, the Triton forward kernel", "kernels:_scan_fwd_kernel",
                "Mamba Sec. 3.3 (hardware-aware scan)",
                "tests/test_kernels.py -k triton_matches", "60-90", 5),
    5: Exercise("Teacher forcing: switch times, detection vs tracking targets", "train:preprocess",
                "AUSM Sec. 2.3, Alg. 2",
                "tests/test_train.py -k preprocess", "60-90", 3),
    6: Exercise("Hungarian matching of detection queries", "train:hungarian",
                "AUSM Sec. 2.3 (L_det), DETR",
                "tests/test_train.py -k hungarian", "60-120", 11),
    7: Exercise("DAVIS boundary measure F", "infer:davis_f",
                "AUSM Sec. 3 (DAVIS 2017 J&F)",
                "tests/test_infer.py -k 'davis_golden or davis_empty'", "30-45", 7),
    8: Exercise("Test-time repetition order", "infer:segment",
                "AUSM Sec. 3.4",
                "tests/test_infer.py -k tts", "20-30", 5),
    9: Exercise("Open-ended: box prompts become mask prompts", "infer:box_to_mask",
                "AUSM future work (boxes, points); PAPER.md Sec. 6",
                "tests/test_exercise_oracles.py -k box_prompt", "a project (hours)", 1),
    10: Exercise("The one-frame shift: E_t = X_{t-1} + S_t, the start token X_0", "ausm:AUSM.embed",
                 "AUSM Sec. 2.1 (Eq. 2), Sec. 2.3 (Alg. 2)",
                 "tests/test_ausm.py -k 'parallel_equals_recurrent or causality or "
                 "compressor_sees_the_previous_frame_not_the_current[False] or "
                 "every_parameter_gets_gradient'", "20-30", 6),
    11: Exercise("Tracking loss: fixed query <-> instance, absent = no object",
                 "train:_tracking_loss", "AUSM Sec. 2.3 (L_trk), Alg. 2",
                 "tests/test_train.py -k criterion", "45-60", 5),
    12: Exercise("Detection loss: Hungarian matching per frame, no-object weight",
                 "train:_detection_loss", "AUSM Sec. 2.3 (L_det), Mask2Former",
                 "tests/test_train.py -k criterion", "45-60", 5),
    13: Exercise("Alg. 1's allocation of new IDs", "infer:Segmenter._allocate",
                 "AUSM Alg. 1 l.15-19 (Sampler(B \\ A_{t-1})); PAPER.md Sec. 3, 6",
                 "tests/test_alg1.py -k 'streaming_segmenter or every_detection "
                 "or sampler_is_seeded or buffer_is_full'", "30-45", 5),
}
ORIGINALS = {}  # exercise -> the implementation a swap replaced (wrong versions may wrap it)


def _resolve(target):
    """'module:Class.method' -> (the object holding the last name, that name)."""
    mod, _, qual = target.partition(":")
    owner = importlib.import_module(mod)
    for name in qual.split(".")[:-1]:
        owner = getattr(owner, name)
    return owner, qual.split(".")[-1]


class Stub:
    """Raises NotImplementedError when called, or launched as a Triton kernel (stub[grid](...))."""

    def __init__(self, n):
        self.n = n

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        target = EXERCISES[self.n].target
        message = f"EXERCISE {self.n}: {target} is yours to write; see EXERCISES.md"
        raise NotImplementedError(message)


def swap(n, how):
    """Replace exercise n's target (conftest's --exercise-swap N:HOW): HOW = stub, solution (the
    open-ended exercise's sample) or the name of one of its wrong versions in tests/teacher.py."""
    if n not in EXERCISES:
        raise ValueError(f"--exercise-swap {n}:{how}: there are exercises {sorted(EXERCISES)}")
    if how == "stub":
        new = Stub(n)
    else:
        try:
            import teacher
        except ImportError:
            raise ValueError(f"--exercise-swap {n}:{how} needs tests/teacher.py, the teacher's "
                             "material (a handout leaves it out); only N:stub works without it"
                             ) from None
        versions = {f.__name__: f for f in teacher.WRONG[n]}
        if n in teacher.SOLUTIONS:
            versions["solution"] = teacher.SOLUTIONS[n]
        if how not in versions:
            raise ValueError(f"--exercise-swap {n}:{how}: expected stub or one of "
                             f"{sorted(versions)}")
        new = versions[how]
        if new in teacher.FACTORIES:
            new = new()
    owner, name = _resolve(EXERCISES[n].target)
    ORIGINALS[n] = getattr(owner, name, None)
    setattr(owner, name, new)


# ----------------------------------------------------------------------------- blank
def find_target(tree, n):
    """The ast node of exercise n's target in a parsed module; None where it does not exist."""
    node = tree
    for name in EXERCISES[n].target.partition(":")[2].split("."):
        found = None
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef)) and child.name == name:
                found = child
        if found is None:
            return None
        node = found
    return node


def body_of(node):
    """The statements of a function after its docstring (all of them if it has none or only one)."""
    if ast.get_docstring(node) is not None and len(node.body) > 1:
        return node.body[1:]
    return node.body


def blank_source(src, n):
    """The source text with exercise n's function body replaced by a NotImplementedError
    (signature, decorators, comments and docstring kept). None when the target does not exist
    in the file (an open-ended exercise)."""
    node = find_target(ast.parse(src), n)
    if node is None:
        return None
    body = body_of(node)
    lines = src.splitlines(keepends=True)
    first = body[0].lineno - 1  # 0-based first line of the code
    last = node.end_lineno  # end (exclusive)
    indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
    message = f"EXERCISE {n}: {EXERCISES[n].title}; see EXERCISES.md"
    stub = f'{indent}raise NotImplementedError("{message}")\n'
    return "".join(lines[:first]) + stub + "".join(lines[last:])


def source_file(n, root=ROOT):
    return os.path.join(root, EXERCISES[n].target.partition(":")[0] + ".py")


def blank_file(n, root=ROOT):
    """Blank exercise n in its file under root, written whole (temp name + os.replace).
    False for an open-ended exercise (nothing to blank)."""
    path = source_file(n, root)
    with open(path) as f:
        new = blank_source(f.read(), n)
    if new is None:
        return False
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)
    return True


# ----------------------------------------------------------------------------- handout
def repository_files(root=ROOT):
    """The repository's files, relative to root: git's tracked files (as they are in the working
    tree), or, without git, every file outside SKIPPED_DIRS."""
    try:
        done = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, text=True)
    except FileNotFoundError:  # no git installed
        done = None
    if done is not None and done.returncode == 0 and done.stdout:
        names = [f for f in done.stdout.split("\0") if f]
        return [f for f in names if os.path.isfile(os.path.join(root, f))]  # not deleted since
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in sorted(names):
            if name != ".git" and not name.endswith(".pyc"):
                files.append(os.path.relpath(os.path.join(folder, name), root))
    return files


def handout_note(numbers, open_ones):
    """The line put at the top of the handout's EXERCISES.md."""
    new = "".join(f"; exercise {n} is a function to add" for n in open_ones)
    return (f"> **This copy:** exercises {', '.join(map(str, numbers))} are yours to write (their "
            f"functions raise NotImplementedError{new}). Check each with "
            "`python -m pytest --exercise N`.\n\n")


def handout(numbers, out, root=ROOT):
    """Write the student copy of the repository to `out` (a new folder), exercises `numbers`
    blanked. Built in a temporary folder beside `out` and renamed when complete."""
    out = os.path.abspath(out)
    root = os.path.abspath(root)
    if os.path.exists(out):
        raise ValueError(f"--out {out} exists; give a new folder (the handout never overwrites)")
    if os.path.commonpath([out, root]) == root:
        raise ValueError(f"--out {out} is inside the repository; give a folder outside it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    try:
        for rel in repository_files(root):
            if rel.replace(os.sep, "/") in TEACHER_FILES:
                continue
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(tmp, rel))
        open_ones = [n for n in numbers if not blank_file(n, tmp)]
        exercises_md = os.path.join(tmp, "EXERCISES.md")
        if os.path.exists(exercises_md):
            with open(exercises_md) as f:
                text = f.read()
            with open(exercises_md, "w") as f:
                f.write(handout_note(numbers, open_ones) + text)
        os.rename(tmp, out)  # whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- command line
def exercise_number(text):
    if not text.isdigit() or int(text) not in EXERCISES:
        raise argparse.ArgumentTypeError(f"{text!r}: there are exercises {sorted(EXERCISES)}")
    return int(text)


def print_list():
    for n, ex in EXERCISES.items():
        unit = " min" if ex.minutes[0].isdigit() else ""
        print(f"{n}. {ex.title} ({ex.minutes}{unit})")
        print(f"   {ex.target}  ({ex.section})")
        print(f"   python -m pytest --exercise {n}   "
              f"(= python -m pytest {ex.check}; {ex.passed} passed when done)")


def main(argv):
    p = argparse.ArgumentParser(prog="python tests/exercises.py",
                                description="Classroom exercises (EXERCISES.md).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, their paper sections, expected times and checks")
    b = sub.add_parser("blank", help="blank one exercise in place (git checkout -- FILE restores)")
    b.add_argument("n", type=exercise_number)
    h = sub.add_parser("handout", help="write a student copy: tracked files, exercises blanked, "
                       "no git history, no teacher's material")
    h.add_argument("n", type=exercise_number, nargs="+")
    h.add_argument("--out", required=True, help="a new folder outside the repository")
    args = p.parse_args(argv)
    if args.command == "list":
        print_list()
        return 0
    if args.command == "blank":
        target = EXERCISES[args.n].target
        if not blank_file(args.n):
            print(f"exercise {args.n} is open-ended: {target} does not exist yet, nothing to blank")
            return 0
        path = source_file(args.n)
        print(f"blanked {target} in {path}; check with: python -m pytest --exercise {args.n}; "
              f"restore with: git checkout -- {os.path.basename(path)}")
        return 0
    numbers = sorted(set(args.n))
    try:
        handout(numbers, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a student copy to {os.path.abspath(args.out)} with exercises {numbers} blanked; "
          f"left out: {', '.join(TEACHER_FILES)} and the git history")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
