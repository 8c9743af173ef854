"""Where one agent's memories, runs and adapters live."""

from __future__ import annotations

import fcntl
import os
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


@contextmanager
def sleep_lock(h: Home, job: str) -> Iterator[None]:
    """One job that publishes adapters (seed, dream, consolidate) at a time, per home.

    flock: released by the kernel when the process dies, SIGKILL included, so a lock is never stale.
    Opened without following a symlink, so a planted link cannot make the lock truncate another file.
    """
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
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def open_home(home: str | os.PathLike | None = None, create: bool = False) -> Home:
    """Open a home; with `create`, make it. A missing home on read is an error, not a silent new one."""
    root = resolve_home(home)
    if not root.exists():
        if not create:
            raise StoreError(
                f"no sleepctl home at {root}",
                hint="record memories first (sleepctl record FILE), or pass --home / set SLEEPCTL_HOME",
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create home {root}: {e.strerror}", hint="choose a writable --home") from e
    if not root.is_dir():
        raise StoreError(f"home {root} is not a directory")
    if create and not os.access(root, os.W_OK | os.X_OK):
        raise StoreError(f"home {root} is not writable", hint="fix its permissions or choose another --home")
    h = Home(root)
    if create:
        for d in (h.runs_dir, h.adapters_dir, h.logs_dir):
            d.mkdir(exist_ok=True)
    return h
