import torch, time
torch.set_num_threads(1)
def bench(f,*a,n=30):
    for _ in range(3): f(*a)
    t=time.process_time()
    for _ in range(n): f(*a)
    return (time.process_time()-t)/n*1e3
x=torch.randn(128,3,144,144); b=torch.randn(3,144,144); xf=x.reshape(384,144,144)
f1=torch.compile(lambda x,b: (x+b).softmax(-1))
f2=torch.compile(lambda x: x.softmax(-1))
f3=torch.compile(lambda x,b: (x+b.unsqueeze(0)).softmax(-1))
be=b.expand(128,3,144,144).contiguous()
f4=torch.compile(lambda x,b: (x+b).softmax(-1))
print('bias-bcast %.2f  nobias %.2f  full-bias %.2f  eager-bias %.2f ms'%(bench(f1,x,b),bench(f2,xf),bench(f4,x,be),bench(lambda x,b:(x+b).softmax(-1),x,b)))
