"""The table of merge methods: one row per method, its parameters declared once (params.py).

The method contract
-------------------
A method is a plain function over whole float32 tensors of one shape and device:

    fn(base: Tensor, others: list[Tensor], *, <its params>, **context) -> Tensor

* Its params arrive as keyword arguments named like its `Param`s: a number, bool or string for
  a global one, a sequence with one value per model for a per-model one (`weights`, `density`).
  The recipe has validated them already (ranges, choices, one value per model).
* `context`: the per-tensor facts the method lists in `MethodSpec.context`, and only those, as
  keyword arguments: `tensor_name: str`, `layer_index: int | None` (from `.layers.N.` in the
  name), `num_layers: int | None` (the base config's), `is_input_embedding: bool`,
  `mask_keys: list[int]` (one per model, `mask_key(seed, i, tensor_name)`: DARE's counter-based
  masks, mask rule 2) and `generators: list[torch.Generator]` (one per model,
  `mask_generator(seed, i, tensor_name)`, DELLA's draws): randomness keyed by name, so any
  order and device gives the same bits.
* A parameter that names a model (`Param.names_model`, e.g. free_merging's task model) arrives
  as that model's index in `others`.
* `others` bounds how many models besides the base it takes (slerp: exactly 1).
* It returns a new float32 tensor shaped like `base`: no I/O, no device moves, no dtype choices.
  Its docstring points to its float64 paper-box version in reference.py.

The runner streams tensor by tensor and calls `fn`. A `FastPath` is optional: a blocked,
buffer-reusing form the runner then uses instead, which must return the bits of `fn`
(tests/test_methods.py checks every fast path against its dense function, fp32 and bf16 inputs).
A `TwoPass` form (streamed.py) is optional too: for a matrix too large to hold whole, its
whole-tensor facts (top-k thresholds, L1 factors, dot products, column norms and ranks) from
streaming passes over its row chunks, then the merge chunk by chunk, to the same bits
(tests/test_two_pass.py).

Adding a method: one file with its function, one row in METHODS with its `Param`s (existing
declarations, or new ones in params.py); the CLI flags, validation, recipe and YAML keys
(mergekit_methods.py) follow. Defaults follow ALGORITHMS.md §0.6, §1, §3.1, §4.1 and §5.1 (the
mergekit the AIM paper ran), §6-§11, §17 for the later methods and §19 for mergekit 0.1.5's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Mapping

from torch import Tensor

from checkpoints.errors import UserError
from merging_methods import gta, gta_blocked
from merging_methods.arcee_fusion import ARCEE_FUSION_TWO_PASS, arcee_fusion
from merging_methods.blockwise import per_element
from merging_methods.breadcrumbs import band_plan, breadcrumbs, breadcrumbs_ties
from merging_methods.della import check_window, della, della_linear, magprune_plan
from merging_methods.fr_merging import FR_TWO_PASS, fr_merging
from merging_methods.free_merging import FREE_TWO_PASS, free_merging
from merging_methods.karcher import KARCHER_TWO_PASS, karcher
from merging_methods.model_stock import MODEL_STOCK_TWO_PASS, model_stock
from merging_methods.multislerp import MULTISLERP_TWO_PASS, multislerp
from merging_methods.nuslerp import NUSLERP_TWO_PASS, nuslerp
from merging_methods.nearswap import nearswap
from merging_methods.passthrough import passthrough
from merging_methods.params import (
    ABOVE_AVERAGE_VALUE_RATIO, DELLA_RESCALE_MODE, DENSITY, EPSILON, EXPERT_DENSITY, FILTER_WISE,
    FR_FAITHFUL, FR_RATIO, GAMMA, MERGEKIT_TRIM, NORMALIZE, RESCALE, RESCALE_MODE, SCALING,
    SCALE, SCORE_CALIBRATION_VALUE, T, TASK_MODEL, WEIGHTS, Param,
    ARCEE_FUSION_SAMPLE, NEARSWAP_T, RAM_EPSILON, RAMPLUS_ALPHA, RAMPLUS_R, SELECT_TOPK,
)
from merging_methods.params import (
    EPS, MAX_ITER, NORMALIZE_WEIGHTS, NUSLERP_FLATTEN, NUSLERP_ROW_WISE, TASK_VECTORS, TOL,
)
from merging_methods.primitives import keep_threshold
from merging_methods.ram import RAMPLUS_TWO_PASS, ram, ramplus_tl
from merging_methods.sce import SCE_TWO_PASS, sce
from merging_methods.slerp import SLERP_TWO_PASS, slerp
from merging_methods.streamed import HOLD_ONE_CHUNK, TwoPass, merge_held, two_pass_gta
from merging_methods.widen import WIDEN_TWO_PASS, widen, widen_held

CONTEXT = frozenset({"tensor_name", "layer_index", "num_layers", "is_input_embedding",
                     "generators", "mask_keys"})
RANDOM_CONTEXT = frozenset({"generators", "mask_keys"})  # what makes a method stochastic
Values = Mapping[str, object]  # resolved parameters: every declared name, defaults filled in


@dataclass(frozen=True)
class FastPath:
    """The optional fast form of a method: `fn(base, others, **params, **context, out=None)`,
    bit-identical to the dense function; `out` is a float32 result buffer it writes into."""

    fn: Callable[..., Tensor]
    # base and others may arrive in their stored dtype (bf16/fp16): fn reads them through exact
    # float32 upcasts of small blocks, so the runner skips the full float32 copies
    stored_dtype_inputs: bool = False
    # per element: a block of rows merged alone gives those rows of the whole result, so the
    # runner merges large tensors in row chunks (checkpoints/rows.py)
    row_separable: bool = False
    # DARE's keep-masks: takes `keep_masks=` (drawn by the runner on its I/O thread, chunk by
    # chunk) or `mask_offset=` (a row chunk's flat offset in its tensor: masks drawn in fn)
    dare_masks: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its dense function, its parameters and what else the runner gives it."""

    name: str
    fn: Callable[..., Tensor]
    params: Mapping[str, Param]
    summary: str
    context: frozenset[str] = frozenset()
    others: tuple[int, int | None] = (1, None)   # models besides the base: (min, max or None)
    # layers copied from slices of the models, renumbered (passthrough): the runner plans the
    # output from --layer_ranges instead of merging tensor by tensor
    stacks_layers: bool = False
    fast: FastPath | None = None
    # the form for a tensor too large to hold whole (streamed.py): whole-tensor facts gathered
    # in streaming passes over its row chunks, then the merge chunk by chunk, same bits
    two_pass: TwoPass | None = None
    check: Callable[[Values], None] | None = None        # cross-parameter checks (UserError)
    warn: Callable[[Values], list[str]] | None = None    # valid but likely unmeant settings
    defaults: Mapping[str, object] = field(init=False, compare=False)

    def __post_init__(self):
        if not self.context <= CONTEXT:
            raise ValueError(f"{self.name}: unknown context {sorted(self.context - CONTEXT)}")
        object.__setattr__(self, "defaults", {n: p.default for n, p in self.params.items()})

    @property
    def stochastic(self) -> bool:
        return bool(self.context & RANDOM_CONTEXT)

    def check_count(self, n_models: int) -> None:
        """A UserError when the method cannot merge `n_models` models besides the base."""
        low, high = self.others
        if n_models < low or (high is not None and n_models > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise UserError(f"--models_to_merge: {self.name} takes {wanted} model(s) besides "
                            f"--base_model, got {n_models}")

    def arguments(self, values: Values, models: tuple[str, ...]) -> dict[str, object]:
        """The keyword arguments of `fn`: `values` with each model-naming parameter replaced by
        that model's index in `models` (a UserError naming the flag when it is not one of them)."""
        args = dict(values)
        for name, param in self.params.items():
            if param.names_model:
                if values[name] not in models:
                    raise UserError(f"{param.flag}: {values[name]!r} is not one of the merged "
                                    f"models ({', '.join(models)})")
                args[name] = models.index(values[name])
        return args

    def resolve(self, given: Values, n_models: int) -> dict[str, object]:
        """Every parameter of the method, `given` values checked and defaults filled in; a
        UserError naming the flag for a parameter it does not take or a bad value."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            takes = ", ".join(p.flag for _, p in sorted(self.params.items())) or "no parameters"
            raise UserError(f"{flag_of(unknown[0])} does not apply to --method {self.name}; "
                            f"it takes {takes}")
        values = {n: p.resolve(given.get(n, p.default), n_models) for n, p in self.params.items()}
        if self.check is not None:
            self.check(values)
        return values


def method(name: str, fn: Callable[..., Tensor], summary: str, *params: Param,
           **options) -> MethodSpec:
    """A registry row: `params` in declaration order; `options` are MethodSpec's other fields."""
    return MethodSpec(name, fn, {p.name: p for p in params}, summary, **options)


def _weights_sum_to_nonzero(switch: Param) -> Callable[[Values], None]:
    """The check that the weights do not sum to 0 when `switch` (a normalize flag) is on."""
    def check(values: Values) -> None:
        if values[switch.name] and abs(sum(values["weights"])) < gta.SUM_EPS:
            raise UserError("--weights: the weights sum to 0, so a normalized average is "
                            f"undefined; change the weights or pass --no-{switch.flag[2:]}")
    return check


def _dare_densities(values: Values) -> None:
    """Each density must keep something at DARE's resolution of 1/65536 (mask rule 2)."""
    for density in values["density"]:
        keep_threshold(density)


def _negative_weights(consensus: bool) -> Callable[[Values], list[str]]:
    """The warning for a negative weight under normalize: it cancels (sign consensus) or it
    divides by a small or negative weight sum."""
    def warn(values: Values) -> list[str]:
        weights = values["weights"]
        if not values["normalize"] or min(weights) >= 0:
            return []
        if consensus:
            return ["a negative --weights value with --normalize cancels out (each position "
                    "divides by the sum of the agreeing weights), so it does not negate a task "
                    "vector; pass --no-normalize for negation"]
        return [f"a negative --weights value with --normalize divides by the weight sum "
                f"{sum(weights):g}, which can flip or blow up the merged delta; pass "
                "--no-normalize for negation"]
    return warn


def _della_windows(values: Values) -> None:
    for density, epsilon in zip(values["density"], values["epsilon"]):
        check_window(density, epsilon)


_DARE = (WEIGHTS, SCALING, DENSITY, NORMALIZE.with_default(False), RESCALE, RESCALE_MODE)
_BREADCRUMBS = (WEIGHTS, SCALING, DENSITY, GAMMA, NORMALIZE.with_default(False),
                RESCALE.with_default(False))
_DELLA = (WEIGHTS, SCALING, DENSITY, EPSILON, RESCALE, DELLA_RESCALE_MODE)


def _held(form: TwoPass) -> FastPath:
    """A method whose whole-tensor function is its two-pass form over the held tensor: stored
    bf16/fp16 inputs (upcast block by block), into the runner's result buffer."""
    return FastPath(partial(merge_held, form), stored_dtype_inputs=True)


# DARE's statistics ahead of the merge hold its keep-masks for the merge (1 bit per entry and
# model): half the default window lowered dare_linear's / dare_ties's peak RSS on the 542M
# family by 0.015-0.03 GiB at the same speed (TIES, whose facts are a few numbers, was ~5%
# slower with it)
DARE_AHEAD = 1 << 25
BREADCRUMBS_TWO_PASS = two_pass_gta(band_plan, consensus=False)
BREADCRUMBS_TIES_TWO_PASS = two_pass_gta(band_plan, consensus=True)
# DELLA's statistics draw its masks once more (argsort per row): a matrix above one chunk goes
# in two passes, its statistics then gathered beside the merge, not in line with it (the
# 2048 x 2048 matrices too; on the 542M family, 2 interleaved runs: della_linear 105 -> 96 s,
# peak RSS 0.46 -> 0.42-0.44 GiB; della 98 -> 92 s, 0.44 -> 0.43 GiB)
DELLA_TWO_PASS = two_pass_gta(magprune_plan, consensus=True, hold_elements=HOLD_ONE_CHUNK)
DELLA_LINEAR_TWO_PASS = two_pass_gta(magprune_plan, consensus=False, hold_elements=HOLD_ONE_CHUNK)
_FR = (WEIGHTS, SCALING, NORMALIZE.with_default(False), FR_RATIO, FR_FAITHFUL)
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    method("linear", gta.linear, "weighted average of the models (the base is not averaged in)",
           WEIGHTS, NORMALIZE.with_default(True), check=_weights_sum_to_nonzero(NORMALIZE),
           fast=FastPath(gta_blocked.linear, row_separable=True)),
    method("task_arithmetic", gta.task_arithmetic, "base + lambda * sum of weighted task vectors",
           WEIGHTS, SCALING, NORMALIZE.with_default(False), warn=_negative_weights(False),
           fast=FastPath(gta_blocked.task_arithmetic, stored_dtype_inputs=True,
                         row_separable=True)),
    method("ties", gta.ties, "trim to top-|delta|, elect signs, average the agreeing deltas",
           WEIGHTS, SCALING, DENSITY, NORMALIZE.with_default(True), RESCALE.with_default(False),
           MERGEKIT_TRIM, warn=_negative_weights(True),
           fast=FastPath(gta_blocked.ties, stored_dtype_inputs=True),
           two_pass=two_pass_gta(gta_blocked.ties_plan, consensus=True)),
    method("dare_linear", gta.dare_linear, "random drop + rescale, then task arithmetic", *_DARE,
           context=frozenset({"mask_keys"}), check=_dare_densities,
           warn=_negative_weights(False),
           fast=FastPath(gta_blocked.dare_linear, stored_dtype_inputs=True, row_separable=True,
                         dare_masks=True),
           two_pass=two_pass_gta(gta_blocked.dare_plan, consensus=False, ahead=DARE_AHEAD)),
    method("dare_ties", gta.dare_ties, "random drop + rescale, then TIES sign consensus", *_DARE,
           context=frozenset({"mask_keys"}), check=_dare_densities,
           warn=_negative_weights(True),
           fast=FastPath(gta_blocked.dare_ties, stored_dtype_inputs=True, row_separable=True,
                         dare_masks=True),
           two_pass=two_pass_gta(gta_blocked.dare_plan, consensus=True, ahead=DARE_AHEAD)),
    method("widen", widen, "per-column magnitude/direction ranking of task vectors (WIDEN)",
           ABOVE_AVERAGE_VALUE_RATIO, SCORE_CALIBRATION_VALUE,
           context=frozenset({"is_input_embedding"}),
           fast=FastPath(widen_held, stored_dtype_inputs=True), two_pass=WIDEN_TWO_PASS),
    method("slerp", slerp, "spherical interpolation from the base to one other model", T,
           others=(1, 1), fast=_held(SLERP_TWO_PASS), two_pass=SLERP_TWO_PASS),
    method("nuslerp", nuslerp, "spherical interpolation between two models (or their task "
           "vectors) by weight, per tensor, row or column", WEIGHTS, NUSLERP_ROW_WISE,
           NUSLERP_FLATTEN, TASK_VECTORS, others=(2, 2), two_pass=NUSLERP_TWO_PASS,
           fast=FastPath(nuslerp, stored_dtype_inputs=True)),
    method("multislerp", multislerp, "weighted spherical mean of the models (or their task "
           "vectors), scaled by their weighted mean norm", WEIGHTS, NORMALIZE_WEIGHTS, EPS,
           TASK_VECTORS, context=frozenset({"tensor_name"}),
           check=_weights_sum_to_nonzero(NORMALIZE_WEIGHTS), two_pass=MULTISLERP_TWO_PASS,
           fast=FastPath(multislerp, stored_dtype_inputs=True)),
    method("karcher", karcher, "Riemannian (Karcher) mean of the models' directions times their "
           "mean norm (the base is not averaged in)", MAX_ITER, TOL, two_pass=KARCHER_TWO_PASS,
           fast=FastPath(karcher, stored_dtype_inputs=True)),
    method("model_stock", model_stock, "base-to-average interpolation set by the task vectors' "
           "angles", FILTER_WISE, others=(2, None), two_pass=MODEL_STOCK_TWO_PASS,
           fast=FastPath(model_stock, stored_dtype_inputs=True)),
    method("breadcrumbs", breadcrumbs, "drop the smallest and the largest |delta|, then task "
           "arithmetic", *_BREADCRUMBS, warn=_negative_weights(False),
           fast=_held(BREADCRUMBS_TWO_PASS), two_pass=BREADCRUMBS_TWO_PASS),
    method("breadcrumbs_ties", breadcrumbs_ties, "breadcrumbs with TIES sign consensus",
           *_BREADCRUMBS, warn=_negative_weights(True),
           fast=_held(BREADCRUMBS_TIES_TWO_PASS), two_pass=BREADCRUMBS_TIES_TWO_PASS),
    method("della", della, "magnitude-ranked random drop + rescale, TIES sign consensus",
           *_DELLA, NORMALIZE.with_default(True), context=frozenset({"generators"}),
           check=_della_windows, warn=_negative_weights(True),
           fast=_held(DELLA_TWO_PASS), two_pass=DELLA_TWO_PASS),
    method("della_linear", della_linear, "magnitude-ranked random drop + rescale, task "
           "arithmetic", *_DELLA, NORMALIZE.with_default(False),
           context=frozenset({"generators"}), check=_della_windows,
           warn=_negative_weights(False), fast=_held(DELLA_LINEAR_TWO_PASS),
           two_pass=DELLA_LINEAR_TWO_PASS),
    method("fr_merging", fr_merging, "Fourier high-pass filter of each 2-D task vector, TIES "
           "sign consensus", *_FR, warn=_negative_weights(True),
           fast=FastPath(fr_merging, stored_dtype_inputs=True), two_pass=FR_TWO_PASS),
    method("passthrough", passthrough, "layer ranges of the models stacked into one model "
           "(--layer_ranges, one per model)", SCALE, stacks_layers=True),
    method("free_merging", free_merging, "fr_merging + the top-|delta| expert of one task model",
           *_FR, TASK_MODEL, EXPERT_DENSITY, warn=_negative_weights(True),
           fast=FastPath(free_merging, stored_dtype_inputs=True), two_pass=FREE_TWO_PASS),
    method("sce", sce, "keep the entries of largest variance across the models, weight each "
           "model by its mean squared delta, average the sign-agreeing deltas", SELECT_TOPK,
           fast=_held(SCE_TWO_PASS), two_pass=SCE_TWO_PASS),
    method("nearswap", nearswap, "move each base entry toward the other model by at most t",
           NEARSWAP_T, others=(1, 1),
           fast=FastPath(per_element(nearswap), stored_dtype_inputs=True, row_separable=True)),
    method("arcee_fusion", arcee_fusion, "take the other model's changes whose KL-weighted "
           "importance exceeds median + 1.5 IQR", ARCEE_FUSION_SAMPLE, others=(1, 1),
           context=frozenset({"generators"}), fast=_held(ARCEE_FUSION_TWO_PASS),
           two_pass=ARCEE_FUSION_TWO_PASS),
    method("ram", ram, "average each entry's active deltas (|delta| > epsilon) over the models "
           "active there", RAM_EPSILON,
           fast=FastPath(per_element(ram), stored_dtype_inputs=True, row_separable=True)),
    method("ramplus_tl", ramplus_tl, "ram with each model's unique entries boosted by its "
           "shared/unique ratio", RAM_EPSILON, RAMPLUS_R, RAMPLUS_ALPHA,
           fast=_held(RAMPLUS_TWO_PASS), two_pass=RAMPLUS_TWO_PASS),
)}
ALIASES = {"fourier": "fr_merging", "free": "free_merging"}


def get_method(name: str) -> MethodSpec:
    """The spec of method `name` (or alias); an unknown name is a UserError listing the choices."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise UserError(f"--method: unknown method {name!r}; "
                        f"choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def declared_params() -> dict[str, Param]:
    """Every parameter some method takes, by name (one declaration each: the first row's)."""
    params: dict[str, Param] = {}
    for spec in METHODS.values():
        for name, param in spec.params.items():
            params.setdefault(name, param)
    return params


def flag_of(name: str) -> str:
    """The command-line flag of parameter `name` (the name itself when no method declares it)."""
    param = declared_params().get(name)
    return param.flag if param else name


def splits_by_rows(spec: MethodSpec, params: Values) -> bool:
    """Whether a tensor may be merged in row chunks with these parameters: a per-element fast
    path, except DARE's l1 rescale, whose factor is a norm over the whole tensor."""
    whole_tensor_norm = params.get("rescale") is True and params.get("rescale_mode") == "l1"
    return spec.fast is not None and spec.fast.row_separable and not whole_tensor_norm


def method_warnings(spec: MethodSpec, params: Values) -> list[str]:
    """Warnings for the runner to log once: settings that are valid but likely not meant."""
    if spec.warn is None:
        return []
    return [f"{spec.name}: {note}" for note in spec.warn({**spec.defaults, **params})]
