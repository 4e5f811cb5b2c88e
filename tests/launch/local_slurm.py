"""A real single-node SLURM cluster in a temporary directory (Debian slurm-wlm + munge), for tests.

Daemons are started by hand (no systemd) as root, everything under one directory, loopback only;
`stop()` kills them and removes what they left. See ../shared/notes/slurm-on-one-machine.md.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")


def available() -> str:
    """'' when a local cluster can be started here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM daemons need root"
    return ""


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def _write_conf(self) -> None:
        host = socket.gethostname()
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)
        ctl_port = 16817 + os.getpid() % 1000
        self.conf.write_text("\n".join([
            "ClusterName=finevit-test", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}", f"SlurmdPort={ctl_port + 1}",
            "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            "AuthType=auth/munge", f"AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=10",
            "CredType=cred/munge", "MinJobAge=4", "ReturnToService=2", "MpiDefault=none",
            "SchedulerType=sched/backfill", "KillWait=5", "InactiveLimit=0",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self) -> "LocalSlurm":
        self._write_conf()
        r = self.root
        subprocess.run([_exe("mungekey"), "-c", "-f", "-k", str(r / "munge.key")], check=True,
                       capture_output=True)
        subprocess.run([_exe("munged"), f"--socket={r}/munge/munge.socket.2", f"--key-file={r}/munge.key",
                        f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/munge.seed", "--force"], check=True, capture_output=True)
        subprocess.run([_exe("slurmctld"), "-i"], env=self.env, check=True, capture_output=True)
        subprocess.run([_exe("slurmd")], env=self.env, check=True, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"local SLURM did not come up: {out.stdout} {out.stderr}")

    def sbatch(self, args: list[str], env: dict, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("sbatch"), "--parsable", *args], env={**self.env, **env}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def scontrol(self, *args: str) -> str:
        return subprocess.run([_exe("scontrol"), *args], env=self.env, capture_output=True, text=True).stdout

    def stop(self) -> None:
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.root / pidfile
            if path.exists():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
        time.sleep(1)
