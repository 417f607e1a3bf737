"""A one-node SLURM cluster on localhost, started and stopped by the tests.

Everything lives in one temporary folder (munge key and socket, slurm.conf, spool
and state, logs), so nothing under /etc or /run is touched and several runs never
meet. Needs Debian's `slurm-wlm` and `munge` and root (slurmd runs jobs as any
user); `.ci/run` installs the packages when apt is there.

By hand: `python tests/workflow/slurm_cluster.py DIR` starts one and prints the environment
to use it, Ctrl-C stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (
            f"SLURM not installed ({', '.join(missing)} not found); "
            "install with: apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


@dataclass
class Cluster:
    """A running one-node cluster; `env` is what a client needs to reach it."""

    root: Path
    env: dict[str, str]
    partition: str = "debug"
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        subprocess.run(
            ["scancel", "--full", "--partition", self.partition],
            env=self.env,
            capture_output=True,
            check=False,
        )
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        """Tail of every daemon log, for a failing test's message."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, so that two clusters (two test runs) never meet."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _slurm_conf(
    root: Path, host: str, cpus: int, memory_mb: int, munge_socket: Path, ports: list[int]
) -> str:
    return f"""\
ClusterName=hmiltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Take the node's CPUs from this file, not the hardware: the tests' jobs are short and
# mostly start-up, so more of them may share the real cores.
SlurmdParameters=config_overrides
# Two GPUs that are only counted (no device files): jobs that ask for GPUs are scheduled,
# and given CUDA_VISIBLE_DEVICES, as on a GPU node, and run on the CPU.
GresTypes=gpu
MinJobAge=3600
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start(root: Path, timeout: float = 60.0) -> Cluster:
    """Start munged, slurmctld and slurmd under `root`; wait for the node to be idle."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    root = Path(root).resolve()
    for sub in ("state", "spool", "run", "log", "munge", "bin"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)

    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = root / "munge" / "munge.socket"

    host = socket.gethostname().split(".")[0]
    cpus = max(8, os.cpu_count() or 1)
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, cpus, memory_mb, munge_socket, _free_ports(2)))
    # Slurm wants character devices for GPUs: /dev/null and /dev/zero stand in for
    # /dev/nvidia0 and /dev/nvidia1 (no cgroup here, so nothing is actually fenced).
    (root / "gres.conf").write_text(
        "".join(f"NodeName={host} Name=gpu File={dev}\n" for dev in ("/dev/null", "/dev/zero"))
    )

    # The executor's job step runs `srun` with an environment that lacks SLURM_CONF;
    # a wrapper first on PATH puts it back, so jobs reach this cluster and not /etc.
    for client in CLIENTS:
        wrapper = root / "bin" / client
        wrapper.write_text(f'#!/bin/sh\nexport SLURM_CONF="{conf}"\nexec {_which(client)} "$@"\n')
        wrapper.chmod(0o755)

    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    cluster = Cluster(root=root, env=env)

    def launch(*argv: str) -> None:
        log = open(root / "log" / f"{Path(argv[0]).name}.out", "wb")  # noqa: SIM115
        cluster.processes.append(
            subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        )

    try:
        launch(
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        )
        _wait_for(lambda: munge_socket.exists(), timeout, "munged socket", cluster)
        launch(_which("slurmctld"), "-D", "-i", "-f", str(conf))
        launch(_which("slurmd"), "-D", "-f", str(conf))
        _wait_for(lambda: _node_idle(env), timeout, "node idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_idle(env: dict[str, str]) -> bool:
    out = subprocess.run(
        ["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True, check=False
    )
    return out.returncode == 0 and out.stdout.strip().startswith("idle")


def _wait_for(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        for proc in cluster.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode})\n{cluster.logs()}")
        time.sleep(0.5)
    raise RuntimeError(f"local SLURM: timed out waiting for {what}\n{cluster.logs()}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on kill too
    cluster = start(Path(sys.argv[1]))
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']} PATH={cluster.root / 'bin'}:$PATH")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
