"""Does the dream hurt on the CPU demo pair, and are its dreams faithful? Seed once, then dream variants on copies.

python benchmarks/results/cpu-dream-phases/dream_variants.py NAME [dream.key=value ...]   # work in $DX or /tmp/dx
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from sleepctl import record
from sleepctl.data import _values
from sleepctl.dream import dream
from sleepctl.memories import open_store
from sleepctl.prompts import entities
from sleepctl.seed import seed

ROOT = Path(__file__).resolve().parents[3]
root = Path(os.environ.get("DX", "/tmp/dx"))
root.mkdir(parents=True, exist_ok=True)
seeded = root / "seeded"
if not seeded.exists():
    src = root / "demo4.jsonl"
    src.write_text("".join(open(ROOT / "examples" / "memories.jsonl").readlines()[:4]))
    h = root / "h0"
    shutil.rmtree(h, ignore_errors=True)
    record([src], home=h)
    t = time.time()
    s = seed("demo-cpu", home=h, show_progress=False)
    print("seed", s.status, round(time.time() - t), flush=True)
    shutil.copytree(h, seeded)
name = sys.argv[1]
ov = dict(kv.split("=", 1) for kv in sys.argv[2:])
ov = {k: json.loads(v) if v[:1] in "0123456789[{tf-" else v for k, v in ov.items()}
h = root / name
shutil.rmtree(h, ignore_errors=True)
shutil.copytree(seeded, h)
t = time.time()
d = dream("demo-cpu", home=h, overrides=ov, show_progress=False, consolidate=False)
print(
    name,
    d.status,
    "before",
    d.before,
    "after",
    d.after,
    "dreams",
    d.dreams,
    "kept",
    d.kept,
    "rewarded",
    d.rewarded,
    "phases",
    {k: round(v) for k, v in d.phases_s.items()},
    "wall",
    round(time.time() - t),
    flush=True,
)
with open_store(h) as st:
    texts = "\n".join(t.text for t in st.traces())
    run = Path(st.run(d.run_id).dir)
dreams = json.loads((run / "dreams.json").read_text())
kept = set(json.loads((run / "kept.json").read_text()))
rewards = json.loads((run / "rewards.json").read_text())
src_vals = set(_values(texts))
bad = 0
for x in dreams:
    vals = set(_values(x["text"])) - src_vals
    names = [n for n in entities(x["text"], 20) if n.lower() not in texts.lower()]
    flag = bool(vals or names)
    bad += flag
    if x["id"] in kept:
        print(
            f"  [{x['kind']}{' drop' if x['dropout'] else ''}] reward={rewards.get(x['id'], {}).get('reward')} new_values={sorted(vals)} new_names={names[:4]} :: {x['text'][:160]!r}"
        )
print(f"dreams stating a value or name absent from every memory: {bad} of {len(dreams)}")
