"""Procedural text for the toy zoo: a generic corpus and three skills with held-out prompts.

Generic documents mix template families (sentences, counting, alphabet runs, records, code
lines, fact Q/A) with *sibling* tasks that share each skill's format but not its answer rule
(`lower(...)`, one-digit sums, round-only brackets), so the base learns the formats and the
copying/carrying machinery while scoring near 0 on the skills themselves.

Skills (greedy continuation, exact match up to the newline; prompts end on a non-space
character so no whitespace sits on the prompt/answer boundary):
  instruct  `upper(red fox jumps)=` -> `RED FOX JUMPS`  (also `first`, `last`, `count`)
  math      `23+58=`                -> `81`
  code      `brackets: ([{(=`       -> `)}])`
"""
from __future__ import annotations

import random
from typing import Callable

WORDS = (
    "red blue green black white small big old new fast slow warm cold dark light happy "
    "cat dog fox bird fish cow horse mouse lion bear tree house car boat road river hill "
    "book pen cup door bed box ball hat coat shoe lamp milk bread cake apple rain snow sun "
    "moon star sea sky park city town farm shop school garden kitchen window table chair "
    "runs jumps sleeps eats reads sings walks swims sees finds makes takes opens holds likes"
).split()
NOUNS = WORDS[16:61]
ADJS = WORDS[:16]
VERBS = WORDS[61:]
NAMES = "anna ben carl dora eve finn gina hugo iris jack kate leo mia nick olga paul rosa sam tina ugo".split()
CITIES = "paris rome oslo lima cairo tokyo delhi quito seoul dakar".split()
FACTS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
         "blood": "red", "milk": "white", "sea": "blue", "leaf": "green", "night": "dark"}
OPEN_CLOSE = {"(": ")", "[": "]", "{": "}"}
SKILLS = ("instruct", "math", "code")


def _words(rng: random.Random, lo: int = 2, hi: int = 4) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


INSTRUCT_VERBS: dict[str, Callable[[list[str]], str]] = {
    "first": lambda ws: ws[0],
    "last": lambda ws: ws[-1],
    "count": lambda ws: str(len(ws)),
    "upper": lambda ws: " ".join(w.upper() for w in ws),
}


def instruct_example(rng: random.Random) -> tuple[str, str]:
    """`verb(words)=` -> the words transformed by the verb."""
    verb, ws = rng.choice(sorted(INSTRUCT_VERBS)), _words(rng)
    return f"{verb}({' '.join(ws)})=", INSTRUCT_VERBS[verb](ws)


def math_example(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition: `a+b=` -> `a+b`."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


def code_example(rng: random.Random) -> tuple[str, str]:
    """Close a run of mixed brackets: `brackets: ([{(=` -> `)}])`."""
    opens = "".join(rng.choice("([{") for _ in range(rng.randint(3, 8)))
    return f"brackets: {opens}=", "".join(OPEN_CLOSE[c] for c in reversed(opens))


SKILL_EXAMPLES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "instruct": instruct_example, "math": math_example, "code": code_example,
}


def sibling_line(rng: random.Random) -> str:
    """A base-corpus line in a skill's format whose rule differs from the skill's."""
    kind = rng.randrange(4)
    if kind == 0:
        ws = _words(rng)
        return f"lower({' '.join(w.upper() for w in ws)})={' '.join(ws)}"
    if kind == 1:
        ws = _words(rng)
        return f"copy({' '.join(ws)})={' '.join(ws)}"
    if kind == 2:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}={a + b}"
    n = rng.randint(1, 8)
    return f"brackets: {'(' * n}={')' * n}"


def generic_line(rng: random.Random) -> str:
    """One line from a random template family."""
    kind = rng.randrange(7)
    if kind == 0:
        return (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(NOUNS)}.")
    if kind == 1:
        start, step = rng.randint(0, 50), rng.randint(1, 5)
        return " ".join(str(start + i * step) for i in range(rng.randint(4, 8)))
    if kind == 2:
        i = rng.randint(0, 19)
        return " ".join(chr(97 + j) for j in range(i, i + rng.randint(4, 7)))
    if kind == 3:
        return f"name: {rng.choice(NAMES)}, age: {rng.randint(5, 90)}, city: {rng.choice(CITIES)}."
    if kind == 4:
        v = rng.choice("xyzabn")
        return f"let {v} = {rng.randint(0, 99)}; print({v});"
    if kind == 5:
        thing = rng.choice(sorted(FACTS))
        return f"Q: what color is the {thing}? A: {FACTS[thing]}."
    return f"{rng.choice(NAMES)} likes {rng.choice(NOUNS)}s and {rng.choice(NOUNS)}s."


def generic_doc(rng: random.Random, max_chars: int, sibling_share: float) -> str:
    """Lines joined by newlines, at most `max_chars` long; `sibling_share` of lines are siblings."""
    lines: list[str] = []
    while True:
        line = sibling_line(rng) if rng.random() < sibling_share else generic_line(rng)
        if len("\n".join(lines + [line])) > max_chars:
            return "\n".join(lines) if lines else line[:max_chars]
        lines.append(line)


def held_out_prompts(skill: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs of `skill`, fixed by `seed`; never used for training."""
    rng, seen, out = random.Random(f"eval-{skill}-{seed}"), set(), []
    while len(out) < n:
        prompt, answer = SKILL_EXAMPLES[skill](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def training_examples(skill: str, rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs of `skill` whose prompts are not in `exclude`."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer = SKILL_EXAMPLES[skill](rng)
        if prompt not in exclude:
            out.append((prompt, answer))
    return out
