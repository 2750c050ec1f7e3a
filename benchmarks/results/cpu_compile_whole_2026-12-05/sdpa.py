import torch, time, torch.nn.functional as F
torch.set_num_threads(1)
def bench(f, n=20):
    for _ in range(3): f()
    t=time.process_time()
    for _ in range(n): f()
    return (time.process_time()-t)/n*1e3
for (Bw,h,N,d) in [(128,3,144,32),(32,6,144,32),(8,12,144,32)]:
    q=torch.randn(Bw,h,N,d,requires_grad=True); k=torch.randn(Bw,h,N,d,requires_grad=True); v=torch.randn(Bw,h,N,d,requires_grad=True)
    bias=torch.randn(h,N,N)
    go=torch.randn(Bw,h,N,d)
    def explicit():
        a=(q@k.transpose(-1,-2))+bias
        a=a.softmax(-1)
        o=a@v
        o.backward(go)
    def sdpa():
        o=F.scaled_dot_product_attention(q,k,v,attn_mask=bias,scale=1.0)
        o.backward(go)
    def explicit_fwd():
        with torch.no_grad():
            a=((q@k.transpose(-1,-2))+bias).softmax(-1)@v
    def sdpa_fwd():
        with torch.no_grad(): F.scaled_dot_product_attention(q,k,v,attn_mask=bias,scale=1.0)
    print((Bw,h,N,d), 'explicit fwd+bwd %.1f ms  sdpa fwd+bwd %.1f ms   fwd: %.1f vs %.1f'%(bench(explicit),bench(sdpa),bench(explicit_fwd),bench(sdpa_fwd)))
# mask requiring grad?
q=torch.randn(8,3,144,32,requires_grad=True); b=torch.randn(3,144,144,requires_grad=True)
try:
    o=F.scaled_dot_product_attention(q,q,q,attn_mask=b,scale=1.0); o.sum().backward(); print('mask grad', b.grad is not None, o.grad_fn)
except Exception as e: print('ERR', e)
