"""A real SLURM cluster on localhost for tests: munged, one slurmctld and two slurmd "nodes" (node1, node2).

Everything the daemons write lives under one folder; clients find the cluster through SLURM_CONF. Each slurmd runs in
a mount namespace of its own with a private /dev/shm, as on separate machines. Needs root and
Debian's `slurm-wlm` + `munge` (`install()` adds them with apt when missing). Each node declares one fake GPU (a gres
with no device file) so that the shipped sbatch scripts run unmodified with --gpus-per-node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
PACKAGES = ("slurm-wlm", "munge")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root"
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed (apt-get install {' '.join(PACKAGES)})" if missing else None


def install(attempts: int = 3) -> None:
    """apt-get install slurm-wlm munge (root only). A failed attempt (a mirror that did not answer) is retried; the
    last failure raises with apt's own message."""
    for attempt in range(1, attempts + 1):
        error = _apt("update", "-qq") or _apt("install", "-y", "-qq", *PACKAGES)
        if error is None:
            return
        if attempt == attempts:
            raise RuntimeError(f"installing {' '.join(PACKAGES)} failed {attempts} times: {error}")
        time.sleep(10 * attempt)


def _apt(*args: str) -> str | None:
    """Runs apt-get, waiting for a lock that another apt holds instead of failing; None, or what went wrong."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    return f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()[-2000:]}"


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free TCP ports (slurm.conf takes a node port range)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + count < 65000 and all(_port_free(base + i) for i in range(count)):
            return [base + i for i in range(count)]
    raise RuntimeError("no free port range for the SLURM daemons")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ensure_hosts() -> None:
    """slurmd resolves its node name: node1/node2 must name this machine."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    if not all(any(name in line.split()[1:] for line in text.splitlines() if line.strip()) for name in NODES):
        hosts.write_text(text.rstrip("\n") + "\n127.0.0.1 " + " ".join(NODES) + "\n")


def _ensure_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def _write_config(self) -> None:
        ctld, *nodes = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=lm2test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=30
GresTypes=gpu
NodeName={NODES[0][:-1]}[1-{len(NODES)}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{nodes[0]}-{nodes[-1]}] \
CPUs={cpus} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (self.root / "gres.conf").write_text(
            f"NodeName={NODES[0][:-1]}[1-{len(NODES)}] Name=gpu Count=1 File=/dev/null\n"
        )

    def start(self) -> SlurmCluster:
        _ensure_hosts()
        _ensure_munge()
        self._write_config()
        self._daemons.append(
            subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        for node in NODES:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            # Each "node" gets its own /dev/shm, as separate machines have: streaming's shared memory is per node.
            slurmd = f"mount -t tmpfs tmpfs /dev/shm && exec slurmd -D -N {node} -f {self.conf}"
            self._daemons.append(
                subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", slurmd],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
        self._wait_for_idle_nodes()
        return self

    def _wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = result.stdout
            if result.returncode == 0 and all(f"{node} idle" in states for node in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout} s: {states!r}\n{self.logs()}")

    def run(
        self, *command: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, env={**self.env, **(env or {})}, cwd=cwd, check=check, capture_output=True, text=True
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text()[-3000:]}" for path in sorted((self.root / "log").glob("*.log"))
        )

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for daemon in self._daemons:
            daemon.terminate()
        for daemon in self._daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
