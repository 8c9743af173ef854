"""Where one agent's memories, runs and adapters live.

A home holds private memories: its folders are 0700 and its files 0600 whatever the umask, and a home
that is only read is never written (read commands open its store read-only, see store.py).
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import LockedError, StoreError

ENV_HOME = "SLEEPCTL_HOME"


def default_home() -> Path:
    """Per-user default, following XDG so a home never lands in the working directory by accident."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sleepctl" / "default"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else default_home()


@dataclass(frozen=True)
class Home:
    """The folder layout of a home; `open_home` checks it exists or creates it."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / "sleepctl.db"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    @property
    def lock_path(self) -> Path:
        return self.root / "sleep.lock"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"


def writable(p: Path) -> bool:
    """Writable by us and by its owner's permission bits: root passes os.access on anything, and a home its
    owner made read-only (chmod a-w) is left alone by root too."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return os.access(p, os.W_OK) and bool(mode & stat.S_IWUSR)


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all: a reader (or a job killed meanwhile) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders made meanwhile are the owner's only (0600/0700), whatever the caller's umask."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def private_tree(root: Path) -> None:
    """Folders 0700 and files 0600 under `root` (symlinks are neither followed nor changed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name, mode in [(d, 0o700) for d in dirnames] + [(f, 0o600) for f in filenames]:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    os.chmod(p, stat.S_IMODE(st.st_mode) & mode)
            except OSError:
                pass
    try:
        if stat.S_IMODE(os.stat(root).st_mode) & 0o077:
            os.chmod(root, 0o700)
    except OSError:
        pass


@contextmanager
def sleep_lock(h: Home, job: str) -> Iterator[None]:
    """One job that publishes adapters (seed, dream, consolidate) at a time, per home.

    flock: released by the kernel when the process dies, SIGKILL included, so a lock is never stale.
    Opened without following a symlink, so a planted link cannot make the lock truncate another file.
    What the job writes meanwhile (runs, adapters, datasets) is private: the umask is 077 while it is held.
    """
    from .store import Store

    Store(h.db_path).close()  # a foreign, empty or read-only store is refused before the lock file is made
    path = h.lock_path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(
            f"cannot open the lock {path}: {e.strerror}", hint="is it a symlink, or the home read-only?"
        ) from e
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise LockedError(
            f"another sleepctl job holds {path}{f' ({holder})' if holder else ''}",
            hint="seed, dream and consolidate run one at a time per home; wait for it to finish",
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{job}, pid {os.getpid()}, since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
    f.flush()
    try:
        with private_umask():
            yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def open_home(home: str | os.PathLike | None = None, create: bool = False) -> Home:
    """Open a home; with `create`, make it. A folder without a store is no home: only a command that writes
    memories (`create`) makes one there, any other says so and creates nothing."""
    root = resolve_home(home).absolute()
    missing = StoreError(
        f"no sleepctl home at {root}" + (" (it has no sleepctl.db)" if root.is_dir() else ""),
        hint="record memories first (sleepctl record FILE), or pass --home / set SLEEPCTL_HOME",
    )
    if not root.exists():
        if not create:
            raise missing
        try:
            with private_umask():
                root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create home {root}: {e.strerror}", hint="choose a writable --home") from e
    if not root.is_dir():
        raise StoreError(f"home {root} is not a directory")
    h = Home(root)
    if not create:
        if not h.db_path.exists():
            raise missing
        return h
    if not (writable(root) and os.access(root, os.X_OK)):
        raise StoreError(f"home {root} is not writable", hint="fix its permissions or choose another --home")
    if h.db_path.exists():
        return h  # its store is checked when opened: nothing is made beside a file that may not be ours
    try:
        with private_umask():
            for d in (h.runs_dir, h.adapters_dir, h.logs_dir):
                d.mkdir(exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create home {root}: {e.strerror}", hint="choose a writable --home") from e
    return h
