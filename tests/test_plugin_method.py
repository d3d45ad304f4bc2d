"""A method registered from one file outside the package, with a setting the package has never
seen (``tilt``), runs through train (library and command line), compare --tune, bench, timm,
Lightning, Hugging Face and accelerate, and through the conformance suite, by registration
alone: each path gives what SAM at rho * tilt gives."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tests import plugin_tilted
from tests.plugin_tilted import NAME

from agnostic_sam.conformance import check_method
from agnostic_sam.methods import get_method
from agnostic_sam.train import load_checkpoint, load_config, train

TESTS = Path(__file__).parent


def _cfg(out, **kw):
    base = {"epochs": 1, "max_steps": 4, "threads": 1, "progress": False, "model": "mlp_mini"}
    return load_config(None, {**base, "out": str(out), **kw})


def _weights(run):
    return load_checkpoint(Path(run) / "checkpoint.pt")["model"]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_record_comes_from_the_plugin_class() -> None:
    info = get_method(NAME)
    assert info.cls is plugin_tilted.TiltedSAM and info.tune == "tilt"
    assert info.setting_names == ("rho", "adaptive", "tilt") and info.grid == (0.5, 1.0, 2.0)


def test_train_library_and_command_line(tmp_path) -> None:
    train(_cfg(tmp_path / "t", optimizer=NAME, rho=0.05, method_args={"tilt": 2.0}))
    train(_cfg(tmp_path / "s", optimizer="sam", rho=0.1))
    assert _same(_weights(tmp_path / "t"), _weights(tmp_path / "s"))
    env = {"AGNOSTIC_SAM_PLUGINS": "plugin_tilted", "PYTHONPATH": str(TESTS),
           "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-c", "import sys; from agnostic_sam.cli import main; "
           "sys.exit(main(sys.argv[1:]))"]
    done = subprocess.run(cli + ["train", "--optimizer", NAME, "--rho", "0.05", "--method-args",
                                 "tilt=2", "--epochs", "1", "--max-steps", "4", "--threads",
                                 "1", "--no-progress", "--model", "mlp_mini", "--out",
                                 str(tmp_path / "c")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _same(_weights(tmp_path / "c"), _weights(tmp_path / "s"))
    bad = subprocess.run(cli + ["train", "--optimizer", NAME, "--method-args", "tilt=-1",
                                "--out", str(tmp_path / "bad")], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "agnostic-sam: error: method 'test-tilted-sam': invalid tilt=-1.0: must be a float in "
        "[0, inf)"]


def test_compare_tunes_the_plugins_own_setting(tmp_path) -> None:
    from agnostic_sam.compare import CompareConfig, compare

    cc = CompareConfig(train=_cfg(tmp_path / "cmp", rho=0.05), optimizers=["sgd", NAME],
                       seeds=[0], tune=[1.0, 2.0])
    report = compare(cc, print_report=False)
    tune_runs = sorted((tmp_path / "cmp" / "tune" / NAME).glob("*/seed0/config.yaml"))
    assert [load_config(p).method_args for p in tune_runs] == [{"tilt": 1.0}, {"tilt": 2.0}]
    chosen = report["tuning"]["chosen"][NAME] if "chosen" in report.get("tuning", {}) else None
    final = load_config(tmp_path / "cmp" / NAME / "seed0" / "config.yaml")
    assert final.method_args["tilt"] in (1.0, 2.0)
    if chosen is not None:
        assert final.method_args["tilt"] == chosen
    assert "tilt=" in report["summary"][NAME]["radius"]


def test_bench_times_it(tmp_path) -> None:
    from agnostic_sam.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(model="cnn_mini", batch_size=10, image_size=8, rounds=1,
                                   steps=1, warmup=0, methods=("sam", NAME)), command="pytest")
    assert result["methods"][NAME]["ms_per_step"]["median"] > 0
    assert result["methods"][NAME]["samples_per_step"] == result["methods"]["sam"][
        "samples_per_step"]


def test_timm_builds_and_steps_it() -> None:
    from agnostic_sam.integrations import timm as asam_timm

    asam_timm.register()
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    a = asam_timm.create_optimizer(nets[0], f"{NAME}-sgd", lr=0.1, rho=0.05, tilt=2.0)
    b = asam_timm.create_optimizer(nets[1], "sam-sgd", lr=0.1, rho=0.1)
    assert type(a) is plugin_tilted.TiltedSAM
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for net, opt in zip(nets, (a, b)):
        asam_timm.train_step(opt, lambda batch, net=net: F.cross_entropy(net(batch[0]), batch[1]),
                             (x, y))
    assert torch.equal(nets[0].weight, nets[1].weight)


def test_lightning_accelerate_and_hf_step_it(tmp_path) -> None:
    from tests import test_integrations_accelerate as A
    from tests import test_integrations_hf as H
    from tests import test_integrations_lightning as LT

    # Lightning: a module whose configure_optimizers returns the plugin's optimizer.
    class Tilted(LT.Lit):
        def configure_optimizers(self):
            return plugin_tilted.TiltedSAM(self.parameters(), torch.optim.AdamW, lr=0.01,
                                           rho=0.025, tilt=2.0, weight_decay=0.01)

    lit = Tilted("sam")
    LT._fit(lit)
    LT._assert_close(lit, LT._reference("sam"), atol=0)
    # accelerate: SharpnessStep with the plugin's optimizer
    from accelerate import Accelerator

    from agnostic_sam.integrations.accelerate import SharpnessStep

    acc = Accelerator(cpu=True)
    net = A._net()
    opt = plugin_tilted.TiltedSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                                  rho=0.025, tilt=2.0)
    x, y = A._data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=A.BATCH, shuffle=False)
    model, opt, loader = acc.prepare(net, opt, loader)
    step = SharpnessStep(acc, model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            with acc.accumulate(model):
                step(batch)
    ref, _, _ = A._run("sam")
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))
    # Hugging Face: sharpness= the plugin's name, its setting through method_args=
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, per_device_train_batch_size=H.BATCH,
        max_steps=H.STEPS, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, report_to=[], logging_steps=1000,
        disable_tqdm=True, train_sampling_strategy="sequential", dataloader_drop_last=True,
        seed=0, save_strategy="no")
    model = H._model()
    trainer = H.SharpnessTrainer(model=model, args=args, train_dataset=H._Dataset(),
                                 sharpness=NAME, rho=0.025, method_args={"tilt": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    _, sam_model = H._train(tmp_path / "hf_sam", sharpness="sam")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), sam_model.parameters()))


def test_the_conformance_suite_in_one_call() -> None:
    check_method(NAME)


def test_report_json_is_strict(tmp_path) -> None:
    train(_cfg(tmp_path / "r", optimizer=NAME, method_args={"tilt": 0.5}))
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["optimizer"] == NAME
