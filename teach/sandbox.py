"""The teaching kit's plumbing (a reader of the method may skip it): the grader's side of a student's process.

Child(files, setup) writes `files` (the project's modules with the student's code in place, teach/child.py and
teach/wire.py) into a fresh temporary folder and starts teach/child.py there, with `python -I`, a clean
environment that names nothing of the teacher's, in a session of its own. The child leaves its parent at once,
drops what it can (teach/child.py: namespaces, Landlock, resource limits) and says what it dropped. The grader
then sends calls and receives plain data (teach/wire.py); a call past its time kills the child and its group.
Only plain data crosses: the grader rebuilds values from it and never runs anything the child sent.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

from teach import wire

HERE = os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)  # the project that holds this kit
STARTUP = 120  # seconds a child may take to import the project and say it is ready
LIMITS = dict(  # resource limits of a child (teach/child.py sets them after the imports)
    cpu=None,  # CPU seconds: set per child from its time limits (an orphan that spins ends by itself)
    as_=4 * 2**30,  # bytes of address space (importing torch and transformers takes about 2.3 GiB)
    fsize=64 * 2**20,  # bytes of a file it writes
    nofile=256,  # open files
    nproc=0,  # no new process or thread (Linux enforces it for every user but root)
    core=0,  # no core dumps
)
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/proc", "/sys")
DEVICES_READ = ("/dev/urandom", "/dev/random", "/dev/zero")
CHILD_CODE = ("teach/__init__.py", "teach/child.py", "teach/wire.py")
PACKAGES = ("harness", "extras")  # the project's folders the core scripts import


class StudentTimeout(TimeoutError):
    """The student's code ran past its time: the child was killed."""


class StudentCrash(RuntimeError):
    """The student's process ended, or sent something that is no plain data (it was killed)."""


class NoPlainData(TypeError):
    """The student's function returned a value that cannot cross (its process goes on serving)."""


def landlock_abi():
    """The Landlock ABI this kernel offers (0: none), as teach/child.py finds it."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    return max(0, ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))


# ================================================================ what a child holds and may read
def project_modules(root, replace=None):
    """{relative path: text} of the project's Python modules a child needs: the core scripts (CORE of
    teach/run.py, passed as the keys of `replace` or found at the top) and the packages they import; `replace`
    ({path: text}) puts other texts in place (the student's function, or blanked bodies)."""
    files = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and os.path.isfile(os.path.join(root, name)):
            files[name] = None
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(root, package))):
            if name.endswith(".py"):
                files[f"{package}/{name}"] = None
    for rel in CHILD_CODE:
        files[rel] = None
    out = {}
    for rel in files:
        with open(os.path.join(HERE if rel in CHILD_CODE else root, rel), encoding="utf-8") as f:
            out[rel] = f.read()
    out.update(replace or {})
    return out


def inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def readable(root):
    """The folders a child may read under Landlock: Python's installation and packages, the system's libraries,
    never the teacher's project (nor any sys.path entry inside it). Returns (folders, warnings)."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    paths |= {
        p
        for k, p in sysconfig.get_paths().items()
        if k in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    python = [p for p in paths if os.path.exists(p)]
    paths |= {  # installed packages only: not a script's folder (/tmp for `python /tmp/x.py`), nor the project
        p
        for p in sys.path
        if os.path.isabs(p)
        and (any(inside(p, q) for q in python) or os.path.basename(p).endswith("-packages"))
    }
    folders, warnings = set(), []
    for p in paths | set(SYSTEM_READ) | set(DEVICES_READ):
        if not os.path.exists(p):
            continue
        if inside(p, root):
            warnings.append(
                f"the Python installation {p} lies inside the project: a student's code can read it"
            )
        elif inside(root, p):
            warnings.append(f"the project lies inside {p}, which a student's code may read")
        folders.add(os.path.realpath(p))
    if inside(sys.executable, root):
        warnings.append(
            f"{sys.executable} lies inside the project: its path names the project to the child"
        )
    return sorted(folders), warnings


def clean_env(folder):
    """The child's whole environment: nothing of the teacher's (no PYTHONPATH, no paths, no tokens)."""
    return {
        "PATH": os.defpath,
        "HOME": folder,
        "TMPDIR": folder,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": os.path.join(folder, "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLCONFIGDIR": folder,
    }


# ================================================================ a child
class Child:
    """A student's process. `setup` goes to teach/child.py as setup.json (mode, module, function or tests);
    `root` is the teacher's project, which the child must not read."""

    def __init__(self, files, setup, root, cpu_seconds):
        self.folder = tempfile.mkdtemp(prefix="teach-")
        self.pid = self.pidfd = self.group = None
        self.callbacks, self.models, self.loading, self.last_trace = {}, {}, 0.0, ""
        for rel, text in files.items():
            os.makedirs(os.path.join(self.folder, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(self.folder, rel), "w", encoding="utf-8") as f:
                f.write(text)
        read, self.warnings = readable(root)
        limits = {k: v for k, v in dict(LIMITS, cpu=int(cpu_seconds) + 1).items() if v is not None}
        setup = dict(setup, read=read, limits=limits)
        with open(os.path.join(self.folder, "setup.json"), "w") as f:
            json.dump(setup, f)
        self.sock, theirs = socket.socketpair()
        life_r, self.life = os.pipe()
        try:  # a launcher that cannot start leaves nothing behind
            self.launch(theirs, life_r)
        except BaseException:
            self.kill()
            raise
        finally:
            theirs.close()
            os.close(life_r)
        try:
            hello = wire.recv(self.sock, STARTUP)
            if hello["op"] != "ready" or type(hello.get("pid")) is not int:
                raise wire.WireError("no ready message")
        except (wire.Closed, wire.Timeout, wire.WireError) as e:
            said = self.output
            self.kill()
            raise StudentCrash(
                f"the student's process did not start ({type(e).__name__}): {said}"
            ) from None
        self.pid, self.isolation = hello["pid"], [str(s) for s in hello.get("isolation", [])]
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def launch(self, theirs, life_r):
        """Start teach/child.py; it forks at once and its launcher ends (so it leaves this process)."""
        with open(os.path.join(self.folder, "output.txt"), "wb") as log:
            launcher = subprocess.Popen(
                [sys.executable, "-I", "-B", "teach/child.py", str(theirs.fileno()), str(life_r)],
                cwd=self.folder,
                env=clean_env(self.folder),
                pass_fds=(theirs.fileno(), life_r),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.group = launcher.pid  # its session and process group: the child stays in it
        launcher.wait(timeout=STARTUP)

    @property
    def output(self):
        """The last lines the child printed (its own errors, the student's prints)."""
        try:
            with open(os.path.join(self.folder, "output.txt"), errors="replace") as f:
                return f.read()[-1500:].strip() or "(it printed nothing)"
        except OSError:
            return "(no output)"

    # ------------------------------------------------------------ what the grader sends
    def special(self, x):
        """Encoder.special: a function becomes a callback; a Sentence Transformer an embedder whose encode calls
        back; a transformers model is saved into the child's folder and loaded there; its config crosses as a
        namespace of its plain attributes."""
        kind = type(x).__module__.split(".")[0]
        transformers = sys.modules.get("transformers")
        if transformers is not None and isinstance(x, transformers.PreTrainedModel):
            if id(x) not in self.models:
                rel = f"models/{len(self.models)}"
                x.save_pretrained(os.path.join(self.folder, rel), safe_serialization=True)
                self.models[id(x)] = {
                    "t": "model",
                    "dir": rel,
                    "cls": type(x).__name__,
                    "dtype": str(x.dtype).removeprefix("torch."),
                    "training": x.training,
                }
            return self.models[id(x)]
        if transformers is not None and isinstance(x, transformers.PretrainedConfig):
            plain = {}
            for k, v in x.to_dict().items():
                try:
                    plain[k] = wire.Encoder()(v)
                except wire.NotPlain:
                    pass
            plain["id2label"] = wire.Encoder()(dict(getattr(x, "id2label", {}) or {}))
            return {"t": "ns", "v": plain}
        if kind == "sentence_transformers" and hasattr(x, "encode"):
            return {
                "t": "embedder",
                "encode": self.register(x.encode),
                "similarity": self.register(x.similarity),
            }
        if callable(x) and not isinstance(x, type):
            return {"t": "callback", "id": self.register(x)}
        return None

    def register(self, fn):
        key = len(self.callbacks)
        self.callbacks[key] = fn
        return key

    # ------------------------------------------------------------ the exchange
    def exchange(self, message, seconds, implementations=None, encoded=None):
        """Send `message` (its args and kwargs already plain if `encoded`), answer the child's callbacks (and, in
        tests mode, its calls of the functions under test, from `implementations`) until it replies; past `seconds`
        the child is killed: StudentTimeout."""
        deadline = time.monotonic() + seconds
        left = lambda: max(0.001, deadline - time.monotonic())
        try:
            if message is not None:
                wire.send(self.sock, message)
            while True:
                reply = wire.recv(self.sock, left)
                if reply["op"] in ("callback", "implementation"):
                    key = reply.get("name" if reply["op"] == "implementation" else "id")
                    table = implementations if reply["op"] == "implementation" else self.callbacks
                    fn = (table or {}).get(key) if type(key) in (int, str) else None
                    wire.send(self.sock, self.answer(fn, reply))
                    continue
                if reply["op"] in ("returned", "raised", "tests", "loaded"):
                    return reply
                raise wire.WireError(f"an unexpected message {reply['op'][:40]!r}")
        except wire.Timeout:
            self.kill()
            raise StudentTimeout(
                f"ran past its time limit of {seconds:.3g} s (an endless loop?)"
            ) from None
        except (wire.Closed, wire.WireError, OSError) as e:
            said, printed = str(e) if isinstance(e, wire.WireError) else "it ended", self.output
            self.kill()
            raise StudentCrash(
                f"the student's process stopped answering ({said}); what it printed: {printed[-300:]}"
            ) from None

    def answer(self, fn, request):
        """Run one of the grader's functions for the child: plain arguments in, plain data out."""
        dec = wire.Decoder()
        try:
            if fn is None:
                raise LookupError("no such callback")
            args, kwargs = dec(request.get("args")), dec(request.get("kwargs"))
            if type(args) is not list or type(kwargs) is not dict:
                raise wire.WireError("a callback takes a list and a dict")
            value = fn(*args, **kwargs)
            return {
                "op": "returned",
                "value": wire.Encoder(jacobian=wire.jacobians(dec.leaves))(value),
            }
        except Exception as e:
            return wire.raised(e)

    def call(self, args, kwargs, seconds):
        """The student's function on these arguments: its value rebuilt here, or the exception it raised. A model
        among the arguments is loaded first, within STARTUP seconds that are not the call's (self.loading)."""
        t0, known = time.monotonic(), len(self.models)
        enc = wire.Encoder(special=self.special)
        message = {"op": "call", "args": enc(list(args)), "kwargs": enc(dict(kwargs))}
        if len(self.models) > known:
            self.exchange({"op": "load", "models": list(self.models.values())[known:]}, STARTUP)
        self.loading = time.monotonic() - t0
        reply = self.exchange(message, seconds, encoded=enc)
        if reply["op"] == "raised":
            self.last_trace = str(reply.get("trace", ""))
            if reply.get("type") == "NotPlain":
                raise NoPlainData(f"its value is no plain data: {str(reply.get('message'))[:300]}")
            raise wire.rebuild(reply)
        try:
            return wire.Decoder(grad_sources=enc.grad_inputs)(reply.get("value"))
        except (wire.WireError, ValueError, TypeError, RecursionError) as e:
            self.kill()
            raise StudentCrash(f"its value could not be read as plain data: {e}") from None

    def run_tests(self, implementations, seconds):
        """tests mode: {test id: 'passed' / 'failed' / 'skipped'} of the student's tests, as the child ran them."""
        reply = self.exchange(None, seconds, implementations)
        outcomes = reply.get("outcomes")
        if reply["op"] != "tests" or type(outcomes) is not dict:
            raise StudentCrash("the student's test run sent no outcomes")
        self.errors = [str(e)[:300] for e in (reply.get("errors") or [])[:5]]
        if not outcomes and not self.errors:
            self.errors = [
                f"pytest ran no test (exit status {reply.get('exit')}): {self.output[-300:]}"
            ]
        return {str(k)[:500]: str(v)[:20] for k, v in list(outcomes.items())[:5000]}

    def kill(self):
        """SIGKILL to the child and its process group; the folder goes once it is dead."""
        for send in (
            lambda: signal.pidfd_send_signal(self.pidfd, signal.SIGKILL) if self.pidfd else None,
            lambda: os.kill(self.pid, signal.SIGKILL) if self.pid and not self.pidfd else None,
            lambda: os.killpg(self.group, signal.SIGKILL) if self.group else None,
        ):
            try:
                send()
            except (OSError, AttributeError):
                pass
        if self.pidfd is not None:
            import select

            select.select([self.pidfd], [], [], 5)  # readable once the process has ended
            os.close(self.pidfd)
            self.pidfd = None
        for closing in (self.sock.close, lambda: os.close(self.life)):
            try:
                closing()
            except OSError:
                pass
        self.pid = self.group = None
        shutil.rmtree(self.folder, ignore_errors=True)
