"""Greedy accuracy of a checkpoint on the first N demo test items, paired with the base's replies (same items)."""
import collections, json, sys, time
sys.path.insert(0, "bench")
import torch
torch.set_num_threads(2)
from study import greedy
from unisd import models, stats
from unisd.data import benchmarks
from unisd.data import scoring as S
path, n = sys.argv[1], int(sys.argv[2])
ex = benchmarks.load("demo", "test")[:n]
tok, model = models.load_tokenizer(path), models.load_model(path).eval()
t0 = time.time()
replies = greedy(model, tok, [e.prompt for e in ex], 96, chunk=n)
print(f"greedy {n} items: wall {time.time()-t0:.0f}s", flush=True)
acc = [S.score(r, e.meta)["acc"] for r, e in zip(replies, ex)]
base = [S.score(b["reply"], e.meta)["acc"] for b, e in zip(json.load(open("bench/results/study/probe/base-replies.json")), ex)]
k = int(sum(acc))
print(f"{path}: {k}/{n} = {100*k/n:.1f}% CI {[round(100*x,1) for x in stats.proportion_ci(k, n)]}")
p = stats.paired(acc, base).as_json(100.0)
print("vs base:", {k: (round(v, 1) if isinstance(v, float) else [round(x, 1) for x in v] if isinstance(v, list) else v) for k, v in p.items()})
print("top answers", collections.Counter(S.extract_number(r) for r in replies).most_common(3))
json.dump([{"prompt": e.prompt, "gold": e.answer, "reply": r} for e, r in zip(ex, replies)], open("/dev/null", "w"), indent=1)
for r in replies[:3]:
    print(repr(r[:200]))
