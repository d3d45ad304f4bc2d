"""Adapters that put the sharpness-aware optimizers into training frameworks.

Each submodule imports its framework lazily (on import of that submodule, never from
`agnostic_sam` itself) and only translates: closures built from the framework's batches and
training step, its loss scaling, its step counters and its clipping setting. The arithmetic
stays in `agnostic_sam.optim`.

- `agnostic_sam.integrations.lightning`: `SharpnessAwareMixin` for a LightningModule.
- `agnostic_sam.integrations.hf`: `SharpnessTrainer`, a transformers `Trainer`.
- `agnostic_sam.integrations.accelerate`: `SharpnessStep` for an accelerate loop.
- `agnostic_sam.integrations.timm`: `register()` for `timm.optim.create_optimizer_v2`.
"""
