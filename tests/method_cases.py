"""One non-default, quick setting per registered method, for end-to-end tests on tiny models:
how many fine-tunes it merges and its parameters (a model-naming parameter as the index of the
fine-tune it names)."""
from __future__ import annotations

from pathlib import Path

from merging_methods.registry import METHODS

CASES: dict[str, tuple[int, dict]] = {
    "linear": (3, {}),
    "task_arithmetic": (3, {}),
    "ties": (3, {"density": 0.5}),
    "dare_linear": (3, {"density": 0.5}),
    "dare_ties": (3, {"density": 0.5}),
    "widen": (3, {}),
    "slerp": (1, {"t": 0.3}),
    "nuslerp": (2, {"weights": [0.3, 0.8], "nuslerp_flatten": False}),
    "multislerp": (3, {"weights": [0.5, 1.0, 0.7]}),
    "karcher": (3, {"max_iter": 5}),
    "model_stock": (3, {"filter_wise": True}),
    "breadcrumbs": (3, {"density": 0.5, "gamma": 0.1}),
    "breadcrumbs_ties": (3, {"density": [0.5, 0.7, 0.9], "gamma": 0.05}),
    "della": (3, {"density": 0.5, "epsilon": 0.1}),
    "della_linear": (2, {"density": 0.6, "epsilon": 0.2, "rescale_mode": "inverse_prob"}),
    "fr_merging": (3, {"weights": [0.8], "scaling": 1.1, "fr_ratio": 0.3}),
    "free_merging": (2, {"task_model": 1, "expert_density": 0.05, "fr_ratio": 0.3}),
    "sce": (3, {"select_topk": 0.5}),
    "nearswap": (1, {"t": 5e-4}),
    "arcee_fusion": (1, {}),
    "ram": (3, {"ram_epsilon": 3e-4}),
    "ramplus_tl": (2, {"ram_epsilon": 3e-4, "ramplus_r": 0.5, "ramplus_alpha": 1.0}),
}
NEW_METHODS = ("slerp", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear", "fr_merging", "free_merging", "nuslerp", "multislerp", "karcher",
               "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")


def flag_text(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def case(method: str, fts: list[Path]) -> tuple[list[Path], list[str], dict]:
    """(the fine-tunes merged, merge.py's method flags, the method function's keywords)."""
    n, params = CASES[method]
    models = fts[:n]
    spec = METHODS[method]
    flags: list[str] = []
    for name, value in params.items():
        param = spec.params[name]
        if param.names_model:
            value = str(models[value])
        if param.kind is bool:
            flags.append(param.flag if value else f"--no-{param.flag[2:]}")
        else:
            flags += [param.flag, flag_text(value)]
    given = {k: str(models[v]) if spec.params[k].names_model else v for k, v in params.items()}
    keywords = spec.arguments(spec.resolve(given, n), tuple(map(str, models)))
    return models, flags, keywords
