"""Every registered method under DDP (gloo, 2 CPU processes), from its record alone:

* ``perturbation="synced"``: every pass is all-reduced, so 2 ranks with half the global batch
  each equal one process on the global batch (float64, to rounding: the all-reduce averages);
* ``perturbation="local"``: the ranks stay bit-identical replicas, their optimizer state included
  (a checkpoint written by rank 0 resumes every rank exactly).

Methods that split the batch get the global B^t / B^v as parts, each rank its share of both.
"""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from agnostic_sam.methods import create_optimizer, get_method, list_methods
from agnostic_sam.methods.step import step_closures

WORLD, STEPS, BATCH, N_T = 2, 4, 20, 14  # global |B| = 20: B^t 14, B^v 6 (7 + 3 per rank)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def _data() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _shard(t: Tensor, rank: int, world: int) -> Tensor:
    return t.tensor_split(world)[rank]


def _closure_of(info: Any, net: nn.Module, opt: Any) -> Any:
    def closure_of(batch: tuple[Tensor, Tensor]) -> Any:
        x, y = batch
        if info.closure == "per-sample":
            def per_sample(index: Tensor | None = None, backward: bool = True) -> Tensor:
                xs, ys = (x, y) if index is None else (x[index], y[index])
                losses = F.cross_entropy(net(xs), ys, reduction="none")
                if backward:
                    opt.backward(losses.mean())
                return losses.detach()
            return per_sample

        def closure() -> Tensor:
            loss = F.cross_entropy(net(x), y)
            opt.backward(loss)
            return loss
        return closure
    return closure_of


def _train(name: str, net: nn.Module, module: nn.Module, rank: int, world: int,
           perturbation: str) -> Any:
    info = get_method(name)
    opt = create_optimizer(name, module.parameters(), torch.optim.SGD,
                           {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, model=net,
                           perturbation=perturbation)
    for x, y in _data():
        if info.splits_batch:
            parts = ((_shard(x[:N_T], rank, world), _shard(y[:N_T], rank, world)),
                     (_shard(x[N_T:], rank, world), _shard(y[N_T:], rank, world)))
            closures = step_closures(info, _closure_of(info, net, opt), parts=parts)
        else:
            closures = step_closures(info, _closure_of(info, net, opt),
                                     (_shard(x, rank, world), _shard(y, rank, world)))
        opt.step(*closures)
    return opt


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in list_methods():
            for perturbation in ("synced", "local"):
                module = _model()
                ddp = nn.parallel.DistributedDataParallel(module)
                try:
                    opt = _train(name, ddp, module, rank, world, perturbation)
                except Exception as exc:  # both ranks fail alike; the test names it
                    results[(name, perturbation)] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                state = opt.state_dict()
                results[(name, perturbation)] = {
                    "weights": [p.detach().clone() for p in module.parameters()],
                    "state": {k: {n: v.clone() for n, v in s.items() if isinstance(v, Tensor)}
                              for k, s in state["state"].items()},
                }
                ddp = opt = None
                gc.collect()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    out = tmp_path_factory.mktemp("ddp_conformance")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("name", list_methods())
def test_synced_equals_one_process_on_the_global_batch(ranks: list[dict[Any, Any]],
                                                      name: str) -> None:
    if get_method(name).closure == "per-sample":
        # ESAM selects the sharpest floor(gamma n) samples of each rank's shard (as the authors'
        # DDP code): the union of per-rank selections is not the global batch's selection
        pytest.skip(f"{name} selects samples per rank; its replicas are checked below")
    module = _model()
    _train(name, module, module, 0, 1, "synced")
    single = [p.detach() for p in module.parameters()]
    for r in range(WORLD):
        assert "error" not in ranks[r][(name, "synced")], ranks[r][(name, "synced")]
        got = ranks[r][(name, "synced")]["weights"]
        diff = max(float((a - b).abs().max()) for a, b in zip(got, single))
        assert diff < 1e-12, f"{name}: rank {r} differs from one process by {diff}"


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("perturbation", ["synced", "local"])
def test_ranks_stay_identical_replicas_state_included(ranks: list[dict[Any, Any]], name: str,
                                                      perturbation: str) -> None:
    a, b = ranks[0][(name, perturbation)], ranks[1][(name, perturbation)]
    assert "error" not in a, a["error"][:300]
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for n, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][n]), (
                f"{name} ({perturbation}): optimizer state '{n}' differs between ranks, so a "
                "checkpoint written by rank 0 would not resume rank 1 exactly")
