import sys, time, statistics, torch, json
torch.set_num_threads(1)
from gigamim_benchmarks.train_step import Case, StepRunner
steps=int(sys.argv[1]) if len(sys.argv)>1 else 6
cases=[Case(name=f"{i}_{s}", group="p", impl=i, model="swinv2_tiny", img_size=192, batch=8, steps=steps, warmup=2,
            compile=True, compile_scope=s, memory=False) for i in ("gigamim","reference") for s in ("model","blocks")]
rs=[]
for c in cases:
    t=time.time(); r=StepRunner(c,"cpu"); r.warmup(); rs.append(r); print(c.name,'warm',round(time.time()-t),flush=True)
for i in range(steps):
    for r in (rs if i%2==0 else rs[::-1]): r.timed_step()
med={r.case.name: statistics.median(x["cpu"] for x in r.times) for r in rs}
for k,v in med.items(): print(k, round(v,3))
g=med['gigamim_model']
for k,v in med.items(): print('ratio %s/gigamim_model = %.3f'%(k, v/g))
json.dump({r.case.name:[x["cpu"] for x in r.times] for r in rs}, open('scope.json','w'))
