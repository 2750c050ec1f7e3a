import sys, time, statistics, torch
torch.set_num_threads(1)
from gigamim_benchmarks.train_step import Case, StepRunner
from gigamim.models.attention import WindowAttention
steps=int(sys.argv[1]); variants=sys.argv[2].split(',')
rs=[]
for v in variants:
    impl, budget = v.split(':')
    c=Case(name=v, group="p", impl=impl, model="swinv2_tiny", img_size=192, batch=8, steps=steps, warmup=2, compile=True, compile_scope="model", memory=False)
    r=StepRunner(c,"cpu")
    if impl=="gigamim":
        for m in r.model.modules():
            if isinstance(m, WindowAttention): m._budget = int(budget)
    t=time.time(); r.warmup(); rs.append(r); print(c.name,'warm',round(time.time()-t),flush=True)
for i in range(steps):
    for r in (rs if i%2==0 else rs[::-1]): r.timed_step()
med={r.case.name: statistics.median(x["cpu"] for x in r.times) for r in rs}
ref=[k for k in med if k.startswith('reference')]
for k,v in med.items(): print(k, round(v,3), *(['ref/this %.3f'%(med[ref[0]]/v)] if ref else []))
import json; json.dump({r.case.name:[x["cpu"] for x in r.times] for r in rs}, open("ab3_last.json","w"))
print({r.case.name:[round(x["cpu"],3) for x in r.times] for r in rs})
