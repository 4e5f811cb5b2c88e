"""One owner per run directory.

Two jobs training into one run directory both write checkpoints, metrics and `latest`, and the
run is lost. It happens without anyone meaning to: when a torchrun agent dies its workers keep
running (torchrun starts them in sessions of their own), and a relaunched or requeued job on the
same directory trains beside them.

The owner is the process of global rank 0 of the job, recorded in RUN_DIR/owner.lock (JSON:
host, boot id, pid, process start time, job id, a random token, a heartbeat counter). It is
created with O_EXCL, rewritten by a heartbeat thread every `stale_s / 6` seconds, and removed at
exit. A lock found in place is stale, and taken over, only when its owner is provably gone:

- same machine (host name and boot id): the pid no longer runs the process that started at the
  recorded start time (so a recycled pid is not mistaken for the owner);
- another machine: its heartbeat has not moved for `stale_s`, watched from here (no clocks are
  compared).

A live orphan keeps its process and its heartbeat, so it keeps the lock: the new job stops and
says who holds it. If two jobs take over the same stale lock at once, the heartbeat finds the
token replaced and the loser stops without committing a checkpoint (see Trainer).
"""

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("finevit.train")

LOCK = "owner.lock"


class RunLockError(RuntimeError):
    """The run directory belongs to another live job; one sentence naming it."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks since boot), None when it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces, so split after its ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def describe(owner: dict) -> str:
    job = f"job {owner['job']}, " if owner.get("job") else ""
    return f"{job}pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


class RunLock:
    def __init__(self, run_dir, stale_s: float = 60.0):
        self.path = Path(run_dir) / LOCK
        self.stale_s = float(stale_s)
        self.beat_s = max(self.stale_s / 6, 0.05)
        self.lost: Optional[str] = None  # why ownership was lost, once it was
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.me = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
                   "start": process_start(os.getpid()), "job": os.environ.get("SLURM_JOB_ID", ""),
                   "token": secrets.token_hex(8), "beat": 0,
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    # ------------------------------------------------------------------ acquiring

    def acquire(self) -> "RunLock":
        """Own the run directory, taking over a stale lock; RunLockError if a live job owns it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each turn either owns the lock, refuses, or removed a stale one
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is not None and self._alive(owner):
                    raise RunLockError(
                        f"run directory {self.path.parent} is in use by {describe(owner)} "
                        f"({self.path}); stop that job first: one run directory has one writer") from None
                log.warning("taking over the stale lock of %s", describe(owner) if owner else "an unreadable owner")
                self._remove_if(owner)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            self._thread = threading.Thread(target=self._heartbeat, name="finevit-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockError(f"could not take {self.path}: other jobs keep taking it over")

    def _read(self, tries: int = 20) -> Optional[dict]:
        """The lock's content; None when it stays unreadable (an owner that died mid-write)."""
        for _ in range(tries):
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return {}  # released meanwhile: not alive, nothing to remove
            except (OSError, ValueError):
                time.sleep(0.05)  # being written
        return None

    def _alive(self, owner: dict) -> bool:
        if not owner:
            return False
        if owner.get("host") == self.me["host"] and owner.get("boot") == self.me["boot"]:
            return process_start(int(owner.get("pid", -1))) == owner.get("start")
        if owner.get("host") == self.me["host"] and owner.get("boot") and self.me["boot"]:
            return False  # this machine rebooted since
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:  # another machine's owner: is its heartbeat moving?
            time.sleep(min(self.beat_s, max(deadline - time.monotonic(), 0)))
            now = self._read()
            if now == {}:
                return False  # released meanwhile
            if now is not None and (now.get("token"), now.get("beat")) != (owner.get("token"), owner.get("beat")):
                return True  # it beat, or the lock changed hands: someone is alive
        return False

    def _remove_if(self, owner: Optional[dict]) -> None:
        """Remove the lock if it is still the one judged stale."""
        now = self._read(tries=1)
        if now == owner or now is None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ holding

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat_s):
            now = self._read()
            if not now or now.get("token") != self.me["token"]:
                self.lost = (f"the lock {self.path} now names {describe(now)}" if now
                             else f"the lock {self.path} was removed")
                log.error("lost ownership of the run directory: %s", self.lost)
                return
            self.me["beat"] += 1
            tmp = self.path.with_name(f".{LOCK}.{self.me['token']}")
            tmp.write_text(json.dumps(self.me))
            os.replace(tmp, self.path)

    def owned(self) -> bool:
        """Whether the lock still names this process (checked on disk, now)."""
        if self.lost:
            return False
        now = self._read()
        return bool(now) and now.get("token") == self.me["token"]

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.owned():
                os.unlink(self.path)
