import json, sys, time
sys.path.insert(0, "/work/wt/i15")
from gigamim_benchmarks.zero_sweep import run_zero_compile
t=time.time()
res = run_zero_compile("/tmp/i15/zc_engine", variants=("zero3_eager","zero3_compiled","zero3_engine_compile"), model="swinv2_nano", img_size=64, window_size=4, micro_batch=2, warmup=2, steps=3)
for r in res: print(json.dumps({k: r.get(k) for k in ("label","step_time_s","warmup_s","dynamo_graphs_compiled","collective_calls_per_step","loss","error")})[-1500:])
print("total", time.time()-t)
