"""Model registry: every *_mini trains a step, full-size parameter counts, parity of the
torchvision-based builders with torchvision's own, stems, and local pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from agnostic_sam.errors import UsageError
from agnostic_sam.models import MODELS, create_model, list_models, load_pretrained

MINIS = [name for name in list_models() if name.endswith("_mini")]
FULL = [name for name in list_models() if not name.endswith("_mini")]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_full_model_has_a_mini_and_the_paper_models_exist() -> None:
    assert set(FULL) >= {"mlp", "cnn", "resnet18", "resnet32", "wrn28_10", "pyramidnet101",
                         "densenet121", "efficientnet_b3", "efficientnet_b4"}
    assert {f"{name}_mini" for name in FULL} == set(MINIS)


@pytest.mark.parametrize("name", MINIS)
def test_mini_forward_backward_at_natural_size(name: str) -> None:
    torch.set_num_threads(1)
    spec = MODELS[name]
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=7, in_channels=spec.in_channels, image_size=spec.image_size
    )
    x = torch.randn(3, spec.in_channels, spec.image_size, spec.image_size)
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 3, 6])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", MINIS)
def test_mini_accepts_other_channels_and_cifar_size(name: str) -> None:
    torch.set_num_threads(1)
    size = 8 if MODELS[name].image_size == 8 else 32
    model = create_model(name, num_classes=4, in_channels=2, image_size=size).eval()
    assert model(torch.randn(2, 2, size, size)).shape == (2, 4)


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet32", 464_154),  # He et al.: 0.46M
    ("wrn28_10", 36_479_194),  # Zagoruyko & Komodakis: 36.5M
    ("pyramidnet101", 16_845_312),  # depth 101, alpha 270 (see pyramidnet.py)
])
def test_cifar_architectures_parameter_counts(name: str, expected: int) -> None:
    model = create_model(name, num_classes=10, in_channels=3, image_size=32)
    assert _n_params(model) == expected


def test_resnet32_uses_parameter_free_option_a_shortcuts() -> None:
    model = create_model("resnet32", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and all(c.kernel_size == (3, 3) for c in convs)  # 1 stem + 15 x 2


def test_pyramidnet_widens_additively_to_16_plus_alpha() -> None:
    model = create_model("pyramidnet101", num_classes=10)
    assert len(model.blocks) == 33
    assert model.head.in_features == 4 * (16 + 270)


@pytest.mark.parametrize(("name", "reference"), [
    ("resnet18", torchvision.models.resnet18),
    ("densenet121", torchvision.models.densenet121),
    ("efficientnet_b3", torchvision.models.efficientnet_b3),
    ("efficientnet_b4", torchvision.models.efficientnet_b4),
])
def test_torchvision_models_at_224_match_torchvision_state_dicts(name: str, reference) -> None:
    ours = create_model(name, num_classes=1000, in_channels=3, image_size=224).state_dict()
    theirs = reference(weights=None).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_cifar_stems_keep_resolution() -> None:
    r = create_model("resnet18_mini", num_classes=10, image_size=32)
    assert (r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
            and isinstance(r.maxpool, nn.Identity))
    d = create_model("densenet121_mini", num_classes=10, image_size=32)
    assert d.features.conv0.stride == (1, 1) and isinstance(d.features.pool0, nn.Identity)
    e = create_model("efficientnet_b3_mini", num_classes=10, image_size=32)
    assert e.features[0][0].stride == (1, 1)
    big = create_model("efficientnet_b3_mini", num_classes=10, image_size=224)
    assert big.features[0][0].stride == (2, 2)


def test_create_model_rejects_unknown_names_and_bad_sizes() -> None:
    with pytest.raises(UsageError, match="unknown model 'vgg16'.*resnet32"):
        create_model("vgg16", num_classes=10)
    with pytest.raises(UsageError, match="num_classes must be a positive integer, got 0"):
        create_model("mlp", num_classes=0)


# --- pretrained weights ----------------------------------------------------------------------


def test_load_pretrained_skips_the_head_of_another_class_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("resnet32_mini", num_classes=10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    target = create_model("resnet32_mini", num_classes=5)
    head_before = target.head.weight.clone()
    report = load_pretrained(target, path)
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert report.skipped["head.weight"] == ((10, 16), (5, 16))
    assert torch.equal(target.head.weight, head_before)
    for key, value in target.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert "skipped" in report.summary() and "head.weight" in report.summary()


def test_load_pretrained_reads_plain_and_ddp_prefixed_state_dicts(tmp_path: Path) -> None:
    source = create_model("mlp_mini", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = create_model("mlp_mini", num_classes=10, in_channels=1, image_size=8)
    report = load_pretrained(target, str(path))
    assert not report.skipped and not report.missing and len(report.loaded) == 6
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))


def test_load_pretrained_finds_torchvision_names_in_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = create_model("mlp_mini", num_classes=3, in_channels=1, image_size=8)
    name = "EfficientNet_B4_Weights.IMAGENET1K_V1"
    with pytest.raises(UsageError, match=r"put it at .*checkpoints.*efficientnet_b4_rwightman"):
        load_pretrained(model, name)
    (tmp_path / "checkpoints").mkdir()
    url = torchvision.models.get_weight(name).url
    torch.save(model.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    assert len(load_pretrained(model, name).loaded) == 6


def test_load_pretrained_errors(tmp_path: Path) -> None:
    model = create_model("mlp_mini", num_classes=3, in_channels=1, image_size=8)
    with pytest.raises(UsageError, match="does not exist"):
        load_pretrained(model, tmp_path / "absent.pt")
    with pytest.raises(UsageError, match="neither a file nor a torchvision weights name"):
        load_pretrained(model, "NoSuch_Weights.V1")
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(2)}, other)
    with pytest.raises(UsageError, match="no tensor"):
        load_pretrained(model, other)
