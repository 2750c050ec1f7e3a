import sys, time, resource, statistics, torch
torch.set_num_threads(1)
from gigamim_benchmarks.train_step import Case, StepRunner
rs=[]
for impl in ("gigamim","reference"):
    c=Case(name=impl, group="p", impl=impl, model="swinv2_tiny", img_size=192, batch=8, steps=4, warmup=2, compile=True, compile_scope="model", memory=False)
    r=StepRunner(c,"cpu"); r.warmup(); rs.append(r)
res={r.case.impl:[] for r in rs}
for i in range(4):
    for r in (rs if i%2==0 else rs[::-1]):
        f0=resource.getrusage(resource.RUSAGE_SELF); t=time.process_time()
        r.timed_step()
        f1=resource.getrusage(resource.RUSAGE_SELF)
        res[r.case.impl].append((time.process_time()-t, f1.ru_minflt-f0.ru_minflt, f1.ru_stime-f0.ru_stime))
for k,v in res.items():
    print(k, 'cpu %.3f'%statistics.median(x[0] for x in v), 'minflt %d'%statistics.median(x[1] for x in v), 'sys %.3f'%statistics.median(x[2] for x in v))
g=statistics.median(x[0] for x in res['gigamim']); r_=statistics.median(x[0] for x in res['reference']); print('ratio', r_/g)
