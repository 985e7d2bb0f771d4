"""The zoo families the study runs on: which benchmarks are skills, which measure general
ability, which models form the population, and where a zoo's calibration text comes from.

- toy: the 452K-parameter toy zoo (`toy_zoo`), its skills as exact-match tasks and byte
  perplexity of held-out toy text; calibration text drawn from the toy corpus
- smollm2: the real SmolLM2-135M and its CPU-trained experts (`llm_zoo`): IFEval-, GSM8K- and
  HumanEval-like skills, capitals knowledge and word perplexity of held-out prose as general
  ability; calibration on the zoo's `data/calib.jsonl` (pydoc prose disjoint from the perplexity
  set) in 512-token blocks, as the AIM reference does with the Pile
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

POPULATION = ("base", "expert_instruct", "expert_math", "expert_code")


@dataclass(frozen=True)
class Family:
    name: str
    default_dir: Path
    skills: tuple[str, ...]          # skill benchmarks: the HV axes and the skill mean
    ppl: str                         # perplexity benchmark (lower is better), shown beside HV
    ppl_metric: str                  # what that perplexity is, for axis labels
    general: tuple[str, ...] = ()    # other general-ability benchmarks, reported beside
    population: tuple[str, ...] = POPULATION
    generation_autocast: str | None = None  # default matmul dtype of greedy generation
    # study flags whose default differs for this family: (flag's dest, value) pairs
    study_defaults: tuple[tuple[str, object], ...] = ()

    @property
    def benchmarks(self) -> tuple[str, ...]:
        return (*self.skills, *self.general, self.ppl)

    def short(self, benchmark: str) -> str:
        """A benchmark's name without the family prefix, for progress lines."""
        return benchmark.split("_", 1)[1] if "_" in benchmark else benchmark

    def calibration(self, zoo: Path, out: Path) -> tuple[Path, int]:
        """(calibration text file, block size in tokens) for a zoo of this family."""
        if self.name == "smollm2":
            return (zoo / "data" / "calib.jsonl").resolve(), 512
        from study.run import write_calibration_texts

        context = json.loads((zoo / "base" / "config.json").read_text())["max_position_embeddings"]
        return write_calibration_texts(out / "calib.jsonl").resolve(), context


TOY = Family("toy", Path("zoo"), ("toy_instruct", "toy_math", "toy_code"), "toy_ppl", "byte perplexity")
SMOLLM2 = Family("smollm2", Path("zoo_smollm2"), ("smollm2_instruct", "smollm2_math", "smollm2_code"),
                 "smollm2_ppl", "word perplexity", general=("smollm2_knowledge",),
                 generation_autocast="bfloat16",
                 # the grid that fits in about 90 min on 2 cores (README: the SmolLM2 study):
                 # weight 0.3 (1.0 breaks task arithmetic and DARE here), one 64-prompt batch per
                 # benchmark, sweep and controls on the 3-expert TA and TIES merges, DARE's second
                 # seed on the 3-expert merges
                 study_defaults=(("weights", (0.3,)), ("sweep_sizes", (3,)),
                                 ("sweep_methods", ("task_arithmetic", "ties")),
                                 ("dare_seed_sizes", (3,)), ("limit", 64), ("batch_size", 64),
                                 ("threads", 2)))
FAMILIES = {f.name: f for f in (TOY, SMOLLM2)}
