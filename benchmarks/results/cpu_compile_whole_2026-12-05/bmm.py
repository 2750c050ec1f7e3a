import torch, time
torch.set_num_threads(1)
def bench(f,n=20):
    for _ in range(3): f()
    t=time.process_time()
    for _ in range(n): f()
    return (time.process_time()-t)/n
a=torch.randn(384,144,32); b=torch.randn(384,32,144); fl=2*384*144*144*32
print('bmm K=32  %.1f GF/s'%(fl/bench(lambda: torch.bmm(a,b))/1e9))
a2=torch.randn(384*144,32); b2=torch.randn(32,144)
print('mm  K=32 shared %.1f GF/s'%(fl/bench(lambda: a2@b2)/1e9))
a3=torch.randn(384,144,144); b3=torch.randn(384,144,32)
print('bmm K=144 N=32 %.1f GF/s'%(fl/bench(lambda: torch.bmm(a3,b3))/1e9))
a4=torch.randn(384,144,64); b4=torch.randn(384,64,144)
print('bmm K=64 %.1f GF/s'%(2*fl/bench(lambda: torch.bmm(a4,b4))/1e9))
a5=torch.randn(384,288,32); b5=torch.randn(384,32,288)
print('bmm 288x288 K=32 %.1f GF/s'%(4*fl/bench(lambda: torch.bmm(a5,b5))/1e9))
o=torch.empty(384,144,144)
print('bmm out= K=32  %.1f GF/s'%(fl/bench(lambda: torch.bmm(a,b,out=o))/1e9))
