"""Run folders: nothing half written or lost (atomic writes and swaps, refusing a folder that holds a run),
checkpoints and the fingerprints a resume checks. A reader of the method may skip this file: it holds no rule of
the paper."""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

from harness.data import sha256_of


def settle(path):
    """Put a directory that atomic_save was swapping back in order after a kill: a `path`.old beside `path` is the
    previous copy, stale (whole or half deleted) and removed; a `path`.old alone is the last whole copy (the kill fell
    between the two renames) and becomes `path` again."""
    old = path + ".old"
    if os.path.exists(old):
        if os.path.exists(path):
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def atomic_save(path, write):
    """Call write(tmp_dir), then swap tmp_dir into place: a kill at any instruction leaves `path` or `path`.old
    whole, and the next save (or a resume) settles which."""
    tmp, old = path + ".tmp", path + ".old"
    settle(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)  # what a kill leaves of it, the next settle removes


@contextlib.contextmanager
def replaced(path):
    """A temporary path beside `path` that replaces it (os.replace, atomic) when the block ends without error: a kill
    or a failure leaves the old file or the new one, never half of one (a stale PATH.tmp is overwritten next time)."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Replace the file `path` with `text` atomically (see replaced)."""
    with replaced(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def claim_out_dir(path, holds=(), overwrite=False, hint="", flag="--out", dry_run=False):
    """Make `path` the output directory, or one clear line: it is a file, it cannot be written to, or it holds
    earlier work (any of the names in `holds`). --overwrite moves that work aside to PATH.replaced-N: nothing is
    deleted, so a new run that fails never costs the old one. dry_run: the first two checks only, nothing made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag} {path}: is a file; pass a directory")
    found = [h for h in holds if os.path.exists(os.path.join(path, h))]
    if found and not overwrite:
        raise FileExistsError(
            f"{flag} {path} already holds {found[0]} of an earlier run: {hint}"
            f"start over with --overwrite (the earlier run is moved aside, not deleted)"
        )
    if dry_run:
        return
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    if found:
        aside = next(
            f"{path.rstrip('/')}.replaced-{k}"
            for k in range(1, 10**6)
            if not os.path.exists(f"{path.rstrip('/')}.replaced-{k}")
        )
        lock = _held.get(os.path.realpath(path))
        os.replace(path, aside)
        os.makedirs(path)
        if lock is not None:  # the lock file went aside with the run: lock the fresh folder
            lock.moved(aside)
        print(f"[out] --overwrite: the earlier run in {path} was moved to {aside}", file=sys.stderr)


LOCK_NAME = ".lock"  # inside a run folder while a process writes there; gone when it ends (a kill leaves it, unheld)
_held = {}  # real path of a folder -> the RunLock this process holds on it (claim_out_dir moves it along)


def iter_parents(path):
    """`path`, its parent, ... up to the root."""
    while True:
        yield path
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


class FolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The exclusive lock that lock_run_folder takes; see there. `folder`, `flag`: as given; `release()` ends it."""

    def __init__(self, folder, flag):
        self.folder, self.flag, self.fd = folder, flag, None
        # the highest folder that lock_run_folder makes (None: it exists), removed at the end if left empty
        missing = [p for p in iter_parents(os.path.abspath(folder)) if not os.path.exists(p)]
        self.made = missing[-1] if missing else None

    @property
    def path(self):
        return os.path.join(self.folder, LOCK_NAME)

    def acquire(self):
        """Take the lock or raise FolderBusy with the holder's PID. The file may be unlinked by the holder that
        releases it between our open and our flock: then the lock we got is on a file nobody else will see, so
        open again until the lock is on the file at the path."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                raise FolderBusy(
                    f"{self.flag} {self.folder}: another process (PID {holder or 'unknown'}) is writing "
                    f"there; wait for it to end or stop it, or use another {self.flag}"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _held[os.path.realpath(self.folder)] = self

    def release(self):
        """Unlink the lock file, then let go (in this order, see acquire); then remove the folders that
        lock_run_folder made, if they are still empty. Safe to call twice."""
        if self.fd is not None:
            _held.pop(os.path.realpath(self.folder), None)
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        for p in iter_parents(os.path.abspath(self.folder)) if self.made else ():
            try:
                os.rmdir(p)  # only an empty one
            except OSError:
                break
            if p == self.made:
                break

    def moved(self, aside):
        """The folder was renamed to `aside` (claim_out_dir --overwrite), its lock file with it: lock the fresh
        folder at the same path, then drop the old lock."""
        old_fd, self.fd, self.made = self.fd, None, None
        self.acquire()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(aside, LOCK_NAME))
        os.close(old_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_run_folder(folder, flag="--out"):
    """An exclusive OS lock on a run folder, held until release() or the end of a `with` block (or the process: the
    OS lets go of it on any exit, SIGKILL included, so a killed run never blocks the next).

        with lock_run_folder(cfg.out):      # before reading or writing anything in cfg.out
            ...                             # the whole run

    A second process that asks for the same folder gets FolderBusy (a RuntimeError), one line that names the flag,
    the folder and the PID that holds it, and changes nothing there. The lock is fcntl.flock on FOLDER/.lock (made
    if missing; the folder too), which holds the PID; release() removes the file, and the folder when this lock
    made it and it is still empty, so a finished or refused run leaves no trace of it. A path that is a file or
    cannot be written to is one line naming `flag`. claim_out_dir(..., overwrite=True) on a folder locked here moves
    the lock to the fresh folder. POSIX only (fcntl); flock does not lock across machines on some network file
    systems."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{flag} {folder}: is a file; pass a directory")
    lock = RunLock(folder, flag)
    try:
        os.makedirs(folder, exist_ok=True)
        lock.acquire()
    except OSError as e:
        lock.release()
        raise OSError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
    return lock


def no_run_above(path, marks, flag="--out"):
    """Refuse a path inside the folder of another run (a folder above it holding one of `marks`): writing there, or
    moving it aside with --overwrite, would break that run."""
    above = os.path.dirname(os.path.abspath(path))
    while above != os.path.dirname(above):
        if any(os.path.exists(os.path.join(above, m)) for m in marks):
            raise FileExistsError(
                f"{flag} {path}: inside the run in {above}, which it could break; choose a folder outside it"
            )
        above = os.path.dirname(above)


def keep_settings(path, now, names, out):
    """A run that goes on in `out` keeps the settings it was made with: each of `names` in `now` (a dict) must equal
    its value in the JSON file `path` (the run's config), or one line names the flag."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise FileExistsError(
            f"--out {out} holds the work of an earlier run without its settings ({path}): use another --out, "
            f"or start over with --overwrite (the earlier run is moved aside, not deleted)"
        ) from None
    for k in names:
        if k in saved and saved[k] != now[k]:
            raise ValueError(
                f"--{k.replace('_', '-')} {now[k]!r}: the run in {out} was made with {saved[k]!r}; rerun with "
                f"it to go on, start over with --overwrite, or use another --out"
            )


def fingerprints(data_file, tokenizer):
    """The sha256 of the training data file and of the chat template: two of what a resume checks is unchanged."""
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
    return dict(data=sha256_of(data_file), chat_template=template)


def save_checkpoint(out, model, tokenizer, optimizer, step, cfg, fingerprints):
    """out/checkpoint: the policy (save_pretrained) and tokenizer; trainer_state.json (step, config, Python and numpy
    RNG, and the fingerprints a resume checks: the KL reference, the data, the chat template, metrics.jsonl up to
    this step) and trainer_state.pt (optimizer and torch RNG, tensors only: it loads with weights_only=True)."""
    history = "".join(
        line
        for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")
        if json.loads(line)["step"] <= step
    )
    prints = dict(fingerprints, metrics=hashlib.sha256(history.encode()).hexdigest())

    def write(tmp):
        model.save_pretrained(tmp)  # load_policy returns plain models (never GGUF-bound)
        tokenizer.save_pretrained(tmp)
        rng = rng_state()
        torch.save(
            dict(
                optimizer=optimizer.state_dict(),
                torch_rng=rng.pop("torch"),
                cuda_rng=rng.pop("cuda"),
            ),
            os.path.join(tmp, "trainer_state.pt"),
        )
        write_text(
            os.path.join(tmp, "trainer_state.json"),
            json.dumps(
                dict(step=step, config=dataclasses.asdict(cfg), rng=rng, fingerprints=prints)
            ),
        )

    atomic_save(os.path.join(out, "checkpoint"), write)


def rng_state():
    """Every RNG the run draws from, as plain data (Python, numpy) and tensors (torch, CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(
        python=random.getstate(),
        numpy=[name, keys.tolist(), pos, has_gauss, gauss],
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )
