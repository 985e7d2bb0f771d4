"""Benchmark names users type -> the lm-eval task that runs them and the score the paper reports.

The table holds the AIM paper's six benchmarks (HumanEval, MBPP, MMLU, MATH, GSM8K, IFEval),
MMLU-Pro, and the toy zoo's skill benchmarks. Any other name runs as the lm-eval task or group
of that name, with `headline_key` picking its headline metric.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

MATH_EXTRAS = (("sympy", "sympy"), ("math_verify", "math-verify"),
               ("antlr4", "antlr4-python3-runtime==4.11"))
IFEVAL_EXTRAS = (("langdetect", "langdetect"), ("immutabledict", "immutabledict"), ("nltk", "nltk"))


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: the lm-eval task/group to run and the result key reported as its score."""

    name: str                      # what users type and what the report's columns are called
    task: str                      # lm-eval task or group name
    metric: str | None = None      # "<metric>,<filter>" in results[task]; None: see headline_key
    num_fewshot: int | None = None  # None: the task's own default
    requires: tuple[tuple[str, str], ...] = ()  # (import name, pip requirement)
    extra: str = ""                # the lm-eval extra that installs `requires`
    fallback: str | None = None    # benchmark to run instead when `requires` is missing


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("humaneval", "humaneval_offline", "pass@1,create_test"),
    Benchmark("mbpp", "mbpp_offline", "pass_at_1,none"),
    Benchmark("mmlu", "mmlu", "acc,none", num_fewshot=5),
    Benchmark("mmlu_pro", "mmlu_pro", "exact_match,custom-extract"),
    Benchmark("math", "minerva_math", "exact_match,none", requires=MATH_EXTRAS,
              extra="lm-eval[math]", fallback="hendrycks_math"),
    Benchmark("hendrycks_math", "hendrycks_math", "exact_match,none"),
    Benchmark("gsm8k", "gsm8k", "exact_match,strict-match"),
    Benchmark("ifeval", "ifeval", "prompt_level_strict_acc,none", requires=IFEVAL_EXTRAS,
              extra="lm-eval[ifeval]"),
    Benchmark("toy_instruct", "toy_instruct", "exact_match,none"),
    Benchmark("toy_math", "toy_math", "exact_match,none"),
    Benchmark("toy_code", "toy_code", "exact_match,none"),
    Benchmark("toy_ppl", "toy_ppl", "byte_perplexity,none"),
)}

DEFAULT_BENCHMARKS = ("mmlu", "ifeval", "mbpp", "humaneval")
DEFAULT_MATH_BENCHMARKS = ("math", "gsm8k")


def missing_packages(requires: tuple[tuple[str, str], ...]) -> list[str]:
    """Pip requirements from `requires` whose module cannot be imported here."""
    return [pip for module, pip in requires if importlib.util.find_spec(module) is None]


def resolve(names: list[str]) -> tuple[list[Benchmark], dict[str, str], list[str]]:
    """Look up names, applying fallbacks for missing extras.

    Returns (runnable benchmarks, {name: one-line error} for benchmarks that cannot run, notes).
    A fallback keeps the user's name (the report column stays "math") but runs the other task.
    """
    runnable, errors, notes = [], {}, []
    for name in dict.fromkeys(names):  # de-duplicate, keep order
        bench = BENCHMARKS.get(name, Benchmark(name, name))
        missing = missing_packages(bench.requires)
        if missing and bench.fallback:
            alt = BENCHMARKS[bench.fallback]
            notes.append(f"{name}: {', '.join(missing)} not installed "
                         f"(pip install \"{bench.extra}\"); running {alt.task} instead of {bench.task}")
            bench = replace(alt, name=name)
        elif missing:
            errors[name] = (f"{name}: needs {', '.join(missing)}; install with "
                            f"pip install \"{bench.extra}\"")
            continue
        runnable.append(bench)
    return runnable, errors, notes


def headline_key(row: dict, metric_names: list[str]) -> str:
    """The headline result key of one `results[task]` row for a benchmark not in the table.

    Rule: the first metric of the task's `metric_list` (`metric_names`) that appears in the row,
    with the first filter it was computed under; if none appears, the row's first metric key.
    """
    keys = [k for k in row if "," in k and "_stderr," not in k]
    if not keys:
        raise KeyError(f"no metrics in lm-eval result row {sorted(row)}")
    for metric in metric_names:
        for key in keys:
            if key.split(",", 1)[0] == metric:
                return key
    return keys[0]


def headline(bench: Benchmark, result: dict) -> dict:
    """The score the report uses for one benchmark, from lm-eval's result dict."""
    row = result["results"][bench.task]
    key = bench.metric
    if key is None or key not in row:
        if key is not None:
            log.warning("%s: no %s in the results of %s; using the task's first metric",
                        bench.name, key, bench.task)
        config = result.get("configs", {}).get(bench.task, {})
        key = headline_key(row, [m["metric"] for m in config.get("metric_list") or []
                                 if isinstance(m.get("metric"), str)])
    metric = key.split(",", 1)[0]
    higher = result.get("higher_is_better", {}).get(bench.task, {}).get(metric, True)
    n_samples = [v.get("effective") for v in result.get("n-samples", {}).values()]
    return {"task": bench.task, "metric": key, "value": float(row[key]),
            "higher_is_better": bool(higher), "n_shot": result.get("n-shot", {}).get(bench.task),
            "n_samples": sum(n for n in n_samples if isinstance(n, int))}
