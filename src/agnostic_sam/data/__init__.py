"""Data sets as a registry, label noise and index splits.

``build_data(name, *, data_dir=None, download=False, noise_rate=0.0, seed=0, val_fraction=0.0,
image_size=None, num_classes=None, in_channels=None, train_size=None, test_size=None)
-> DataBundle`` with ``train``, ``test``, ``num_classes``, ``in_channels``, ``image_size``,
``train_targets``, ``clean_train_targets``, ``noise_rate_realized``, ``name``, ``holdout``.

Data sets (``list_datasets()``): ``digits`` (default, in memory), ``synthetic`` (in memory),
``cifar10``, ``cifar100``, ``flowers102``, ``stanford_cars``, ``fgvc_aircraft``,
``oxford_pets``, ``imagefolder``. Files are looked up under ``data_dir``, by default
``$AGNOSTIC_SAM_DATA`` or ``~/.cache/agnostic-sam/data``; ``download=True`` lets torchvision
fetch them where a network exists. ``digits`` and ``synthetic`` are ``TensorDataset``s.
"""

from agnostic_sam.data import tensor_sets, vision  # noqa: F401  (fill the registry)
from agnostic_sam.data.noise import symmetric_label_noise
from agnostic_sam.data.registry import (
    DATASETS,
    DataBundle,
    DataRequest,
    DatasetSpec,
    Source,
    build_data,
    default_data_dir,
    list_datasets,
    register_dataset,
)
from agnostic_sam.data.split import fixed_split, stratified_holdout
from agnostic_sam.data.views import LabeledView, make_view

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataRequest",
    "DatasetSpec",
    "LabeledView",
    "Source",
    "build_data",
    "default_data_dir",
    "fixed_split",
    "list_datasets",
    "make_view",
    "register_dataset",
    "stratified_holdout",
    "symmetric_label_noise",
]
