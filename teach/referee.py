"""The teaching kit's plumbing (a reader of the method may skip it): the pytest plugin of `teach/run.py grade`.

The grader runs the project's own tests in a pytest process of the teacher's, with this plugin (-p teach.referee)
and a plan (TEACH_PLAN: which functions, the student's def of each, the time limits). Every graded function is
replaced by a switch: during a test that grades it, a call goes to a child process that holds the student's def
among the reference code (teach/sandbox.py), and the value comes back as plain data; at every other moment the
switch calls the reference. So the test, its asserts, pytest and the report never share a process with the
student's code, and each function is graded with the reference versions of the others.

Each case is written to TEACH_RESULTS as one JSON line the moment pytest reports it, so a run that is killed
keeps the cases it finished; the grader fails every collected case without a line.
"""

import functools
import importlib
import json
import os
import sys
import time

import pytest

from teach import sandbox

PLAN = None  # the plan, once loaded
ACTIVE = None  # the function whose test is running, else None
CASE = {"spent": 0.0, "id": None}  # seconds the running case's calls took
FUNCTIONS = {}  # name -> Graded
RESULTS = None  # the open results file


def write(record):
    RESULTS.write(json.dumps(record) + "\n")
    RESULTS.flush()


class Graded:
    """One graded function: its child (started on the first call, again after a kill) and its clock."""

    def __init__(self, name, spec, limits, root):
        self.name, self.spec, self.root = name, spec, root
        self.case, self.budget = limits["case"], limits["function"]
        self.spent, self.child, self.starts = 0.0, None, 0
        self.timed_out, self.trace = set(), {}

    def files(self):
        script = self.spec["script"]
        return sandbox.project_modules(self.root, {script: self.spec["module_source"]})

    def call(self, args, kwargs):
        case_left = self.case - CASE["spent"]
        budget_left = self.budget - self.spent
        if budget_left <= 0 or case_left <= 0:
            self.timed_out.add(CASE["id"])
            which = (
                f"its {self.budget:g} s for all its cases"
                if budget_left <= 0
                else f"the {self.case:g} s of this case"
            )
            raise sandbox.StudentTimeout(f"{self.name} used up {which}; not run")
        t0, child = time.monotonic(), self.child
        try:
            if child is None:
                setup = {"mode": "function", "module": self.spec["module"], "function": self.name}
                child = self.child = sandbox.Child(self.files(), setup, self.root, self.budget + 30)
                self.starts += 1
                write({"isolation": child.isolation, "warnings": child.warnings})
                if self.starts == 1:  # importing the project is the teacher's time, once
                    t0 = time.monotonic()
            return child.call(args, kwargs, min(case_left, budget_left))
        except sandbox.StudentTimeout:
            self.timed_out.add(CASE["id"])
            self.close()
            raise sandbox.StudentTimeout(
                f"{self.name} ran past its time limit ({self.case:g} s a case, {self.budget:g} s in all):"
                " an endless loop?"
            ) from None
        except sandbox.StudentCrash:
            self.close()
            raise
        except Exception:
            self.trace[CASE["id"]] = getattr(child, "last_trace", "")
            raise
        finally:
            took = time.monotonic() - t0 - getattr(child, "loading", 0.0)  # loading a model: ours
            self.spent += took
            CASE["spent"] += took

    def close(self):
        if self.child is not None:
            self.child.kill()
            self.child = None


def switch(name, reference):
    """What the module holds under `name` during grading: the student's function (in its child) during a test of
    `name`, the reference otherwise."""

    @functools.wraps(reference)
    def call(*args, **kwargs):
        if ACTIVE == name:
            return FUNCTIONS[name].call(args, kwargs)
        return reference(*args, **kwargs)

    call.__teach_reference__ = reference
    return call


def install():
    """Replace each graded function by its switch, in its module and wherever a module imported it by name."""
    for name, spec in PLAN["functions"].items():
        module = importlib.import_module(spec["module"])
        reference = getattr(module, name)
        FUNCTIONS[name] = Graded(name, spec, PLAN["limits"], PLAN["root"])
        swapped = switch(name, reference)
        for other in list(sys.modules.values()):
            if getattr(other, name, None) is reference:
                setattr(other, name, swapped)


# ================================================================ hooks
def pytest_configure(config):
    global PLAN, RESULTS
    path = os.environ.get("TEACH_PLAN")
    if not path:
        return
    with open(path) as f:
        PLAN = json.load(f)
    RESULTS = open(os.environ["TEACH_RESULTS"], "a", encoding="utf-8")
    install()


def pytest_collection_modifyitems(session, config, items):
    if PLAN is None:
        return
    write({"collected": {item.nodeid: item_function(item.nodeid) for item in items}})


def item_function(nodeid):
    """The graded function a test case belongs to (PLAN's tests), or None."""
    return {t: n for n, ids in PLAN["tests"].items() for t in ids}.get(nodeid.split("[")[0])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    global ACTIVE
    if PLAN is not None:
        ACTIVE = item_function(item.nodeid)
        CASE.update(spent=0.0, id=item.nodeid)


def pytest_runtest_teardown(item):
    global ACTIVE
    ACTIVE = None


def pytest_runtest_logreport(report):
    if PLAN is None or (report.passed and report.when != "call"):
        return
    message, text = "", ""
    if report.failed or report.skipped:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        message = (message.strip().splitlines() or [report.outcome])[0]
        text = report.longreprtext[-6000:]
    graded = FUNCTIONS.get(item_function(report.nodeid))
    write(
        {
            "case": report.nodeid,
            "when": report.when,
            "passed": report.passed and not report.skipped,
            "message": message,
            "report": text,
            "timeout": bool(graded and report.nodeid in graded.timed_out),
            "trace": graded.trace.get(report.nodeid, "") if graded else "",
        }
    )


def pytest_unconfigure(config):
    for graded in FUNCTIONS.values():
        graded.close()
    if RESULTS is not None:
        RESULTS.close()
