"""DDP with the gloo backend: 2 processes on CPU, a float64 MLP without BatchNorm.

One spawn runs every scenario (optimizer x perturbation x accumulation) and saves each rank's
final weights and per-step all-reduce counts; the tests compare them with single-process runs
on the same global batches and with an independent autograd reference for `local`. The tests
that need the spawn are marked slow (about 8 s of CPU for the spawn); the rest run by default.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.errors import UsageError
from agnostic_sam.optim import SAM, AgnosticSAM
from agnostic_sam.train.distributed import (
    DistInfo,
    accumulation_context,
    all_reduce_sum,
    cleanup,
    gather_to_main,
    global_split_sizes,
    init_distributed,
    local_batch_size,
    replica_digest,
    shard_bounds,
    shard_columns,
    verify_replicas,
    wrap_model,
)

WORLD = 2
STEPS = 3
BATCH = 32  # global |B|; 16 per rank
N_T, N_V = global_split_sizes(BATCH, 0.7, WORLD)  # (22, 10): 11 + 5 per rank
D_IN, HIDDEN, CLASSES = 5, 8, 3
# large radii: local and synced differ clearly
LR, MOMENTUM, RHO, RHO1, RHO2 = 0.2, 0.9, 0.5, 0.5, 0.3
PASSES = {"full": 4, "simpler": 3, "sam": 2}
# (optimizer, perturbation, accumulate)
SCENARIOS = [
    (kind, mode, 1) for kind in ("full", "simpler", "sam") for mode in ("synced", "local")
] + [("full", "synced", 4), ("full", "local", 4), ("sam", "synced", 4)]


# ---- shared by the workers and the references ------------------------------------------------

def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(STEPS, BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()


def _optimizer(kind: str, model: nn.Module, perturbation: str) -> Any:
    common = dict(model=model, perturbation=perturbation, lr=LR, momentum=MOMENTUM)
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=RHO, **common)
    return AgnosticSAM(
        model.parameters(), torch.optim.SGD, rho1=RHO1, rho2=RHO2, variant=kind, **common
    )


def _closure(model: nn.Module, opt: Any, x: Tensor, y: Tensor, k: int) -> Any:
    """Forward + backward of the mean loss over (x, y) in k micro-batches."""
    def closure() -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for i, (xm, ym) in enumerate(zip(x.tensor_split(k), y.tensor_split(k))):
            with accumulation_context(model, i, k):  # forward inside no_sync too
                loss = F.cross_entropy(model(xm), ym) * (len(ym) / len(y))
                opt.backward(loss)
            total += loss.detach()
        return total
    return closure


def _run(kind: str, perturbation: str, k: int, model: nn.Module, info: DistInfo,
         on_step: Any = None) -> None:
    """STEPS steps on this rank's shard of every global batch (the whole batch for one process).

    Each global row is [B^t (N_T) | B^v (N_V)]; rank r takes its slice of each block.
    """
    x, y = _data()
    index = torch.arange(BATCH).expand(STEPS, BATCH)
    opt = _optimizer(kind, model, perturbation)
    parts = None if kind == "sam" else (N_T, N_V)
    local = shard_columns(index, info, parts)
    for s in range(STEPS):
        xs, ys = x[s][local[s]], y[s][local[s]]
        if kind == "sam":
            opt.step(_closure(model, opt, xs, ys, k))
        else:
            n_t = N_T // info.world_size
            opt.step(
                _closure(model, opt, xs[:n_t], ys[:n_t], k),
                _closure(model, opt, xs[n_t:], ys[n_t:], k),
            )
        if on_step is not None:
            on_step()


def _counting_hook(state, bucket):  # type: ignore[no-untyped-def]
    # Unannotated on purpose: DDP rejects a hook whose annotations (strings here) are not
    # dist.GradBucket / Future[Tensor].
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state["calls"] += 1
    return allreduce_hook(None, bucket)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        results: dict[Any, Any] = {"info": (info.rank, info.world_size, info.backend)}
        for scenario in SCENARIOS:
            ddp = wrap_model(_model(), info)
            state = {"calls": 0}
            ddp.register_comm_hook(state, _counting_hook)
            counts: list[int] = []

            def record(state: dict[str, int] = state, counts: list[int] = counts) -> None:
                counts.append(state["calls"] - sum(counts))

            _run(*scenario, ddp, info, on_step=record)
            results[scenario] = {
                "params": {n: t.clone() for n, t in ddp.module.state_dict().items()},
                "allreduce": counts,
                "digest": verify_replicas(ddp),
            }
        # fp16 loss scaling, local perturbation: an overflow in rank 0's first ascent pass alone
        # must skip the step on every rank (the final all-reduce carries it), or replicas drift.
        ddp = wrap_model(_model(), info)
        scaler = LossScaler(init_scale=8.0)
        opt = AgnosticSAM(ddp.parameters(), torch.optim.SGD, model=ddp, perturbation="local",
                          loss_scaler=scaler, lr=LR, momentum=MOMENTUM)
        calls = [0]

        def overflowing(xs: Tensor, ys: Tensor) -> Any:
            def closure() -> Tensor:
                calls[0] += 1
                loss = F.cross_entropy(ddp(xs), ys)
                opt.backward(loss * (float("inf") if rank == 0 and calls[0] == 1 else 1.0))
                return loss
            return closure

        x, y = _data()
        before = {n: t.clone() for n, t in ddp.module.state_dict().items()}
        half = BATCH // 2
        opt.step(overflowing(x[0][:half], y[0][:half]), overflowing(x[0][half:], y[0][half:]))
        results["fp16_local"] = {
            "skipped": float(opt.stats["skipped"]),
            "scale": scaler.get_scale(),
            "unchanged": all(torch.equal(before[n], t) for n, t in ddp.module.state_dict().items()),
        }
        # A drifted replica must be caught on every rank.
        drifted = _model()
        if rank == 1:
            with torch.no_grad():
                drifted[0].bias[0] += 1e-12
        try:
            verify_replicas(drifted)
            results["drift_caught"] = None
        except RuntimeError as exc:
            results["drift_caught"] = str(exc)
        results["gathered"] = gather_to_main({"rank": rank})
        results["reduced"] = all_reduce_sum({"loss": torch.tensor(1.5 * (rank + 1)),
                                             "count": torch.tensor(rank + 2)})
        torch.save(results, Path(out) / f"rank{rank}.pt")
        # DDP reducers hold the process group: free them before it is destroyed.
        ddp = opt = None
        gc.collect()
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(kind: str, perturbation: str, k: int) -> dict[str, Tensor]:
    model = _model()
    _run(kind, perturbation, k, model, DistInfo())
    return model.state_dict()


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# ---- an independent reference for `local`: each rank ascends on its own shard -----------------

def _local_reference(kind: str) -> dict[str, Tensor]:
    """Plain autograd: per rank shard, the ascent passes of `kind`; the final gradients averaged
    over ranks (what DDP all-reduces); then SGD with momentum."""
    model = _model()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    buf: list[Tensor] | None = None
    x, y = _data()

    def grad(at: list[Tensor], xb: Tensor, yb: Tensor) -> list[Tensor]:
        w = [t.clone().requires_grad_(True) for t in at]
        names = [n for n, _ in model.named_parameters()]
        logits = torch.func.functional_call(model, dict(zip(names, w)), (xb,))
        return list(torch.autograd.grad(F.cross_entropy(logits, yb), w))

    def unit(g: list[Tensor]) -> list[Tensor]:
        norm = torch.sqrt(sum((t * t).sum() for t in g)) + 1e-12
        return [t / norm for t in g]

    for s in range(STEPS):
        finals = []
        for r in range(WORLD):
            if kind == "sam":
                lo, hi = shard_bounds(BATCH, r, WORLD)
                xb, yb = x[s, lo:hi], y[s, lo:hi]
                e = unit(grad(theta, xb, yb))
                finals.append(grad([t + RHO * u for t, u in zip(theta, e)], xb, yb))
                continue
            (lt, ht), (lv, hv) = shard_bounds(N_T, r, WORLD), shard_bounds(N_V, r, WORLD)
            xt, yt = x[s, lt:ht], y[s, lt:ht]
            xv, yv = x[s, N_T + lv:N_T + hv], y[s, N_T + lv:N_T + hv]
            gv = grad(theta, xv, yv)
            if kind == "full":
                gv = grad([t + RHO2 * u for t, u in zip(theta, unit(gv))], xv, yv)
            ut, uv = unit(grad(theta, xt, yt)), unit(gv)
            finals.append(grad([t + RHO1 * a - RHO2 * b for t, a, b in zip(theta, ut, uv)], xt, yt))
        g = [sum(parts) / WORLD for parts in zip(*finals)]
        buf = g if buf is None else [MOMENTUM * b + gi for b, gi in zip(buf, g)]
        theta = [t - LR * b for t, b in zip(theta, buf)]
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, theta))


# ---- tests: equivalences ---------------------------------------------------------------------

@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s[1] == "synced"], ids=str)
def test_synced_equals_single_process_on_global_batch(
    ddp_runs: list[dict[Any, Any]], scenario: tuple
) -> None:
    kind, _, k = scenario
    single = _single(kind, "synced", 1)  # one process, mean loss over the global B^t / B^v
    assert _max_diff(ddp_runs[0][scenario]["params"], single) < 1e-6


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("kind", ["full", "simpler", "sam"])
def test_local_equals_per_rank_ascent_reference(ddp_runs: list[dict[Any, Any]], kind: str) -> None:
    ref = _local_reference(kind)
    assert _max_diff(ddp_runs[0][(kind, "local", 1)]["params"], ref) < 1e-6


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("kind", ["full", "simpler", "sam"])
def test_local_and_synced_give_different_weights(ddp_runs: list[dict[Any, Any]], kind: str) -> None:
    run = ddp_runs[0]
    assert _max_diff(run[(kind, "local", 1)]["params"], run[(kind, "synced", 1)]["params"]) > 1e-4


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("mode", ["synced", "local"])
def test_accumulate_4_equals_accumulate_1_under_ddp(
    ddp_runs: list[dict[Any, Any]], mode: str
) -> None:
    run = ddp_runs[0]
    assert _max_diff(run[("full", mode, 4)]["params"], run[("full", mode, 1)]["params"]) < 1e-6


@pytest.mark.parametrize("kind", ["full", "simpler", "sam"])
def test_accumulate_4_equals_accumulate_1_single_process(kind: str) -> None:
    assert _max_diff(_single(kind, "synced", 4), _single(kind, "synced", 1)) < 1e-6


# ---- tests: communication and replicas -------------------------------------------------------

@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_gradient_allreduce_count_per_step(ddp_runs: list[dict[Any, Any]], scenario: tuple) -> None:
    """One bucket (75 parameters): local all-reduces once per step, synced once per pass, and
    accumulation adds none (no_sync until the last micro-batch)."""
    kind, mode, _ = scenario
    expected = 1 if mode == "local" else PASSES[kind]
    for run in ddp_runs:
        assert run[scenario]["allreduce"] == [expected] * STEPS


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_ranks_end_bit_identical(ddp_runs: list[dict[Any, Any]], scenario: tuple) -> None:
    a, b = ddp_runs[0][scenario], ddp_runs[1][scenario]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert a["digest"] == b["digest"]


@pytest.mark.slow  # spawns 2 processes
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(
    ddp_runs: list[dict[Any, Any]]
) -> None:
    for run in ddp_runs:
        assert run["fp16_local"] == {"skipped": 1.0, "scale": 4.0, "unchanged": True}


@pytest.mark.slow  # spawns 2 processes
def test_drifted_replica_is_reported_on_every_rank(ddp_runs: list[dict[Any, Any]]) -> None:
    for run in ddp_runs:
        assert run["drift_caught"] == (
            "model replicas differ from rank 0 on ranks [1]: training state diverged"
        )


@pytest.mark.slow  # spawns 2 processes
def test_process_group_and_metric_reduction(ddp_runs: list[dict[Any, Any]]) -> None:
    assert [run["info"] for run in ddp_runs] == [(0, 2, "gloo"), (1, 2, "gloo")]
    for run in ddp_runs:
        assert run["reduced"]["loss"].item() == 4.5 and run["reduced"]["count"].item() == 5
    assert ddp_runs[0]["gathered"] == [{"rank": 0}, {"rank": 1}] and ddp_runs[1]["gathered"] is None


# ---- tests: sharding arithmetic and bad input (no process group) ------------------------------

def test_shards_partition_every_block() -> None:
    index = torch.arange(3 * 12).view(3, 12)
    parts = (8, 4)
    shards = [shard_columns(index, DistInfo(rank=r, world_size=2), parts) for r in range(2)]
    assert [s.shape for s in shards] == [torch.Size([3, 6])] * 2
    assert torch.equal(shards[0], torch.cat([index[:, 0:4], index[:, 8:10]], 1))
    assert torch.equal(shards[1], torch.cat([index[:, 4:8], index[:, 10:12]], 1))
    assert shard_columns(index, DistInfo()) is index
    assert [shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_split_sizes_per_rank() -> None:
    assert global_split_sizes(64, 0.7, 1) == (45, 19)  # = single process: round(44.8)
    assert global_split_sizes(64, 0.7, 2) == (44, 20)  # 2 x (22 + 10)
    assert local_batch_size(64, 4) == 16


def test_indivisible_or_unsplittable_batches_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="batch_size 30 is not divisible by the 4 processes"):
        local_batch_size(30, 4)
    with pytest.raises(UsageError, match="too few to split"):
        global_split_sizes(8, 0.7, 8)
    with pytest.raises(UsageError, match="not divisible"):
        shard_columns(torch.zeros(2, 10, dtype=torch.long), DistInfo(rank=0, world_size=4))


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 30}, "batch_size 30 is not divisible by the 4 processes"),
    ({"batch_size": 32, "accumulate": 3},
     "accumulate 3 exceeds the 2 samples each of the 4 processes"),
])
def test_trainer_rejects_what_ddp_cannot_honour(overrides: dict[str, Any], message: str) -> None:
    from agnostic_sam.train import TrainConfig
    from agnostic_sam.train.build import check_distributed as _check_distributed

    with pytest.raises(UsageError, match=message):
        _check_distributed(TrainConfig(**overrides), 4)
    _check_distributed(TrainConfig(batch_size=32), 4)  # 8 per rank: 6 + 2


def test_init_without_torchrun_is_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main, info.backend) == (
        0, 1, False, True, None
    )
    model = nn.Linear(2, 2)
    assert wrap_model(model, info, sync_bn=True) is model


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_bad_launch_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        init_distributed("cpu")


def test_sync_bn_on_cpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--sync-bn needs CUDA"):
        wrap_model(nn.BatchNorm1d(3), DistInfo(rank=0, world_size=2), sync_bn=True)


def test_accumulation_context_silences_all_but_the_last_micro_batch() -> None:
    entered: list[int] = []

    class Fake(nn.Module):
        @contextlib.contextmanager
        def no_sync(self) -> Any:
            entered.append(1)
            yield

    fake = Fake()
    for i in range(4):
        with accumulation_context(fake, i, 4):
            pass
    assert len(entered) == 3
    with accumulation_context(nn.Linear(1, 1), 0, 4):  # no DDP: nothing to silence
        pass


# ---- the training command under torchrun (2 gloo processes on CPU) ----------------------------

SRC = Path(__file__).resolve().parents[1] / "src"
TORCHRUN_EPOCHS = 4


def _torchrun(out: Path, *extra: str) -> subprocess.Popen[str]:
    """`torchrun --standalone --nproc_per_node 2 -m agnostic_sam train ...` in its own session
    (so the whole process group can be killed)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(WORLD),
        "-m", "agnostic_sam", "train", "--dataset", "digits", "--model", "mlp_mini",
        "--optimizer", "agnostic-sam", "--perturbation", "local", "--accumulate", "2",
        "--epochs", str(TORCHRUN_EPOCHS), "--batch-size", "32", "--lr", "0.1", "--device", "cpu",
        "--threads", "1", "--no-progress", "--out", str(out), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _finish(proc: subprocess.Popen[str]) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("epoch_seconds")
    return rows


@pytest.mark.slow  # three torchrun launches
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_torchrun_kill_and_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    from agnostic_sam.train import load_checkpoint, load_trained

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    output = _finish(_torchrun(whole))
    assert output.count("final test acc") == 1  # only rank 0 reports
    result = json.loads((whole / "result.json").read_text())
    assert result["world_size"] == WORLD and result["epochs_completed"] == TORCHRUN_EPOCHS
    # The trainer compared every rank's SHA-256 before writing result.json (a mismatch fails the
    # run); rank 0's checkpoint is the model those ranks held.
    model, _ = load_trained(whole)
    assert result["replica_sha256"] == replica_digest(model)

    proc = _torchrun(broken)
    deadline = time.monotonic() + 300
    while not (broken / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "no checkpoint before the run ended"
        )
        time.sleep(0.02)
    # Mid-run, as a dead node: both ranks (torchrun starts each in its own session), then torchrun.
    for pid in _children(proc.pid):
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = load_checkpoint(broken / "checkpoint.pt")["epoch"]
    assert 1 <= killed_at < TORCHRUN_EPOCHS and not (broken / "result.json").exists()

    _finish(_torchrun(broken, "--resume"))
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(broken / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _metrics(whole) == _metrics(broken)
    assert (json.loads((broken / "result.json").read_text())["replica_sha256"]
            == result["replica_sha256"])
