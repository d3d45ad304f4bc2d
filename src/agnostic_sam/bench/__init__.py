r"""Step-time benchmark: SGD, SAM and Agnostic-SAM (full and simpler) side by side.

Samples through forward + backward per optimizer step, with ``n_t = round(r B)`` and
``n_v = B - n_t`` (the split of :func:`agnostic_sam.split_batch`):

.. math::

    \text{SGD}: B,\quad \text{SAM}: 2B,\quad
    \text{Agnostic-SAM}: \underbrace{n_t + n_v}_{\theta} + \underbrace{n_v}_{\tilde\theta^v}
        + \underbrace{n_t}_{\tilde\theta^t} = 2B,\quad
    \text{simpler}: n_t + n_v + n_t = B + n_t.

so the compute floor of the ratio to SAM is 1.00 (full) and ``(1 + r) / 2 = 0.85`` (simpler).

Method. One model and one fixed synthetic batch, both resident on the device; one optimizer per
method over the same parameters (so ``torch.compile`` compiles each shape once, and no method
pays for a cold copy of the weights). Every sub-batch shape (B, n_t, n_v) is warmed up, then
every method runs ``warmup`` untimed steps. Timing runs R interleaved rounds: each round visits
every method (the order rotates by one each round, so no method always follows the same
neighbour) and times S single steps. On CPU the thread count is fixed and steps are timed with
``perf_counter``; on CUDA with events and one synchronize per round. We report the median and
the quartiles of the R*S step times, the ratio of medians to SAM and, because rounds are paired
in time, the median (and range) over rounds of the per-round ratio to SAM, which cancels slow
drifts caused by other processes on a shared machine.

Memory, per method. ``state_bytes``: bytes of the tensors kept in the optimizer state between
steps (the wrapper's and its base optimizer's, e.g. SGD momentum), counted after the timed
steps. ``buffer_bytes``: what the optimizer reports through ``opt.buffer_bytes()`` for its
transient per-step buffers (``None`` when it has no such method). On CUDA additionally
``peak_bytes`` (allocator peak during the method's rounds, everything resident included) and
``peak_delta_bytes`` (that peak minus the bytes allocated when the round started, i.e. beyond the
parameters, every optimizer's state and the batch: the step's activations, gradients and
optimizer buffers).

The package: `agnostic_sam.bench.methods` (a registered method as a timed step),
`agnostic_sam.bench.timing` (the config, the timing and :func:`run_bench`) and
`agnostic_sam.bench.report` (hardware, command line, Markdown and files).
"""

from __future__ import annotations

from agnostic_sam.bench.report import current_command, format_markdown, hardware_info, write_report
from agnostic_sam.bench.timing import BenchConfig, run_bench

__all__ = [
    "BenchConfig",
    "current_command",
    "format_markdown",
    "hardware_info",
    "run_bench",
    "write_report",
]
