"""Method parameters, each declared once: the CLI flag, its help, the validation and the recipe
record are generated from the `Param` (registry.py says which methods take which).

A value reaches a method function as a keyword argument named `Param.name`: a number, bool or
string for a global parameter, a list with one value per model for a per-model one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from checkpoints.errors import UserError


@dataclass(frozen=True)
class Param:
    """One method parameter.

    `low`/`high` bound a number (`low_open`: the bound itself is excluded; `high` is inclusive);
    `choices` list a string's allowed values; `mergekit` is mergekit's YAML key, where it has one
    (else the YAML key is `name`); `yaml_required`: a YAML config must set it (mergekit 0.1.5 has
    no default there, §18.5).
    `names_model`: a string naming one of the merged models; the method gets that model's index.
    """

    name: str
    kind: type                      # float | int | bool | str
    default: object
    help: str
    flag: str = ""                  # default: --<name>
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    mergekit: str | None = None
    yaml_required: bool = False
    names_model: bool = False

    def __post_init__(self):
        if not self.flag:
            object.__setattr__(self, "flag", f"--{self.name}")

    def with_default(self, default: object) -> "Param":
        """The same declaration with a method's own default."""
        return replace(self, default=default)

    def interval(self) -> str:
        """The allowed range in words ("in (0, 1]", "> 0"); empty when unbounded."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else ""

    def resolve(self, value: object, n_models: int) -> object:
        """`value` checked against the declaration (a UserError naming the flag otherwise); a
        per-model value comes back as a list of n_models values (one value is repeated)."""
        if not self.per_model:
            return self._check(value)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, n_models):
            raise UserError(f"{self.flag}: {len(values)} values for {n_models} models; give one "
                            "value or one per model")
        return [self._check(v) for v in values] * (n_models if len(values) == 1 else 1)

    def _check(self, value: object) -> object:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise UserError(f"{self.flag}: expected true or false, got {value!r}")
            return value
        if self.names_model:
            if not isinstance(value, str) or not value:
                got = "it is required" if value is None else f"got {value!r}"
                raise UserError(f"{self.flag}: name one of the merged models; {got}")
            return value
        if self.kind is str:
            if value not in self.choices:
                raise UserError(f"{self.flag}: expected one of {', '.join(self.choices)}, "
                                f"got {value!r}")
            return value
        if value is None:
            raise UserError(f"{self.flag}: required by this method (it has no default)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{self.flag}: expected a finite number, got {value!r}")
        if self.kind is int and value != int(value):
            raise UserError(f"{self.flag}: expected a whole number, got {value!r}")
        number = self.kind(value)
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        if below or (self.high is not None and number > self.high):
            raise UserError(f"{self.flag}: {number:g} is outside the allowed range (must be "
                            f"{self.interval()})")
        return number

    def parse_text(self, text: str) -> object:
        """A per-model value as typed on the command line: comma-separated numbers."""
        try:
            values = [self.kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"{self.flag}: expected comma-separated numbers, got {text!r}")
        if not values or not all(math.isfinite(v) for v in values):
            raise UserError(f"{self.flag}: expected finite numbers, got {text!r}")
        return values


WEIGHTS = Param(
    "weights", float, 1.0, per_model=True, mergekit="weight", yaml_required=True,
    help="per-model multipliers of the task vectors, one value for all or one per model, "
         "comma-separated; negative subtracts a task vector (negation; use with --no-normalize)")
DENSITY = Param(
    "density", float, 1.0, per_model=True, low=0.0, high=1.0, low_open=True, mergekit="density",
    help="fraction of each task vector KEPT, in (0, 1]; one value or one per model. ties, "
         "breadcrumbs*: top-|delta| entries per tensor; dare_*: keep probability (drop rate = "
         "1 - density); della*: mean keep probability. "
         "1.0 keeps all (the AIM paper's setting; 0.2-0.5 is typical for real TIES/DARE use)")
SCALING = Param("scaling", float, 1.0, flag="--lambda", mergekit="lambda",
                help="global scale of the merged task vector")
NORMALIZE = Param("normalize", bool, False, mergekit="normalize",
                  help="divide the merged delta by the sum of the (agreeing) weights")
RESCALE = Param("rescale", bool, True, mergekit="rescale",
                help="rescale the kept entries (DARE; TIES: to the untrimmed L1 norm)")
RESCALE_MODE = Param(
    "rescale_mode", str, "inverse_density", choices=("inverse_density", "l1"),
    help="rescale of the kept entries: l1 matches the task vector's L1 norm (mergekit 0.1.5); "
         "dare_*: or inverse_density, divide by density (DARE paper); della*: or inverse_prob, "
         "divide by each entry's keep probability (the DELLA authors' code)")
DELLA_RESCALE_MODE = replace(RESCALE_MODE, default="l1", choices=("l1", "inverse_prob"))
ABOVE_AVERAGE_VALUE_RATIO = Param(
    "above_average_value_ratio", float, 1.0, low=0.0, low_open=True,
    help="WIDEN t: ranks above t x mean count as important")
SCORE_CALIBRATION_VALUE = Param("score_calibration_value", float, 1.0, low=0.0,
                                help="WIDEN s: score given to important entries")
GAMMA = Param("gamma", float, 0.01, per_model=True, low=0.0, high=1.0, mergekit="gamma",
              help="breadcrumbs: fraction of the largest |delta| entries removed (outliers); "
                   "one value or one per model")
EPSILON = Param("epsilon", float, 0.15, per_model=True, low=0.0, high=1.0, mergekit="epsilon",
                help="della: half-width of the keep-probability window density +- epsilon, "
                     "which must stay inside (0, 1); one value or one per model")
T = Param("t", float, 0.5, mergekit="t", yaml_required=True,
          help="slerp: interpolation factor, 0 = the base, 1 = the other model (outside [0, 1] "
               "extrapolates); nearswap: the most any entry moves from the base toward the other "
               "model")
MERGEKIT_TRIM = Param(
    "mergekit_trim", bool, False,
    help="ties: trim as mergekit 0.1.5 does, keeping at least one entry per tensor "
         "(k = max(1, floor(density*n))) where floor(density*n) = 0 would be an error "
         "(a mergekit YAML config: on)")
FILTER_WISE = Param("filter_wise", bool, False, mergekit="filter_wise",
                    help="model_stock: one interpolation factor per row instead of per tensor")
FR_RATIO = Param("fr_ratio", float, 0.9, low=0.0, low_open=True,
                 help="fr_merging/free_merging: keep radius of the Fourier filter as a fraction "
                      "of min(rows, columns) (0.9: the reference's LLM setting)")
FR_FAITHFUL = Param("fr_faithful", bool, False,
                    help="fr_merging/free_merging: the reference's filter, which counts the ring "
                         "at min(rows, columns)/10 twice")
TASK_MODEL = Param("task_model", str, None, flag="--free_task_model", names_model=True,
                   help="free_merging: the model (one of --models_to_merge) whose expert is "
                        "added; one output per task model")
EXPERT_DENSITY = Param("expert_density", float, 0.01, flag="--free_expert_density", low=0.0,
                       high=1.0, low_open=True,
                       help="free_merging: fraction of the task model's |delta| kept as its "
                            "expert, in (0, 1]")
SCALE = Param("scale", float, 1.0, per_model=True, mergekit="scale",
              help="passthrough: multiplier of each slice's copied tensors, one value for all "
                   "or one per slice")
# nuslerp, multislerp, karcher (mergekit 0.1.5, ALGORITHMS.md §19.4-19.6)
TASK_VECTORS = Param(
    "task_vectors", bool, True,
    help="nuslerp/multislerp: interpolate the task vectors (model - base) and add the base back, "
         "as mergekit does with a base_model; --no-task_vectors interpolates the models "
         "themselves, as mergekit does without one (--base_model then only donates config and "
         "tokenizer). In a YAML config the presence of base_model decides")
NUSLERP_ROW_WISE = Param(
    "nuslerp_row_wise", bool, False, mergekit="nuslerp_row_wise",
    help="nuslerp (with --no-nuslerp_flatten): interpolate each slice along the first axis, "
         "i.e. each COLUMN of a matrix (mergekit's code; its docs say rows); off: each row")
NUSLERP_FLATTEN = Param(
    "nuslerp_flatten", bool, True, mergekit="nuslerp_flatten",
    help="nuslerp: interpolate each tensor as one flat vector; off: row by row or column by "
         "column (--nuslerp_row_wise)")
NORMALIZE_WEIGHTS = Param(
    "normalize_weights", bool, True, mergekit="normalize_weights",
    help="multislerp: divide the weights by their sum; off: the raw weights also scale the "
         "result's norm")
EPS = Param("eps", float, 1e-8, low=0.0, low_open=True, mergekit="eps",
            help="multislerp: added to each norm before dividing by it, and the norm below which "
                 "the weighted mean direction counts as zero")
MAX_ITER = Param("max_iter", int, 10, low=0, mergekit="max_iter",
                 help="karcher: most iterations of the Riemannian mean on the unit sphere")
TOL = Param("tol", float, 1e-5, low=0.0, mergekit="tol",
            help="karcher: convergence tolerance (tangent norm and angle), and the norm at or "
                 "below which an input counts as zero")


# mergekit 0.1.5's later methods (ALGORITHMS.md §19.7-§19.10)
SELECT_TOPK = Param("select_topk", float, 1.0, mergekit="select_topk",
                    help="sce: fraction of the entries (those whose deltas differ between models) "
                         "kept, the ones of largest variance across the models; >= 1 keeps all, "
                         "<= 0 none (the base)")
NEARSWAP_T = replace(T, default=None)  # no default: a distance in weight units (§19.8)
ARCEE_FUSION_SAMPLE = Param(
    "arcee_fusion_sample", str, "exact", choices=("exact", "mergekit"),
    help="arcee_fusion: threshold quantiles over every entry (exact) or, as mergekit does, over "
         "10^6 entries drawn with replacement (seeded by --seed) for tensors larger than that")
RAM_EPSILON = Param("ram_epsilon", float, 1e-5, low=0.0, mergekit="epsilon",
                    help="ram/ramplus_tl: a delta entry counts as active when |delta| > this")
RAMPLUS_R = Param("ramplus_r", float, 0.1, mergekit="r",
                  help="ramplus_tl: boost r of a model's unique entries, 1 + r*min(rho, alpha)")
RAMPLUS_ALPHA = Param("ramplus_alpha", float, 0.2, low=0.0, mergekit="alpha",
                      help="ramplus_tl: cap alpha of the shared/unique ratio rho in the boost")
