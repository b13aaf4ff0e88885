"""Base greedy accuracy on the first N demo test items (scored by the task's scorer) + teacher preference."""
import collections, json, sys, time
sys.path.insert(0, "bench")
import torch
torch.set_num_threads(2)
from study import greedy, mean_logprob
from unisd import models, stats
from unisd.data import benchmarks
from unisd.data import scoring as S
from unisd.data.prompts import demonstration, teacher_prompt
n = int(sys.argv[1])
ex = benchmarks.load("demo", "test")[:n]
tok, model = models.load_tokenizer("smollm2-135m"), models.load_model("smollm2-135m").eval()
t0, c0 = time.time(), time.process_time()
replies = greedy(model, tok, [e.prompt for e in ex], 96, chunk=n)
print(f"greedy {n} items: wall {time.time()-t0:.0f}s cpu {time.process_time()-c0:.0f}s", flush=True)
acc = [S.score(r, e.meta)["acc"] for r, e in zip(replies, ex)]
k = int(sum(acc))
print(f"base accuracy {k}/{n} = {100*k/n:.1f}% CI {[round(100*x,1) for x in stats.proportion_ci(k, n)]}")
print("top answer share", collections.Counter(S.extract_number(r) for r in replies).most_common(3))
json.dump([{"prompt": e.prompt, "gold": e.answer, "reply": r} for e, r in zip(ex, replies)], open("bench/results/study/probe/base-replies.json", "w"), indent=1)
for e, r in list(zip(ex, replies))[:4]:
    print(repr(r[:200]))
t0 = time.time()
tp = sp = m = 0
for e, r in zip(ex, replies):
    if S.score(r, e.meta)["acc"] == 1.0:
        continue
    tp += mean_logprob(model, tok, teacher_prompt(e), demonstration(e)) > mean_logprob(model, tok, teacher_prompt(e), r)
    sp += mean_logprob(model, tok, e.prompt, demonstration(e)) > mean_logprob(model, tok, e.prompt, r)
    m += 1
print(f"teacher pref on {m} wrong items: teacher prompt {tp} CI {[round(100*x,1) for x in stats.proportion_ci(tp, m)]}, "
      f"student prompt {sp} CI {[round(100*x,1) for x in stats.proportion_ci(sp, m)]}  ({time.time()-t0:.0f}s)", flush=True)
