"""The teaching kit's plumbing (a reader of the method may skip it): the program of a student's process, started by
teach/sandbox.py in a fresh temporary folder that holds this file, teach/wire.py, the project's modules with the
student's function in place, and setup.json. It leaves its parent at once (the process that started it ends, so no
parent's /proc entry names the teacher's folder), drops what Linux lets an unprivileged process drop (a user and
network namespace, Landlock, resource limits), then serves: in "function" mode it calls the student's function on
the arguments the grader sends; in "tests" mode it runs the student's test file with pytest, the functions under
test calling back to the grader, which holds them. Only plain data (teach/wire.py) goes back.

    python -I teach/child.py SOCKET_FD LIFE_FD        # cwd: the temporary folder; the grader starts it
"""

import ctypes
import importlib
import json
import os
import shutil
import sys
import threading
import traceback

sys.path.insert(0, os.getcwd())  # -I leaves the script's folder off sys.path
from teach import wire  # noqa: E402

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK = dict(create=444, add_rule=445, restrict=446)  # the same numbers on x86_64 and arm64
FS_READ = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
FS_FILE = 1 | 2 | 4  # the rights a rule on a single file may carry: EXECUTE, WRITE_FILE, READ_FILE
FS_ALL_V1 = (1 << 13) - 1  # every access right of Landlock ABI 1
LIBC = ctypes.CDLL(None, use_errno=True)


# ================================================================ isolation (best effort, each step says what it did)
def leave_parent():
    """Fork and let the parent end: this process is adopted by init (or the nearest subreaper)."""
    if os.fork():
        os._exit(0)


def own_network():
    """A user and a network namespace of our own (no root needed where unprivileged namespaces are on): no
    network, not even the machine's loopback."""
    if not sys.platform.startswith("linux"):
        return "no network namespace (not Linux)"
    uid, gid = os.getuid(), os.getgid()
    if LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return f"no network namespace ({os.strerror(ctypes.get_errno())})"
    for name, text in (
        ("uid_map", f"{uid} {uid} 1"),
        ("setgroups", "deny"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            pass
    return "network namespace (no network)"


def landlock(read, write):
    """Landlock: files may be read only under `read` (the Python installation, system libraries) and written only
    under `write` (this process's folder); with ABI 4+ no TCP at all, with ABI 6+ no signal and no abstract socket
    beyond this process. Ptrace and /proc/PID/{cwd,environ,mem,fd} of other processes are refused too."""
    if not sys.platform.startswith("linux"):
        return "no Landlock (not Linux)"
    abi = LIBC.syscall(SYS_LANDLOCK["create"], None, 0, 1)
    if abi < 1:
        return f"no Landlock ({os.strerror(ctypes.get_errno())})"
    fs = FS_ALL_V1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    fs |= 1 << 15 if abi >= 5 else 0
    fields = [fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0][: 1 + (abi >= 4) + (abi >= 6)]
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = LIBC.syscall(SYS_LANDLOCK["create"], ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        return f"no Landlock ({os.strerror(ctypes.get_errno())})"

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        rule = Beneath(rights if os.path.isdir(path) else rights & (FS_FILE | 1 << 14), fd)
        LIBC.syscall(SYS_LANDLOCK["add_rule"], ruleset, 1, ctypes.byref(rule), 0)
        os.close(fd)

    for path in read:
        allow(path, FS_READ)
    allow(write, fs)
    allow(os.devnull, FS_READ | 2 | (1 << 14 if abi >= 3 else 0))
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return "no Landlock (no_new_privs refused)"
    if LIBC.syscall(SYS_LANDLOCK["restrict"], ruleset, 0) != 0:
        return f"no Landlock ({os.strerror(ctypes.get_errno())})"
    os.close(ruleset)
    return (
        f"Landlock ABI {abi} (reads: Python and system folders; writes: its own folder"
        + ("; no TCP" if abi >= 4 else "")
        + ("; no signals out" if abi >= 6 else "")
        + ")"
    )


def resource_limits(limits):
    import resource

    said = []
    for name, value in limits.items():
        which = getattr(resource, f"RLIMIT_{name.rstrip('_').upper()}", None)
        if which is None:
            continue
        hard = value + 5 if name == "cpu" else value
        try:
            resource.setrlimit(which, (value, hard))
            said.append(name.rstrip("_"))
        except (ValueError, OSError):
            pass
    return "limits on " + ", ".join(said) if said else "no resource limits"


def watch(life_fd):
    """End this process, and empty its folder, when the grader's end of the life pipe closes (the grader ended,
    even killed; the grader removes the folder itself, which Landlock does not let this process do)."""
    try:
        while os.read(life_fd, 1):
            pass
    except OSError:
        pass
    shutil.rmtree(os.getcwd(), ignore_errors=True)
    os._exit(3)


# ================================================================ what the grader sends: callbacks and models
class Remote:
    """Calls into the grader: a function the grader passed (a judge), or its embedder's encode."""

    def __init__(self, sock):
        self.sock = sock

    def function(self, key):
        def call(*args, **kwargs):
            enc = wire.Encoder()
            wire.send(
                self.sock,
                {"op": "callback", "id": key, "args": enc(list(args)), "kwargs": enc(kwargs)},
            )
            reply = wire.recv(self.sock)
            if reply["op"] == "raised":
                raise wire.rebuild(reply)
            return wire.Decoder(grad_sources=enc.grad_inputs)(reply.get("value"))

        return call

    def special(self, tag, obj):
        if tag == "callback":
            return self.function(obj.get("id"))
        if (
            tag == "embedder"
        ):  # a Sentence Transformer, kept by the grader: encode and similarity call back
            methods = {m: self.function(obj.get(m)) for m in ("encode", "similarity") if m in obj}
            return type("Embedder", (), {m: staticmethod(f) for m, f in methods.items()})()
        if tag == "model":
            return load_model(obj)
        raise wire.WireError(f"no value is tagged {tag!r} here")


MODELS = {}


def load_model(obj):
    """A transformers model the grader saved into this folder (config and safetensors weights)."""
    import torch
    import transformers

    path = os.path.join(os.getcwd(), str(obj.get("dir")))
    if path not in MODELS:
        cls = getattr(transformers, str(obj.get("cls")), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise wire.WireError(f"no transformers model class {obj.get('cls')!r}")
        model = cls.from_pretrained(path, dtype=getattr(torch, str(obj.get("dtype"))))
        MODELS[path] = model.train(bool(obj.get("training")))
    return MODELS[path]


# ================================================================ serving
def serve(sock, fn):
    """Call the student's function on each request, until the grader closes the socket."""
    remote = Remote(sock)
    while True:
        try:
            request = wire.recv(sock)
        except wire.Closed:
            return
        if request["op"] == "load":  # the grader's models, before the call that takes them
            try:
                for obj in request.get("models") or []:
                    load_model(obj)
                wire.send(sock, {"op": "loaded"})
            except Exception as e:
                wire.send(sock, wire.raised(e, traceback.format_exc()))
            continue
        dec = wire.Decoder(special=remote.special)
        try:
            args, kwargs = dec(request.get("args")), dec(request.get("kwargs"))
            if type(args) is not list or type(kwargs) is not dict:
                raise wire.WireError("a call sends a list and a dict")
        except Exception as e:
            wire.send(sock, wire.raised(e))
            continue
        try:
            value = fn(*args, **kwargs)
        except (
            BaseException
        ) as e:  # the student's KeyboardInterrupt or SystemExit too: it is their case's failure
            wire.send(sock, wire.raised(e, traceback.format_exc()))
            continue
        try:
            reply = {
                "op": "returned",
                "value": wire.Encoder(jacobian=wire.jacobians(dec.leaves))(value),
            }
        except BaseException as e:
            reply = wire.raised(e, traceback.format_exc())
            reply["type"] = "NotPlain" if isinstance(e, wire.NotPlain) else reply["type"]
        wire.send(sock, reply)


def run_tests(sock, setup):
    """pytest on the student's test file; each function under test calls back to the grader, which holds it."""
    import pytest

    remote = Remote(sock)

    def under_test(name):
        def call(*args, **kwargs):
            enc = wire.Encoder()
            message = {
                "op": "implementation",
                "name": name,
                "args": enc(list(args)),
                "kwargs": enc(kwargs),
            }
            wire.send(sock, message)
            reply = wire.recv(sock)
            if reply["op"] == "raised":
                raise wire.rebuild(reply)
            return wire.Decoder(special=remote.special, grad_sources=enc.grad_inputs)(
                reply.get("value")
            )

        call.__name__ = call.__qualname__ = name
        return call

    for name, module in setup["under_test"].items():
        setattr(importlib.import_module(module), name, under_test(name))
    outcomes, errors = {}, []

    class Record:
        @staticmethod
        def pytest_collectreport(report):
            if report.failed:
                lines = str(report.longrepr).strip().splitlines()
                errors.append(f"{report.nodeid} does not import: {lines[-1] if lines else '?'}")

        @staticmethod
        def pytest_runtest_logreport(report):
            if report.failed or report.when == "call" or report.skipped:
                kept = outcomes.get(report.nodeid)
                outcomes[report.nodeid] = kept if kept and kept != "passed" else report.outcome

    args = [setup["tests"], "-q", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", "."]
    args += ["--confcutdir", "."]  # no conftest, and no folder, above this one
    code = pytest.main(args, plugins=[Record()])
    wire.send(sock, {"op": "tests", "outcomes": outcomes, "errors": errors, "exit": int(code)})


def main():
    sock, life = wire.socket_from_fd(int(sys.argv[1])), int(sys.argv[2])
    leave_parent()
    said = [own_network()]
    with open("setup.json") as f:
        setup = json.load(f)
    fn = None
    if setup["mode"] == "function":
        fn = getattr(importlib.import_module(setup["module"]), setup["function"])
    else:
        import pytest  # noqa: F401  (before the limits: pytest and the project load in full)

        for module in set(setup["under_test"].values()):
            importlib.import_module(module)
    said.append(landlock(setup["read"], os.getcwd()))
    threading.Thread(target=watch, args=(life,), daemon=True).start()
    said.append(resource_limits(setup["limits"]))
    wire.send(sock, {"op": "ready", "pid": os.getpid(), "isolation": said})
    if fn is not None:
        serve(sock, fn)
    else:
        run_tests(sock, setup)


if __name__ == "__main__":
    main()
