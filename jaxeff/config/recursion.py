"""The recursion section: parameter sharing across depth and Mixture-of-Recursions routing."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from jaxeff.config._checks import _check_types, _fail, _positive
from jaxeff.config.model import ModelConfig

Strategy = Literal["none", "cycle", "sequence", "middle_cycle", "middle_sequence"]
Routing = Literal["none", "expert", "token"]
RouterFunc = Literal["sigmoid", "tanh", "softmax"]
Balance = Literal["loss", "loss_free"]
KVStrategy = Literal["recursion", "share"]
InitMethod = Literal["stepwise", "average", "lower"]
LoraInit = Literal["svd", "zero"]
SHARING_STRATEGIES = typing.get_args(Strategy)
ROUTINGS = typing.get_args(Routing)
ROUTER_FUNCS = typing.get_args(RouterFunc)
KV_STRATEGIES = typing.get_args(KVStrategy)
INIT_METHODS = typing.get_args(InitMethod)
LORA_INITS = typing.get_args(LoraInit)


def _parse_capacities(text: str) -> tuple[float, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(float(c) for c in text.split(","))
    except ValueError:
        _fail("RecursionConfig", "capacities", f"must be comma-separated numbers, got {text!r}")


@dataclass(frozen=True)
class RecursionConfig:
    """Parameter sharing across depth and Mixture-of-Recursions routing (Bae et al., 2025,
    arXiv 2507.10524; Relaxed Recursive Transformers, Bae et al., 2024, arXiv 2410.20672).

    ``strategy='none'`` is the dense model. Otherwise the ``model.n_layers`` unrolled layers reuse
    a stack of shared blocks ``n_recursions`` times: ``cycle`` (layer l uses block l mod U),
    ``sequence`` (block l // n_recursions), and the ``middle_`` variants, which keep the first and
    last layers unique and share the middle L - 2. ``routing`` picks per-token depth: ``expert``
    (one router per recursion step, top-k with hierarchical filtering) or ``token`` (one router
    over the depths).

    ``kv_strategy='share'`` makes every recursion step attend to the first step's keys and values;
    with ``kv_share_update`` the tokens a later step selects first overwrite their own entries (as
    the official code's ``update_cache``). Training computes each step in parallel, so a token
    sees earlier tokens' entries as of the current step; token-by-token decoding sees them as of
    their deepest step. The two agree without updates (tested), not with them.
    """

    strategy: Strategy = "none"
    n_recursions: int = 1
    lora_rank: int = 0  # per-recursion LoRA on the shared projections (0: off)
    routing: Routing = "none"
    capacities: tuple[float, ...] = ()  # expert-choice, per step; empty: (N_r - r + 1) / N_r
    router_func: RouterFunc = "sigmoid"
    router_alpha: float = 0.1
    aux_router: bool = False  # expert-choice: a separate router on stop-gradient inputs decides at inference
    aux_loss_coef: float = 1e-3  # BCE of router logits against the top-k choice (0: off)
    balance: Balance = "loss"  # token-choice balancing
    balance_coef: float = 0.1
    bias_update_rate: float = 1e-3  # token-choice loss-free bias step
    z_loss_coef: float = 0.0
    kv_strategy: KVStrategy = "recursion"
    kv_share_update: bool = False  # share: tokens selected at a later step overwrite their shared keys/values
    # Decoding: 0 allocates every recursion's KV cache at full capacity (decoding then equals the
    # causal threshold forward exactly); s >= 1 allocates stored recursion r by its capacity,
    # ceil(c_r * capacity * s) slots, and a token that would join a full cache stops at the depth
    # before (the paper's KV memory saving, (N_r + 1) / (2 N_r) of the recursion blocks at s = 1).
    kv_slack: float = 0.0
    capacity_warmup_steps: int = 0  # expert-choice: cosine warm-up of the capacities from 1.0 (0: off)
    capacity_warmup_phases: int = 8  # the warm-up moves in this many steps (each compiles its own train step)
    init_from: str = ""  # a dense run directory to convert and uptrain from (Relaxed Recursive Transformers)
    init_method: InitMethod = "stepwise"  # how shared blocks start from its layers
    lora_init: LoraInit = "svd"  # LoRA start: truncated SVD of (original - shared), or zero

    def __post_init__(self):
        if isinstance(self.capacities, str):  # '1,0.5,0.25' (from --set or an older config.json)
            object.__setattr__(self, "capacities", _parse_capacities(self.capacities))
        elif isinstance(self.capacities, list):  # from JSON
            object.__setattr__(self, "capacities", tuple(self.capacities))
        _check_types(self)
        _positive(self, "n_recursions")
        for name in ("lora_rank", "capacity_warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                _fail("RecursionConfig", name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        _positive(self, "capacity_warmup_phases")
        if self.init_from and self.strategy == "none":
            _fail("RecursionConfig", "init_from", "converts a dense run into a recursive one; set a sharing strategy")
        if self.kv_share_update and self.kv_strategy != "share":
            _fail("RecursionConfig", "kv_share_update", "applies to kv_strategy='share' only")
        if self.capacity_warmup_steps and self.routing != "expert":
            _fail("RecursionConfig", "capacity_warmup_steps", "applies to expert-choice routing only")
        for name in ("aux_loss_coef", "balance_coef", "bias_update_rate", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail("RecursionConfig", name, f"must be >= 0, got {getattr(self, name)}")
        if self.kv_slack != 0 and self.kv_slack < 1:
            _fail("RecursionConfig", "kv_slack", f"must be 0 (full caches) or >= 1, got {self.kv_slack}")
        if self.router_alpha <= 0:
            _fail("RecursionConfig", "router_alpha", f"must be > 0, got {self.router_alpha}")
        if self.strategy == "none":
            if self.routing != "none" or self.n_recursions != 1 or self.lora_rank:
                _fail("RecursionConfig", "strategy", "is 'none' (dense model) but n_recursions, lora_rank or "
                      "routing is set; choose a sharing strategy such as 'middle_cycle'")
        if self.routing != "none" and self.strategy not in ("cycle", "middle_cycle"):
            _fail("RecursionConfig", "routing", f"{self.routing!r} routes whole passes over the shared stack, which "
                  f"needs strategy 'cycle' or 'middle_cycle', got {self.strategy!r}")
        if self.routing == "token" and self.n_recursions < 2:
            _fail("RecursionConfig", "n_recursions", "token-choice routing needs at least 2 depths to choose from")
        self.resolved_capacities  # validates the capacity schedule

    @property
    def resolved_capacities(self) -> tuple[float, ...]:
        """Per-step capacity c_r (fraction of the sequence selected at step r)."""
        n = self.n_recursions
        if not self.capacities:
            return tuple((n - r) / n for r in range(n))
        caps = tuple(float(c) for c in self.capacities)
        if len(caps) != n:
            _fail("RecursionConfig", "capacities", f"needs one value per recursion step ({n}), got {len(caps)}")
        if any(not 0.0 < c <= 1.0 for c in caps):
            _fail("RecursionConfig", "capacities", f"every value must be in (0, 1], got {caps}")
        if any(b > a for a, b in zip(caps, caps[1:])):
            _fail("RecursionConfig", "capacities", f"must be descending (non-increasing) over the steps, got {caps}")
        return caps

    def check_depth(self, n_layers: int) -> None:
        """Raises unless ``n_recursions`` divides the shared depth of an ``n_layers`` model."""
        if self.strategy == "none":
            return
        middle = self.strategy.startswith("middle_")
        shared = n_layers - 2 if middle else n_layers
        if shared < self.n_recursions or shared % self.n_recursions:
            what = f"the middle depth n_layers - 2 = {shared}" if middle else f"n_layers = {shared}"
            _fail("RecursionConfig", "n_recursions", f"must divide {what} (strategy {self.strategy!r}), "
                  f"got {self.n_recursions}")

    def check_lora_rank(self, model: ModelConfig) -> None:
        """Raises unless ``lora_rank`` fits the shared projections of ``model``: a rank above the
        smaller side of a matrix adds parameters without adding expressiveness."""
        if not self.lora_rank:
            return
        hd = model.resolved_head_dim
        sides = {"d_model": model.d_model, "n_heads x head_dim": model.n_heads * hd,
                 "n_kv_heads x head_dim": model.n_kv_heads * hd, "d_ff": model.d_ff}
        bound = min(sides.values())
        if self.lora_rank > bound:
            detail = ", ".join(f"{k} {v}" for k, v in sides.items())
            _fail("RecursionConfig", "lora_rank", f"must be <= {bound}, the smallest side of the matrices it "
                  f"adapts ({detail}), got {self.lora_rank}")

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"
