"""The teaching kit's plumbing (a reader of the method may skip it): plain data between the grader and a student's
process. A message is JSON; a value that JSON cannot hold is a tagged object ({"t": "tuple", ...}, {"t": "ndarray",
...}). The receiver builds real ints, floats, strings, lists, tuples, sets, dicts, numpy arrays and torch tensors
from it, and nothing else: no class of the sender's is ever named, imported or run, so an object whose `==` is
always true, or any other code, cannot cross. Both sides import this file (the student's process from a copy).

A tensor that requires grad crosses as a leaf that requires grad; a tensor computed from such leaves crosses back
with its Jacobian against them (torch.autograd.grad in the process that computed it), and the receiver joins it to
its own graph (remote_grad), so `loss.backward()` reaches the caller's inputs as if the function had run there.
"""

import base64
import dataclasses
import functools
import json
import math
import socket
import sys
import types

MAX_MESSAGE = 64 * 2**20  # bytes: a longer message is refused, not read
MAX_DEPTH = 64  # nesting of lists, tuples and dicts
JACOBIAN_MAX = 4096  # elements of an output tensor whose Jacobian is computed (a loss has 1)
NUMPY_DTYPES = (
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)
TORCH_DTYPES = "bool uint8 int8 int16 int32 int64 float16 bfloat16 float32 float64".split()
DATACLASS_MODULES = (
    "harness.data",
)  # the project's data classes (Situation, Perspective) may cross


class WireError(ValueError):
    """A message that is not plain data (or not a message at all)."""


class NotPlain(TypeError):
    """A value that cannot cross: it is no plain data."""


class Closed(EOFError):
    """The other process closed its end (it ended)."""


class Timeout(TimeoutError):
    """No message before the deadline."""


# ================================================================ messages
def send(sock, message):
    data = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise NotPlain(f"a message of {len(data) / 2**20:.0f} MiB; at most {MAX_MESSAGE >> 20} MiB")
    sock.sendall(len(data).to_bytes(8, "big") + data)


def _read(sock, n, timeout):
    chunks, left = [], n
    while left:
        sock.settimeout(timeout() if callable(timeout) else timeout)
        try:
            chunk = sock.recv(min(left, 2**20))
        except TimeoutError:
            raise Timeout() from None
        except OSError as e:
            raise Closed(str(e)) from None
        if not chunk:
            raise Closed("end of stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(sock, timeout=None):
    """The next message; `timeout`: seconds (or a function giving the seconds left), None waits for ever."""
    n = int.from_bytes(_read(sock, 8, timeout), "big")
    if n > MAX_MESSAGE:
        raise WireError(f"a message of {n} bytes announced; at most {MAX_MESSAGE}")
    try:
        message = json.loads(_read(sock, n, timeout))
    except (ValueError, RecursionError) as e:
        raise WireError(f"not JSON: {type(e).__name__}") from None
    if type(message) is not dict or type(message.get("op")) is not str:
        raise WireError("a message is a JSON object with an 'op'")
    return message


def socket_from_fd(fd):
    return socket.socket(fileno=fd)


# ================================================================ values -> plain data
class Encoder:
    """Turns a value into plain data. `special(value)` may return a tagged object for a value this file does not
    know (the grader's callbacks and models); `jacobian(tensor)` the Jacobians to send with a result tensor."""

    def __init__(self, special=None, jacobian=None):
        self.special, self.jacobian = special, jacobian
        self.grad_inputs = []  # tensors sent with requires_grad, in the order sent

    def __call__(self, x, depth=0):
        if depth > MAX_DEPTH:
            raise NotPlain(f"values nested more than {MAX_DEPTH} deep")
        t, down = type(x), depth + 1
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x if abs(x) < 2**63 else {"t": "int", "v": str(x)}
        if t is float:
            return x if math.isfinite(x) else {"t": "float", "v": repr(x)}
        if t is list:
            return [self(v, down) for v in x]
        if t in (tuple, set, frozenset):
            return {"t": t.__name__, "v": [self(v, down) for v in x]}
        if t is dict:
            return {"t": "dict", "v": [[self(k, down), self(v, down)] for k, v in x.items()]}
        if t is bytes:
            return {"t": "bytes", "b64": base64.b64encode(x).decode()}
        if t is types.SimpleNamespace:
            return {"t": "ns", "v": {str(k): self(v, down) for k, v in vars(x).items()}}
        np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
        if np is not None and isinstance(x, (np.ndarray, np.generic)):
            return self.array(np.asarray(x), "ndarray" if isinstance(x, np.ndarray) else "npscalar")
        if torch is not None and isinstance(x, torch.Tensor):
            return self.tensor(x)
        if self.special is not None:
            tagged = self.special(x)
            if tagged is not None:
                return tagged
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            if t.__module__ not in DATACLASS_MODULES:
                raise NotPlain(
                    f"a {t.__module__}.{t.__qualname__} (a data class of no project module)"
                )
            fields = {  # compare=False fields are bookkeeping (e.g. the file a situation came from): left out
                f.name: self(getattr(x, f.name), down) for f in dataclasses.fields(x) if f.compare
            }
            return {"t": "dc", "cls": f"{t.__module__}.{t.__qualname__}", "v": fields}
        for (
            base,
            plain,
        ) in (  # a subclass crosses as its base type's value: its own methods stay behind
            (bool, lambda v: bool(int.__index__(v))),
            (int, int.__index__),
            (float, float.__float__),
            (str, str.__str__),
            (list, lambda v: list(list.__iter__(v))),
            (tuple, lambda v: tuple(tuple.__iter__(v))),
            (dict, lambda v: dict(dict.items(v))),
            (set, lambda v: set(set.__iter__(v))),
            (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
        ):
            if isinstance(x, base):
                return self(plain(x), depth)
        raise NotPlain(f"a {t.__module__}.{t.__qualname__}, which is no plain data")

    def array(self, a, tag):
        if str(a.dtype) not in NUMPY_DTYPES:
            raise NotPlain(f"a numpy array of dtype {a.dtype}")
        data = base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()
        return {"t": tag, "dtype": str(a.dtype), "shape": list(a.shape), "b64": data}

    def tensor(self, x):
        import torch

        dtype = str(x.dtype).removeprefix("torch.")
        if dtype not in TORCH_DTYPES or x.layout != torch.strided or x.is_complex():
            raise NotPlain(f"a torch tensor of dtype {x.dtype}, layout {x.layout}")
        flat = x.detach().to("cpu").contiguous()
        raw = (flat.view(torch.int16) if dtype == "bfloat16" else flat).numpy().tobytes()
        out = {
            "t": "tensor",
            "dtype": dtype,
            "shape": list(x.shape),
            "b64": base64.b64encode(raw).decode(),
            "rg": bool(x.requires_grad),
        }
        if x.requires_grad and self.jacobian is None:  # a request: the receiver makes it a leaf
            self.grad_inputs.append(x)
        elif x.requires_grad:  # a result: its Jacobians against the request's leaves
            jac = self.jacobian(x)
            if jac is not None:
                out["jac"] = [None if J is None else self.tensor(J) for J in jac]
        return out


# ================================================================ plain data -> values
class Decoder:
    """Builds values from plain data. `special(tag, obj)` builds the tagged objects of Encoder.special (callbacks,
    models) where the receiver allows them; `grad_sources`, the tensors a request sent with requires_grad, joins a
    result's Jacobians to them."""

    def __init__(self, special=None, grad_sources=None):
        self.special, self.grad_sources = special, grad_sources
        self.leaves = []  # tensors received with requires_grad, in the order received

    def __call__(self, obj, depth=0):
        if depth > MAX_DEPTH:
            raise WireError(f"values nested more than {MAX_DEPTH} deep")
        t, down = type(obj), depth + 1
        if obj is None or t in (bool, int, float, str):
            return obj
        if t is list:
            return [self(v, down) for v in obj]
        if t is not dict or type(obj.get("t")) is not str:
            raise WireError(f"a {t.__name__} where a value was expected")
        tag = obj["t"]
        if tag in ("tuple", "set", "frozenset"):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                self(v, down) for v in self.items(obj)
            )
        if tag == "dict":
            pairs = [self(p, down) for p in self.items(obj)]
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise WireError("a dict is a list of [key, value] pairs")
            return {k: v for k, v in pairs}
        if tag == "int":
            return int(self.text(obj))
        if tag == "float":
            if self.text(obj) not in ("nan", "inf", "-inf"):
                raise WireError("a tagged float is nan, inf or -inf")
            return float(obj["v"])
        if tag == "bytes":
            return self.b64(obj)
        if tag == "ns":
            if type(obj.get("v")) is not dict:
                raise WireError("a namespace holds a dict")
            return types.SimpleNamespace(**{str(k): self(v, down) for k, v in obj["v"].items()})
        if tag in ("ndarray", "npscalar"):
            return self.array(obj, tag)
        if tag == "tensor":
            return self.tensor(obj)
        if tag == "dc":
            return self.dataclass(obj, down)
        if self.special is not None:
            return self.special(tag, obj)
        raise WireError(f"no value is tagged {tag!r} here")

    @staticmethod
    def items(obj):
        if type(obj.get("v")) is not list:
            raise WireError(f"a {obj['t']} holds a list")
        return obj["v"]

    @staticmethod
    def text(obj):
        if type(obj.get("v")) is not str or len(obj["v"]) > 5000:
            raise WireError(f"a tagged {obj['t']} holds a short string")
        return obj["v"]

    @staticmethod
    def b64(obj):
        try:
            return base64.b64decode(obj["b64"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise WireError("bad base64 data") from None

    def shaped(self, obj, dtypes):
        shape, dtype = obj.get("shape"), obj.get("dtype")
        if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
            raise WireError("an array's shape is a list of ints >= 0")
        if dtype not in dtypes:
            raise WireError(f"an array of dtype {dtype!r}")
        return shape, dtype, self.b64(obj)

    def array(self, obj, tag):
        import numpy as np

        shape, dtype, raw = self.shaped(obj, NUMPY_DTYPES)
        dt = np.dtype(dtype).newbyteorder("<")
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise WireError("an array's bytes do not match its shape")
        a = np.frombuffer(raw, dtype=dt).astype(np.dtype(dtype)).reshape(shape)
        return a[()] if tag == "npscalar" else a

    def tensor(self, obj):
        import numpy as np
        import torch

        shape, dtype, raw = self.shaped(obj, TORCH_DTYPES)
        size = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if len(raw) != math.prod(shape) * size:
            raise WireError("a tensor's bytes do not match its shape")
        host = "int16" if dtype == "bfloat16" else dtype
        x = torch.from_numpy(np.frombuffer(raw, dtype=host).copy()).reshape(shape)
        x = x.view(torch.bfloat16) if dtype == "bfloat16" else x
        if obj.get("rg") is not True or not x.is_floating_point():
            return x
        jac = obj.get("jac")
        if jac is None and self.grad_sources is None:  # a request's input: a leaf
            self.leaves.append(x.requires_grad_(True))
            return x
        if jac is None or not self.grad_sources:  # computed without our inputs: a leaf of its own
            return x.requires_grad_(True)
        if type(jac) is not list or len(jac) != len(self.grad_sources):
            raise WireError("a tensor's Jacobians do not match the inputs sent")
        jacs = [None if J is None else self.tensor(J) for J in jac]
        for J, source in zip(jacs, self.grad_sources):
            if J is not None and tuple(J.shape) != (x.numel(), source.numel()):
                raise WireError("a Jacobian's shape does not match its tensors")
        return remote_grad().apply(x, jacs, *self.grad_sources)

    def dataclass(self, obj, depth):
        import importlib

        name, fields = obj.get("cls"), obj.get("v")
        module, _, cls = str(name).rpartition(".")
        if module not in DATACLASS_MODULES or type(fields) is not dict:
            raise WireError(f"no data class {name!r} crosses")
        cls = getattr(importlib.import_module(module), cls, None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise WireError(f"{name!r} is no data class")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        if not set(fields) <= known:
            raise WireError(f"{name} has no fields {sorted(set(fields) - known)}")
        return cls(**{k: self(v, depth) for k, v in fields.items()})


def jacobians(leaves):
    """Encoder.jacobian for a result computed from `leaves` (a request's tensors that require grad): for an
    output y, one [y.numel(), leaf.numel()] float64 tensor per leaf (None where y does not depend on it)."""

    def jacobian(y):
        import torch

        if not leaves or y.grad_fn is None or y.numel() > JACOBIAN_MAX:
            return None
        flat, rows = y.reshape(-1), []
        for i in range(flat.numel()):
            rows.append(torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True))
        return [
            None
            if all(r[k] is None for r in rows)
            else torch.stack(
                [
                    (torch.zeros_like(leaf) if r[k] is None else r[k]).reshape(-1).double()
                    for r in rows
                ]
            )
            for k, leaf in enumerate(leaves)
        ]

    return jacobian


@functools.cache
def remote_grad():
    """RemoteGrad, made on first use: reward.py's functions never import torch."""
    import torch

    class RemoteGrad(torch.autograd.Function):
        """A tensor computed in another process, joined to this process's graph: its backward is grad_output
        times the Jacobians that process sent."""

        @staticmethod
        def forward(ctx, value, jacs, *inputs):
            ctx.jacs = jacs
            ctx.inputs = [(x.shape, x.dtype) for x in inputs]
            return value.clone()

        @staticmethod
        def backward(ctx, grad):
            g = grad.reshape(1, -1).double()
            return (
                None,
                None,
                *(
                    None if J is None else (g @ J).reshape(shape).to(dtype)
                    for J, (shape, dtype) in zip(ctx.jacs, ctx.inputs)
                ),
            )

    return RemoteGrad


# ================================================================ errors
def raised(e, trace=""):
    """An exception as plain data: its type's name and message (and a traceback for the teacher's eyes)."""
    try:
        message = str(e)
    except BaseException:  # a __str__ that raises
        message = "(its message could not be read)"
    return {
        "op": "raised",
        "type": type(e).__name__ if type(type(e).__name__) is str else "?",
        "message": message[:2000],
        "trace": str(trace)[-4000:],
    }


class StudentError(RuntimeError):
    """An exception of the student's code that the grader does not rebuild as itself (KeyboardInterrupt,
    SystemExit, pytest's own outcomes, a class of its own)."""


def rebuild(message):
    """The exception a `raised` message describes: a built-in exception type by name (ValueError stays a
    ValueError, so pytest.raises(ValueError) works), anything else a StudentError that names it."""
    import builtins

    name, text = str(message.get("type"))[:100], str(message.get("message"))[:2000]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:
            return cls(text)
        except Exception:
            pass
    return StudentError(f"{name}: {text}")
