"""The built-in methods, one registration each. A method's settings come from its optimizer
class's ``SETTINGS``; its record says the rest (see `record.MethodInfo`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agnostic_sam.methods import METHODS, MethodInfo, register_method
from agnostic_sam.optim import SAM, AgnosticSAM, Plain, SharpnessOptimizer
from agnostic_sam.optim.asam import KwonASAM
from agnostic_sam.optim.esam import ESAM
from agnostic_sam.optim.friendly_sam import FriendlySAM
from agnostic_sam.optim.gsam import GSAM
from agnostic_sam.optim.lookbehind_sam import LookbehindSAM
from agnostic_sam.optim.looksam import LookSAM
from agnostic_sam.optim.momentum_sam import MomentumSAM
from agnostic_sam.optim.rwp import RWP
from agnostic_sam.optim.schedule import SharpSchedule, on_schedule, scheduled_cost
from agnostic_sam.optim.vasso import VaSSO
from agnostic_sam.optim.wsam import WSAM

register_method(
    "sgd", Plain, description="the base optimizer alone: one pass per step (SGD by default)",
)
register_method(
    "sam", SAM, description="SAM (Foret et al. 2021): two passes on B; ASAM with adaptive",
    paper="Foret et al., Sharpness-Aware Minimization for Efficiently Improving "
          "Generalization, ICLR 2021",
    tune="rho", passes=("B", "B"),
)
# Passes in the order the optimizers run them: full = B^v at theta, B^v at theta^v, B^t at
# theta, B^t at theta^t (2 |B| samples); simpler skips the second (|B| + |B^t|).
register_method(
    "agnostic-sam", AgnosticSAM, description="Agnostic-SAM, Algorithm 1: four passes on B^t / B^v",
    paper="Nguyen et al., Agnostic Sharpness-Aware Minimization, 2024",
    tune="rho1", follows=("rho2",), passes=("B^v", "B^v", "B^t", "B^t"),
    fixed={"variant": "full"},
)
register_method(
    "agnostic-sam-simpler", AgnosticSAM,
    description="Agnostic-SAM's simpler variant (Sec. 5.1): three passes",
    paper="Nguyen et al., Agnostic Sharpness-Aware Minimization, 2024 (Sec. 5.1)",
    tune="rho1", follows=("rho2",), passes=("B^v", "B^t", "B^t"),
    fixed={"variant": "simpler"},
)
register_method(
    "gsam", GSAM,
    description="GSAM (Zhuang et al. 2022): SAM's gradient minus alpha times its part "
                "orthogonal to it; two passes on B",
    paper="Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization, ICLR 2022",
    tune="rho", passes=("B", "B"), state=("gsam_lr0",), off={"rho": 0.0, "alpha": 0.0},
    notes="g_perp = g - <g, g_p> / (||g_p||^2 + eps) g_p (the authors: cos ||g|| / (||g_p|| + "
          "eps) with cos = <g, g_p> / (||g|| ||g_p|| + eps), the same up to eps). rho_t follows "
          "the group's lr / initial_lr with rho_min (the authors pass a scheduler object). "
          "pytorch_optimizer 4.1 takes the norm of g_p as a float32 sum of squares and restores "
          "theta by subtracting e: 3e-9 from this one on float64 weights after 20 steps "
          "(tests/test_method_gsam.py). Under DDP both passes are all-reduced (the step uses g).",
)
register_method(
    "looksam", LookSAM,
    description="LookSAM (Liu et al. 2022): a SAM step every k steps; the steps between take "
                "one pass and add alpha ||g|| times the stored sharpness direction v",
    paper="Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization, CVPR 2022",
    tune="rho", passes=("B", "B"), state=("looksam_v", "looksam_step"),
    cost=lambda s, r: 1 + 1 / s["k"], off={"rho": 0.0, "alpha": 0.0},
    notes="v is global (one projection and one norm over all parameters), as the paper's "
          "Algorithm 1; pytorch_optimizer 4.1 (like the unofficial codes) decomposes per "
          "layer (u and ||g|| / ||u|| per tensor): on a two-layer MLP it equals the per-layer "
          "rule to 1.6e-6 and differs from this one by 0.15 after 12 float32 steps; on a "
          "one-tensor model (per layer = global) the two agree to 2.6e-6 "
          "(tests/test_method_looksam.py). Its protocol runs two passes on every step (g "
          "before step(), the closure again on reuse steps; 4.1 adds the reused direction "
          "once); here a reuse step is one pass. rho = 0 alone is not off (eps in the "
          "projection leaves u a tiny multiple of g, which v normalizes): off is rho = 0, "
          "alpha = 0. Under DDP every pass synchronizes (v is state: the same on every rank, "
          "so perturbation='local' saves nothing here)",
)
register_method(
    "friendly-sam", FriendlySAM,
    description="Friendly-SAM (Li et al. 2024): ascent along g minus sigma times the moving "
                "average of past gradients; two passes on B",
    paper="Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024",
    tune="rho", passes=("B", "B"), state=("fsam_m",),
    notes="m averages the raw gradient g(theta), as the authors' code (nblt/F-SAM) does. "
          "pytorch_optimizer 4.1 does too (per-tensor and foreach paths; updating m with the "
          "modified gradient would move its weights by 7.7e-3 in 20 float64 steps) and differs "
          "from this one only by its float32 gradient norm: 2.3e-9 on float64 weights "
          "(tests/test_method_friendly_sam.py). m changes only when the base optimizer steps "
          "(a step skipped by loss scaling or refused as non-finite leaves it; the authors "
          "update it before the step). sigma and lmbda are optimizer-wide, rho per group.",
)
register_method(
    "vasso", VaSSO,
    description="VaSSO (Li & Giannakis 2023): ascent along an exponential average of the "
                "gradients; two passes on B",
    paper="Li & Giannakis, Enhancing Sharpness-Aware Optimization Through Variance "
          "Suppression, NeurIPS 2023",
    tune="rho", passes=("B", "B"), state=("vasso_d",),
    notes="eps = perturb_eps (1e-12; the authors' code adds 1e-7 to ||d||), weights restored "
          "by copy (the authors subtract e), d changes only when the base optimizer steps (a "
          "step skipped by loss scaling or refused as non-finite leaves it; the authors update "
          "it before the step). theta is optimizer-wide, rho per group. No pytorch_optimizer "
          "peer.",
)
register_method(
    "lookbehind-sam", LookbehindSAM,
    description="Lookbehind-SAM (Mordido et al. 2024): each step one inner step (an ascent "
                "accumulated over the cycle, a base step of the fast weights); every k steps "
                "the slow weights move alpha towards the fast ones",
    paper="Mordido et al., Lookbehind-SAM: k steps back, 1 step forward, ICML 2024",
    tune="rho", passes=("B", "B"),
    state=("lookbehind_fast", "lookbehind_point", "lookbehind_first", "lookbehind_step"),
    off={"rho": 0.0, "k": 1, "alpha": 1.0},
    notes="One step() is one inner step on its own batch; the authors' loop runs a cycle's k "
          "inner steps on one batch (give step() the same batch k times for theirs). The "
          "model holds the slow weights phi between steps (the authors' holds the accumulated "
          "point mid-cycle). BatchNorm statistics move in each step's first pass (at the "
          "accumulated point, phi at a cycle's first step), the authors' in every pass. "
          "Ascents use the global norm with eps 1e-12 (theirs 1e-16); phi + alpha (f - phi) "
          "for alpha*f + (1 - alpha)*phi (equal up to rounding). Under DDP both passes "
          "synchronize (p is state, saved from rank 0). No pytorch_optimizer peer",
)
register_method(
    "wsam", WSAM,
    description="WSAM (Yue et al. 2023): the gradient at theta plus gamma / (1 - gamma) times "
                "the sharpness gradient, decoupled from the base optimizer; two passes on B",
    paper="Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a "
          "Regularization Term, KDD 2023",
    tune="rho", passes=("B", "B"),
    notes="decouple=True (default): the base optimizer, its momentum and its weight decay see "
          "g(theta) only; theta -= lr a s follows its step, as in the authors' code "
          "(dlrover/atorch) and pytorch_optimizer 4.1. Differences from the authors' code: "
          "max_grad_norm (default none) clips what the base optimizer steps with, where "
          "theirs (max_norm, default 1.0) clips g(theta) and g(theta + e) each; theta is "
          "restored by copy (they subtract e); the move is skipped with a skipped base step. "
          "pytorch_optimizer 4.1 differs only by its float32 ||g(theta)||: 5.0e-10 (decoupled) "
          "and 3.4e-9 (coupled) on float64 weights after 20 steps (tests/test_method_wsam.py).",
)
register_method(
    "momentum-sam", MomentumSAM,
    description="Momentum-SAM (Becker et al. 2024): one pass at theta - rho v/||v||, v the "
                "base optimizer's momentum; SAM at the cost of the base optimizer",
    paper="Becker et al., Momentum-SAM: Sharpness Aware Minimization without Computational "
          "Overhead, 2024",
    tune="rho", passes=("B",),
    notes="The weights return to theta after every step (the authors' code keeps the model at "
          "the perturbed point between steps and moves it back for evaluation); weight decay "
          "is the base optimizer's, at theta (the authors' SGD adds weight_decay times the "
          "perturbed weights). BatchNorm statistics move in the one pass, at the perturbed "
          "point, as in the authors' code (no pass runs at theta). rho is per group and ||v|| "
          "global (the authors' code takes one group). Needs a base with momentum state "
          "(SGD momentum > 0, Adam-like exp_avg). No pytorch_optimizer peer",
)
register_method(
    "asam", KwonASAM,
    description="ASAM as Kwon et al. (2021) wrote it: T = |w| + eta on weights, 1 on biases; "
                "two passes on B",
    paper="Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant "
          "Learning of Deep Neural Networks, ICML 2021",
    tune="rho", passes=("B", "B"),
    notes="The authors' ascent_step (T from the parameter's name, eta = 0.01, rho = 0.5); "
          "weights restored by copy (they subtract e); eps = perturb_eps (theirs 1e-16 on the "
          "norm). Needs names: model= or model.named_parameters(). sam with adaptive=true is "
          "davda54's form (T = |w| everywhere, no eta). pytorch_optimizer's SAM(adaptive=True) "
          "is davda54's form too: no peer of this one",
)
register_method(
    "rwp", RWP,
    description="m-RWP (Li et al. 2022/2024): the gradient at Gaussian noise scaled by each "
                "row's norm, mixed with the gradient at theta; two passes on B",
    paper="Li et al., Revisiting Random Weight Perturbation for Efficiently Improving "
          "Generalization, TMLR 2024",
    tune="sigma", passes=("B", "B"), state=("rwp_generator",), random=True,
    notes="Both gradients on the step's batch (the authors take two batches, or two GPUs in "
          "parallel); the noise from the optimizer's seeded generator (saved in state_dict), "
          "only on parameters with a gradient, without the authors' 1e-16 added to a 1-D "
          "tensor's norm; both passes synchronize under DDP. No pytorch_optimizer peer",
)

register_method(
    "esam", ESAM,
    description="ESAM (Du et al. 2022): each tensor perturbed with probability beta; the final "
                "pass on the gamma fraction of the batch whose loss rises most",
    paper="Du et al., Efficient Sharpness-aware Minimization for Improved Training of Neural "
          "Networks, ICLR 2022",
    tune="rho", passes=("B", "B"), closure="per-sample", state=("esam_keep", "esam_generator"),
    random=True, off={"rho": 0.0, "gamma": 1.0},
    # pass 1 on B, a forward without backward on B (about 1/3 of a forward + backward), the
    # final pass on floor(gamma |B|) samples
    cost=lambda s, r: 1.0 + 1.0 / 3.0 + s["gamma"],
    notes="The final pass on exactly floor(gamma n) samples (the authors keep those above the "
          "m-th largest sharpness: m - 1 without ties); the tensors kept for the next step "
          "drawn from the optimizer's seeded generator (saved in state_dict); theta restored "
          "by copy (they subtract e); tensors the user froze stay frozen (their first_step sets "
          "requires_grad on every tensor). No pytorch_optimizer peer",
)

# ---- sharpness on a schedule (issue 19, item 11): KEEP THIS BLOCK LAST ----------------------
# "<name>-sched" for every method registered above whose step is two or more passes on B with
# a loss closure, derived from its record (see agnostic_sam.optim.schedule).
def _schedulable(info: MethodInfo) -> bool:
    # A method that keeps state across steps (LookSAM's v and own schedule, Lookbehind's slow
    # weights, Friendly-SAM's and VaSSO's averages) would see it go stale over the plain steps.
    return (not info.state and info.cls is not None
            and issubclass(info.cls, SharpnessOptimizer)
            and not issubclass(info.cls, SharpSchedule) and info.closure == "loss"
            and len(info.passes) > 1 and set(info.passes) == {"B"})


def _register_scheduled(info: MethodInfo) -> None:
    cls = info.cls
    assert cls is not None and issubclass(cls, SharpnessOptimizer)
    own = set(info.setting_names)

    def cost(s: Mapping[str, Any], ratio: float) -> float:
        inner = info.batch_equivalents(ratio, {k: v for k, v in s.items() if k in own})
        return scheduled_cost(inner, s["interval"], s["sharp_prob"])

    register_method(
        f"{info.name}-sched", on_schedule(cls),
        description=f"{info.name} on a schedule: its step on every interval-th step (each with "
                    "probability sharp_prob), one pass and the base step otherwise",
        paper=info.paper, tune=info.tune, follows=info.follows, passes=info.passes,
        closure=info.closure, state=info.state + ("schedule",), cost=cost, fixed=info.fixed,
        off=info.off, random=True, variant_of=info.name,
        notes=f"{info.name}'s step on steps k, 2k, ... (k = interval; each taken with "
              "probability sharp_prob, a seeded draw), the others one pass at theta and the "
              f"base optimizer's step, as Composer's SAM (interval) does; {info.name}'s own "
              "state does not move on those steps",
    )


for _info in [m for m in METHODS.values() if _schedulable(m)]:
    _register_scheduled(_info)

# The package's own methods (the documentation's tables list these, not a user's plugins).
BUILT_IN: tuple[str, ...] = tuple(METHODS)
