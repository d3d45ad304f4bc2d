"""What the SLURM cluster says, asked through its commands (sinfo, squeue, sacct): partitions
and their GPUs before a submission, the state of jobs submitted earlier, and sbatch's refusals
as one line naming the fix. Nothing here submits or changes anything."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from agnostic_sam.errors import UsageError

__all__ = ["LIVE", "NodeLimits", "describe_state", "job_states", "node_limits", "partitions",
           "sbatch_refusal", "slurm_command"]

# SLURM job states (squeue/sacct) in which a job will still run or is running: a run left to
# such a job is not submitted again. The first group waits for a node, the second holds one.
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD",
           "SUSPENDED"}
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
LIVE = _QUEUED | _RUNNING
_TIMEOUT_S = 30  # a controller that does not answer in this time is down, for our purposes
# sbatch's refusal (its last "error:" line) -> the flag that fixes it
_FIXES = (
    ("generic resource", "the cluster has no such GPUs (GRES): use --gpus-per-run 0, or a "
                         "partition with GPUs"),
    ("partition", "use --partition with one of the partitions sinfo lists"),
    ("memory specification", "lower --mem-gb (sinfo -o '%P %m' shows each node's MB)"),
    ("node configuration is not available", "lower --cpus-per-run, --mem-gb or --gpus-per-run "
                                            "(sinfo -o '%P %c %m %G' shows what nodes have)"),
    ("time limit", "lower --time (sinfo -o '%P %l' shows each partition's limit)"),
    ("feature", "use --sbatch constraint=FEATURE with a feature the nodes have "
                "(sinfo -o '%P %f')"),
    ("account", "use --sbatch account=NAME with an account of yours (sacctmgr show assoc)"),
    ("qos", "use --sbatch qos=NAME with a QOS you may use (sacctmgr show qos)"),
)


def slurm_command(args: Sequence[str], timeout: float = _TIMEOUT_S) -> str:
    """stdout of a SLURM client command; UsageError (one line) when it is missing, fails or
    does not answer in ``timeout`` seconds."""
    if shutil.which(args[0]) is None:
        raise UsageError(f"--launcher slurm needs the SLURM commands, and {args[0]} is not on "
                         "PATH: run on a machine of the cluster, or use --launcher local")
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{args[0]} did not answer in {timeout:g} s: is the SLURM controller "
                         "up (scontrol ping)?") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()] or ["(no message)"]
        raise UsageError(f"{' '.join(args[:2])} failed: {lines[-1].strip()}")
    return done.stdout


def partitions(timeout: float = _TIMEOUT_S) -> list[str]:
    """The partitions this user can submit to (sinfo), the default one first."""
    names = slurm_command(["sinfo", "-h", "-o", "%P"], timeout).split()
    default = [n.rstrip("*") for n in names if n.endswith("*")]
    return default + sorted({n.rstrip("*") for n in names} - set(default))


@dataclass(frozen=True)
class NodeLimits:
    """The most one node of a partition has: CPUs, memory (MB), GPUs (its gpu GRES)."""

    cpus: int
    mem_mb: int
    gpus: int


def _gpus(gres: str) -> int:
    """GPUs in a GRES string (``gpu:2``, ``gpu:a100:4(S:0-1)``, ``(null)``)."""
    counts = [re.match(r"gpu(?::[^:(,]+)?:(\d+)", item) for item in gres.split(",")]
    return max([int(m.group(1)) for m in counts if m] or [0])


def _leading_int(text: str) -> int:
    """``"21694"`` -> 21694, ``"64+"`` -> 64, ``"n/a"`` -> 0 (sinfo's numbers)."""
    digits = re.match(r"\d*", text)
    return int(digits.group()) if digits and digits.group() else 0


def node_limits(partition: str | None, timeout: float = _TIMEOUT_S) -> NodeLimits:
    """What the biggest node of ``partition`` (None: the default one; a comma list: the
    biggest of them) has, from sinfo. UsageError naming the partitions when it is not one."""
    known = partitions(timeout)
    wanted = partition.split(",") if partition else known[:1]
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise UsageError(f"SLURM has no partition {unknown[0]!r}; choose from "
                         f"{', '.join(known) or '(none)'} (sinfo)")
    rows = slurm_command(["sinfo", "-h", "-p", ",".join(wanted), "-o", "%c|%m|%G"],
                         timeout).split()
    cpus, mem, gpus = [0], [0], [0]
    for row in rows:
        c, m, g = row.split("|")
        cpus.append(_leading_int(c))
        mem.append(_leading_int(m))
        gpus.append(_gpus(g))
    return NodeLimits(max(cpus), max(mem), max(gpus))


def _expand(job_id: str) -> list[str]:
    """``"12_[2,4-5%2]"`` -> ``["12_2", "12_4", "12_5"]`` (squeue/sacct write pending array
    tasks as one range); any other id stays as it is."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job_id)
    if m is None:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        first, _, last = part.partition("-")
        out += [f"{m.group(1)}_{k}" for k in range(int(first), int(last or first) + 1)]
    return out


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of each job (``"12"`` or an array task ``"12_3"``): squeue for jobs that
    are queued or running (it has no delay), sacct for the ones that ended. UNKNOWN for a job
    neither knows, e.g. an array task cancelled before it started (it leaves no record)."""
    if not job_ids:
        return {}
    found: dict[str, str] = {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    queue = slurm_command(["squeue", "--array", "-h", "-o", "%i|%T", "-u", getpass.getuser()])
    ended = ""
    try:
        ended = slurm_command(["sacct", "-X", "-n", "-P", "-o", "JobID,State",
                               "-j", ",".join(arrays)])
    except UsageError:  # no accounting on this cluster: what squeue says is all there is
        pass
    for text in (ended, queue):  # squeue last: it is the newer word on a live job
        for line in text.splitlines():
            job, _, state = line.strip().partition("|")
            for one in _expand(job):
                found[one] = (state.split() or ["UNKNOWN"])[0]  # "CANCELLED by 0"
    return {j: found.get(j, "UNKNOWN") for j in job_ids}


def describe_state(state: str) -> str:
    """One word for a SLURM job state: queued, running, cancelled, failed (STATE), ended (a
    job that completed but left no result), or unknown."""
    if state in _QUEUED:
        return "queued"
    if state in _RUNNING:
        return "running"
    if state == "CANCELLED":
        return "cancelled"
    if state == "COMPLETED":
        return "ended without a result"
    if state == "UNKNOWN":
        return "unknown to SLURM (cancelled before it started, or purged)"
    return f"failed ({state})"


def sbatch_refusal(stderr: str, tasks: int) -> UsageError:
    """sbatch's refusal of a job array as one line: its own words and the flag that fixes it."""
    lines = [ln.split("error:", 1)[-1].strip() for ln in stderr.splitlines() if ln.strip()]
    words = lines[-1] if lines else "no message"
    hint = next((fix for key, fix in _FIXES if any(key in ln.lower() for ln in lines)),
                "see sbatch(1)")
    return UsageError(f"sbatch refused the job array of {tasks} task{'s' * (tasks != 1)} "
                      f"(nothing was submitted): {words}; {hint}")
