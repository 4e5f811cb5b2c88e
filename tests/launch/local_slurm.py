"""A real SLURM cluster in a temporary directory (Debian slurm-wlm + munge), for tests.

Daemons are started by hand (no systemd) as root, everything under one directory, loopback only;
`stop()` kills them and removes what they left. See ../shared/notes/slurm-on-one-machine.md.

With nodes > 1, each node is its own slurmd (`slurmd -N n<i>`, its own port) on this machine, started
in private IPC and mount namespaces with its own tmpfs on /dev/shm and on `node_tmp`: what separate
machines have, and what mosaicml-streaming's shared memory and lock files need to not collide.
Jobs should set TMPDIR=node_tmp.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "unshare")


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
    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1):
        self.root, self.cpus, self.nodes = Path(root), cpus, [f"n{i + 1}" for i in range(nodes)]
        self.node_tmp = self.root / "node_tmp"
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def _write_conf(self) -> None:
        host = socket.gethostname()
        r = self.root
        for d in ("state", "log", "munge", "node_tmp", *(f"spool-{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)
        ctl_port = 16817 + os.getpid() % 1000
        self.conf.write_text("\n".join([
            "ClusterName=finevit-test", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            "AuthType=auth/munge", f"AuthInfo=socket={r}/munge/munge.socket.2,cred_expire=10",
            "CredType=cred/munge", "MinJobAge=4", "ReturnToService=2", "MpiDefault=none",
            "SchedulerType=sched/backfill", "KillWait=5", "InactiveLimit=0",
            *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={ctl_port + 1 + i} "
              f"CPUs={self.cpus} State=UNKNOWN" for i, n in enumerate(self.nodes)),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
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
        for node in self.nodes:  # a machine of its own, as far as shared memory goes
            mounts = f"mount -t tmpfs tmpfs /dev/shm && mount -t tmpfs tmpfs {self.node_tmp}"
            subprocess.run([_exe("unshare"), "--ipc", "--mount", "--propagation", "private", "sh", "-c",
                            f"{mounts} && exec {_exe('slurmd')} -N {node}"],
                           env=self.env, check=True, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run([_exe("sinfo"), "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            states = out.stdout.split()
            if out.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mix", "alloc"}:
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
        for pidfile in (*(f"slurmd-{n}.pid" for n in self.nodes), "slurmctld.pid", "munged.pid"):
            path = self.root / pidfile
            if path.exists():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
        time.sleep(1)


def submit(slurm: LocalSlurm, script: str, config: str, overrides: list[str], run_dir: Path, nodes: int,
           ranks: int = 2, env: Optional[dict] = None) -> subprocess.Popen:
    """`sbatch --wait SCRIPT` of a CPU job with `ranks` ranks over `nodes` nodes, running in the
    background; the job's output goes to <run_dir>.out."""
    from tiny_stage1 import ROOT

    env = {**os.environ, **slurm.env, "CONFIG": config, "GPUS_PER_NODE": str(ranks // nodes),
           "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           # node names (n1, n2) are not host names here; every node is this machine
           "MASTER_ADDR": "127.0.0.1", "LOCAL_ADDR": "127.0.0.1", "TMPDIR": str(slurm.node_tmp), **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["sbatch", "--parsable", "--wait", "--gpus-per-node=0", f"--nodes={nodes}",
           f"--cpus-per-task={max(1, slurm.cpus // nodes)}", f"--job-name={run_dir.name}", f"--output={run_dir}.out",
           script, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def finish(proc: subprocess.Popen, run_dir: Path) -> str:
    """Wait for the job; its output."""
    out, err = proc.communicate(timeout=600)
    log = Path(f"{run_dir}.out")
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {err}\n{text[-4000:]}"
    return text


def signal_after(slurm: LocalSlurm, proc: subprocess.Popen, run_dir: Path, steps: int = 3) -> None:
    """Once the job has logged `steps` steps, send what --signal=B:USR1@<s> sends shortly before
    the time limit."""
    deadline = time.time() + 300
    while time.time() < deadline and len(train_rows(run_dir)) < steps:
        assert proc.poll() is None, "the job ended before it could be signalled"
        time.sleep(0.5)
    # sbatch --wait prints the id only when it exits (stdout is a pipe): find the job by name.
    (line,) = [j for j in slurm.scontrol("show", "job", "-o").splitlines() if f" JobName={run_dir.name} " in j]
    job_id = line.split("JobId=")[1].split()[0]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env, check=True)
