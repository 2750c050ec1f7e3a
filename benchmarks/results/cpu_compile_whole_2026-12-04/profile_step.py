import sys, time, torch
torch.set_num_threads(int(__import__("os").environ.get("NT","1")))
import torch._inductor.config as ic
ic.cpp.enable_kernel_profile = True
from gigamim_benchmarks.train_step import Case, StepRunner
impl = sys.argv[1]; scope = sys.argv[2] if len(sys.argv) > 2 else "model"
c = Case(name=f"p_{impl}", group="p", impl=impl, model="swinv2_tiny", img_size=192, batch=8, steps=3, warmup=2,
         compile=scope != "eager", compile_scope=scope if scope != "eager" else "blocks", memory=False)
t = time.time(); r = StepRunner(c, "cpu"); r.warmup(); print("warmup", time.time() - t, flush=True)
for _ in range(2): r.timed_step()
print("steps", [round(x["total"], 3) for x in r.times], [round(x["forward"], 3) for x in r.times], [round(x["backward"], 3) for x in r.times])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    r.timed_step()
print("profiled", r.times[-1])
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=90))
