"""Evaluate one model on several benchmarks through `lm_eval.simple_evaluate`, in process.

The model is loaded once per call and shared by all benchmarks; each benchmark is loaded and
evaluated on its own, so one that fails (an unreachable dataset, a missing package) is recorded
as a one-line error while the others still run. lm-eval task indexes are cached per process,
so a study that calls `evaluate` many times pays lm-eval's start-up only once.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from checkpoints.device import resolve_device
from checkpoints.errors import UserError
from checkpoints.record import read_record
from evaluation.backends import (autocast_generation, build_lm, check_model, parse_batch_size,
                                 select_backend)
from evaluation.benchmarks import BENCHMARKS, Benchmark, headline, resolve
from evaluation.results import FORMAT, model_label, versions

log = logging.getLogger(__name__)

PROJECT_TASKS = Path(__file__).resolve().parent / "code_tasks"
CODE_BENCHMARKS = frozenset({"humaneval", "mbpp"})
_MANAGERS: dict[tuple, object] = {}  # lm-eval TaskManagers by (built-ins?, task files)
_ENV_INFO: dict = {}


@dataclass(frozen=True)
class EvalSettings:
    """Every knob of a run; recorded verbatim in the result file."""

    backend: str = "auto"            # auto | hf | vllm
    device: str = "auto"             # auto | cpu | cuda | cuda:N (hf only)
    dtype: str = "auto"
    batch_size: int | str | None = None  # int | auto | auto:N; None: auto on GPU, 1 on CPU
    max_model_len: int | None = None
    n_gpu: int = 1
    vllm_parallel: str = "tensor"    # tensor | data
    limit: int | float | None = None
    num_fewshot: int | dict[str, int] | None = None  # one value for all, or per benchmark
    seed: int = 1234                 # python, numpy, torch and few-shot seeds
    apply_chat_template: bool = False
    gen_kwargs: str | None = None    # e.g. "max_gen_toks=256,temperature=0"
    bootstrap_iters: int = 1000
    log_samples: bool = False
    tasks_dirs: tuple[str, ...] = field(default_factory=tuple)
    generation_autocast: str | None = None  # e.g. "bfloat16": greedy generation's matmuls only


def task_dirs(extra: tuple[str, ...] = ()) -> list[Path]:
    """lm-eval task folders, later ones overriding earlier ones on a name clash: the project's
    code tasks, then the caller's `extra` (`--tasks_dir`, a zoo's tasks), which must exist."""
    dirs = [PROJECT_TASKS]
    for d in extra:
        if not Path(d).is_dir():
            raise UserError(f"--tasks_dir {d}: no such folder")
        dirs.append(Path(d))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _fingerprint(dirs: list[Path]) -> tuple:
    """Task YAML files and their mtimes, so a cached index notices new or edited tasks."""
    return tuple((str(p), p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*.y*ml")))


def task_manager(dirs: list[Path], names: list[str], *, builtin: bool = False):
    """A cached lm-eval TaskManager over `dirs` (plus lm-eval's built-in tasks where needed).

    When every name is defined in `dirs` and `builtin` is False, lm-eval's built-in index
    (seconds to build) is skipped.
    """
    from lm_eval.tasks import TaskManager

    def cached(defaults: bool):
        key = (defaults, _fingerprint(dirs))
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=[str(d) for d in dirs],
                                         include_defaults=defaults)
        return _MANAGERS[key]

    local = cached(False)
    return local if not builtin and set(names) <= set(local.all_tasks) else cached(True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dataset_unreachable(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"ConnectionError", "FileNotFoundError", "DatasetNotFoundError",
                         "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError"})


def describe_failure(bench: Benchmark, err: BaseException, source: str | None = None) -> str:
    """One line naming the benchmark, what went wrong and how to fix it.

    `source` is the task's YAML file, named in the hint for using a local dataset copy.
    """
    if isinstance(err, ModuleNotFoundError):
        return f"{bench.name}: missing Python package {err.name!r} (pip install {err.name})"
    if _dataset_unreachable(err):
        return (f"{bench.name}: could not load the dataset of lm-eval task {bench.task!r} "
                f"({_first_line(err)}); to use a local copy, pass --tasks_dir DIR holding a YAML "
                f"with 'include: {source or '<the task YAML>'}', 'task: {bench.task}', "
                "'dataset_path: json', 'dataset_name: null' and 'dataset_kwargs: {data_files: "
                "{test: /abs/test.jsonl, train: ...}}' naming every split the task uses (for a "
                "group, one such YAML per task)")
    return f"{bench.name}: {type(err).__name__}: {_first_line(err)}"


def _load_tasks(tm, bench: Benchmark, dirs: list[Path]) -> list:
    """The top-level Task/Group objects for one benchmark (downloads/reads its dataset)."""
    try:
        loaded = tm.load([bench.task])
    except KeyError:  # a local group naming built-in tasks: retry with lm-eval's own index
        loaded = task_manager(dirs, [bench.task], builtin=True).load([bench.task])
    if bench.task in loaded["groups"]:
        return [loaded["groups"][bench.task]]
    return list(loaded["tasks"].values())


def _fewshot(settings: EvalSettings, bench: Benchmark) -> int | None:
    if isinstance(settings.num_fewshot, dict):
        return settings.num_fewshot.get(bench.name, bench.num_fewshot)
    return settings.num_fewshot if settings.num_fewshot is not None else bench.num_fewshot


def fitted_gen_kwargs(lm, tasks: list, gen_kwargs: str | None) -> tuple[dict | None, int | None]:
    """`gen_kwargs` as a dict, with `max_gen_toks` capped to half the model's context when a
    generative task asks for all of it or more (lm-eval stops there on an assertion), and the
    number of tokens asked for when it was capped."""
    from lm_eval.utils import simple_parse_args_string

    kwargs = simple_parse_args_string(gen_kwargs) if gen_kwargs else {}
    context = getattr(lm, "max_length", None)
    asked = [int(kwargs.get("max_gen_toks") or (t.config.generation_kwargs or {}).get(
                 "max_gen_toks", getattr(lm, "max_gen_toks", 256)))
             for t in _leaf_tasks(tasks) if getattr(t, "OUTPUT_TYPE", None) == "generate_until"]
    if not isinstance(context, int) or not asked or max(asked) < context:
        return kwargs or None, None
    return {**kwargs, "max_gen_toks": context // 2}, max(asked)


def _evaluate_one(lm, tm, bench: Benchmark, tasks: list, settings: EvalSettings,
                  notes: list[str]) -> dict:
    import lm_eval

    gen_kwargs, asked = fitted_gen_kwargs(lm, tasks, settings.gen_kwargs)
    if asked:
        notes.append(f"{bench.name}: generation capped at {gen_kwargs['max_gen_toks']} tokens "
                     f"(half the model's {lm.max_length}-token context) instead of {asked}")
        log.warning(notes[-1])
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=tm, num_fewshot=_fewshot(settings, bench),
        limit=settings.limit, bootstrap_iters=settings.bootstrap_iters,
        log_samples=settings.log_samples, apply_chat_template=settings.apply_chat_template,
        fewshot_as_multiturn=settings.apply_chat_template, gen_kwargs=gen_kwargs,
        random_seed=settings.seed, numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
        confirm_run_unsafe_code=any(getattr(t, "UNSAFE_CODE", False)
                                    for t in _leaf_tasks(tasks)),
    )


def _leaf_tasks(tasks: list) -> list:
    """Tasks inside groups, and plain tasks."""
    return [leaf for t in tasks
            for leaf in (t.get_all_tasks() if hasattr(t, "get_all_tasks") else [t])]


def _load_all(tm, runnable: list[Benchmark], dirs: list[Path], errors: dict) -> dict[str, list]:
    """Load every benchmark's tasks (and datasets); failures go to `errors`, one line each."""
    loaded = {}
    for bench in runnable:
        try:
            loaded[bench.name] = _load_tasks(tm, bench, dirs)
        except Exception as err:  # noqa: BLE001 - one bad benchmark must not stop the others
            log.debug("loading %s failed", bench.name, exc_info=True)
            source = getattr(tm.task_index.get(bench.task), "yaml_path", None)
            errors[bench.name] = describe_failure(bench, err, source and str(source))
            log.error(errors[bench.name])
    return loaded


@contextmanager
def _env_info_once():
    """Collect lm-eval's environment report once per process instead of once per call.

    `simple_evaluate` adds torch's `collect_env` report to every result, which runs `pip list`
    (~0.6 s); for tiny models that is most of the time of a benchmark.
    """
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "add_env_info", None)
    if original is None:  # a future lm-eval moved it: nothing to speed up
        yield
        return

    def cached(storage: dict) -> None:
        if not _ENV_INFO:
            original(_ENV_INFO)
        storage.update(_ENV_INFO)

    evaluator.add_env_info = cached
    try:
        yield
    finally:
        evaluator.add_env_info = original


def _run_all(lm, tm, runnable: list[Benchmark], loaded: dict, cfg: EvalSettings,
             errors: dict, notes: list[str]) -> tuple[dict, dict]:
    """Evaluate the loaded benchmarks one by one: ({name: headline}, {name: lm-eval result})."""
    with _env_info_once():
        return _run_each(lm, tm, [b for b in runnable if b.name in loaded], loaded, cfg, errors,
                         notes)


def _run_each(lm, tm, todo: list[Benchmark], loaded: dict, cfg: EvalSettings,
              errors: dict, notes: list[str]) -> tuple[dict, dict]:
    heads, full = {}, {}
    for i, bench in enumerate(todo, start=1):
        log.info("[%d/%d] %s (lm-eval task %s)", i, len(todo), bench.name, bench.task)
        try:
            full[bench.name] = _evaluate_one(lm, tm, bench, loaded[bench.name], cfg, notes)
            heads[bench.name] = headline(bench, full[bench.name])
        except Exception as err:  # noqa: BLE001
            log.debug("evaluating %s failed", bench.name, exc_info=True)
            full.pop(bench.name, None)
            errors[bench.name] = describe_failure(bench, err)
            log.error(errors[bench.name])
    return heads, full


def non_finite_notes(lm) -> list[str]:
    """A warning (as a one-item list) when the loaded hf model has NaN or inf weights: its
    scores would be meaningless, but evaluating a broken model can be the point."""
    import torch

    from checkpoints.checkpoint import non_finite_parameters

    model = getattr(lm, "model", None)
    if not isinstance(model, torch.nn.Module):
        return []
    bad = non_finite_parameters(model)
    if not bad:
        return []
    note = (f"{len(bad)} weight tensors contain NaN or inf (e.g. {bad[0]}); the scores of this "
            "model are not meaningful")
    log.warning(note)
    return [note]


def _free_memory() -> None:
    """Let a study evaluate model after model on one GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(model: str | object, benchmarks: list[str], *, label: str | None = None,
             **settings) -> dict:
    """Evaluate `model` on `benchmarks`; return the run record (see `save_results`).

    `model` is a model folder or hub id, or an already built lm-eval `LM` (e.g.
    `HFLM(pretrained=in_memory_model, tokenizer=tok)`), which is then used as is.
    `settings` are `EvalSettings` fields. The record holds `scores` ({benchmark: headline
    value}), `headline` (task, metric key, direction, shots), `errors` ({benchmark: one line}),
    `notes`, the settings, package versions, `recipe` (the model folder's merge_recipe.yaml:
    what the report pairs merges with their AIM runs by; {} for other models) and the full
    lm-eval results per benchmark.
    Unknown benchmark names and a missing model folder raise UserError before anything runs.
    """
    cfg = EvalSettings(**settings)
    backend = select_backend(cfg.backend)
    device = str(resolve_device(cfg.device)) if backend == "hf" else "cuda"
    batch_size = (parse_batch_size(cfg.batch_size) if cfg.batch_size is not None
                  else "auto" if device.startswith("cuda") else 1)
    cfg = replace(cfg, backend=backend, device=device, batch_size=batch_size,
                  tasks_dirs=tuple(str(d) for d in cfg.tasks_dirs))
    if isinstance(model, str):
        check_model(model)
    runnable, errors, notes = resolve(list(benchmarks))
    for line in notes + list(errors.values()):
        log.warning(line)
    dirs = task_dirs(cfg.tasks_dirs)
    tm = task_manager(dirs, [b.task for b in runnable])
    unknown = [b.name for b in runnable if b.task not in tm.all_tasks]
    if unknown:
        raise UserError(f"--benchmarks: unknown {', '.join(unknown)}; use {', '.join(BENCHMARKS)}, "
                        f"an lm-eval task name, or a task YAML under --tasks_dir "
                        f"(searched {', '.join(map(str, dirs))})")
    if any(b.name in CODE_BENCHMARKS or b.name not in BENCHMARKS for b in runnable):
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # read by HF evaluate's code_eval when tasks load
    started = time.time()
    loaded = _load_all(tm, runnable, dirs, errors)
    heads, full = {}, {}
    if loaded:
        lm = model if not isinstance(model, str) else build_lm(
            model, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype,
            batch_size=cfg.batch_size, max_model_len=cfg.max_model_len, n_gpu=cfg.n_gpu,
            vllm_parallel=cfg.vllm_parallel, seed=cfg.seed)
        notes += non_finite_notes(lm)
        autocast_generation(lm, cfg.generation_autocast, cfg.device)
        heads, full = _run_all(lm, tm, runnable, loaded, cfg, errors, notes)
        del lm
        _free_memory()
    name = model if isinstance(model, str) else type(model).__name__
    recipe = read_record(Path(model)) if isinstance(model, str) and Path(model).is_dir() else {}
    return {
        "format": FORMAT, "label": label or (model_label(name) if isinstance(model, str) else name),
        "model": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runtime_s": round(time.time() - started, 1), "benchmarks": list(benchmarks),
        "settings": asdict(cfg), "versions": versions(), "tasks_dirs": [str(d) for d in dirs],
        "scores": {b: h["value"] for b, h in heads.items()}, "headline": heads,
        "errors": errors, "notes": notes, "recipe": recipe, "lm_eval": full,
    }
