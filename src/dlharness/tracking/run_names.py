"""Run names in MLflow's style (adjective-noun-number), drawn from the operating system's
entropy: MLflow draws its own from Python's global `random`, which a seeded training has just
seeded, so every run with the same seed got the same name."""

from __future__ import annotations

import random

ADJECTIVES = (
    "amber", "bold", "brisk", "calm", "clever", "crisp", "daring", "eager", "fair", "fleet",
    "gentle", "glad", "golden", "grand", "hardy", "honest", "keen", "kind", "lively", "lucid",
    "merry", "mighty", "nimble", "noble", "patient", "placid", "proud", "quick", "quiet", "rapid",
    "serene", "sharp", "silent", "sleek", "steady", "stellar", "sunny", "swift", "tidy", "vivid",
)  # fmt: skip
NOUNS = (
    "albatross", "badger", "bison", "crane", "cricket", "dolphin", "eagle", "falcon", "ferret",
    "finch", "fox", "gazelle", "gecko", "heron", "ibex", "jaguar", "kestrel", "koala", "lark",
    "lemur", "lynx", "marten", "mole", "newt", "ocelot", "otter", "owl", "panda", "puffin",
    "quail", "raven", "robin", "seal", "shrew", "sparrow", "stork", "tapir", "trout", "wren", "yak",
)  # fmt: skip
# The number after the words: 0..999, as MLflow's own names have.
NUMBER_RANGE = 1000


def fresh_run_name() -> str:
    draw = random.SystemRandom()
    return f"{draw.choice(ADJECTIVES)}-{draw.choice(NOUNS)}-{draw.randrange(NUMBER_RANGE)}"
