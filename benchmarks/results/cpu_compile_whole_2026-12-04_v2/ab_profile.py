import sys, time, json, statistics, torch
torch.set_num_threads(1)
import torch._inductor.config as ic
ic.cpp.enable_kernel_profile = True
from gigamim_benchmarks.train_step import Case, StepRunner
tag = sys.argv[1]; steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
cases = [Case(name=f"{i}", group="p", impl=i, model="swinv2_tiny", img_size=192, batch=8, steps=steps, warmup=2,
              compile=True, compile_scope="model", memory=False) for i in ("gigamim", "reference")]
t = time.time(); rs = [StepRunner(c, "cpu") for c in cases]
for r in rs: r.warmup()
print("warmup", round(time.time() - t), flush=True)
for i in range(steps):
    for r in (rs if i % 2 == 0 else rs[::-1]): r.timed_step()
cpu = [[x["cpu"] for x in r.times] for r in rs]
med = [statistics.median(c) for c in cpu]
print("cpu gig", [round(x,3) for x in cpu[0]]); print("cpu ref", [round(x,3) for x in cpu[1]])
print(f"RATIO ref/gig cpu median = {med[1]/med[0]:.4f}  (gig {med[0]:.3f} ref {med[1]:.3f}); min-ratio {min(cpu[1])/min(cpu[0]):.4f}", flush=True)
from torch.profiler import profile, ProfilerActivity
res = {}
for r in rs:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        r.timed_step()
    res[r.case.impl] = dict(rows=[dict(name=e.key, self_us=e.self_cpu_time_total, n=e.count) for e in p.key_averages()],
        shapes=[dict(name=e.key, shapes=str(e.input_shapes), self_us=e.self_cpu_time_total, n=e.count) for e in p.key_averages(group_by_input_shape=True) if e.key in ("aten::mm","aten::addmm","aten::bmm","aten::copy_")],
        cpu=r.times[-1]["cpu"])
json.dump(dict(cpu=cpu, prof=res), open(f"ab_{tag}.json", "w"))
