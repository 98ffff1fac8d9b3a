"""Two `stemgen table3` runs of the same songs, settings and seeds, compared per song (paired):

    python bench/table3_compare.py A/table3.json B/table3.json

prints a markdown table of A, B and A - B with the paired standard error (per-song scores), and the
set-level scores (MIRDD, FAD) side by side."""
import json
import math
import sys

a, b = (json.load(open(p)) for p in sys.argv[1:3])
key = lambda r: (r["song"], r["instrument"], r["setting"])
A = {key(r): r for r in a["per_song"]}; B = {key(r): r for r in b["per_song"]}
print("| stem | setting | metric | A | B | A - B (paired, +- SE) | SE of B |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for inst in ("bass", "drums"):
    for setting in [s for s in ("naive", "paper", "default", "deaf", "ceiling") if s in a["table"].get(inst, {})
                    and s in b["table"].get(inst, {})]:
        for m in ("chord_root", "beat_align", "tempo_agree"):
            ks = [k for k in B if k[1] == inst and k[2] == setting and B[k].get(m) is not None]
            if not ks: continue
            x = [A[k][m] for k in ks]; y = [B[k][m] for k in ks]; d = [p - q for p, q in zip(x, y)]
            n = len(d); md = sum(d) / n; my = sum(y) / n
            sd = math.sqrt(sum((v - md) ** 2 for v in d) / (n - 1)) / math.sqrt(n)
            sy = math.sqrt(sum((v - my) ** 2 for v in y) / (n - 1)) / math.sqrt(n)
            print(f"| {inst} | {setting} | {m} | {sum(x)/n:.3f} | {my:.3f} | {md:+.3f} +- {sd:.3f} | {sy:.3f} |")
        ta, tb = a["table"][inst][setting], b["table"][inst][setting]
        for m in ("mirdd_with_context", "mirdd_stem", "fad_logmel"):
            print(f"| {inst} | {setting} | {m} | {ta[m]:.3f} | {tb[m]:.3f} | {ta[m]-tb[m]:+.3f} | - |")
