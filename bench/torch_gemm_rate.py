# PyTorch's own f32 matmul rate on this machine (2 threads), to compare with the GEMM peak that
# `adapterkit bench` reports. Run with the bench venv: $venv/bin/python bench/torch_gemm_rate.py
# (MKL_ENABLE_INSTRUCTIONS=AVX512 or ONEDNN_MAX_CPU_ISA=AVX512_CORE did not change it here).
import torch,time
torch.set_num_threads(2)
a=torch.randn(1024,384);b=torch.randn(384,1536)
for i in range(3): a@b
ts=[]
for i in range(20):
  t=time.perf_counter();c=a@b;ts.append(time.perf_counter()-t)
ts.sort();print('1024x384x1536 GFLOP/s',2*1024*384*1536/ts[10]/1e9)
a=torch.randn(2048,768);b=torch.randn(768,3072)
ts=[]
for i in range(8):
  t=time.perf_counter();c=a@b;ts.append(time.perf_counter()-t)
ts.sort();print('2048x768x3072 GFLOP/s',2*2048*768*3072/ts[4]/1e9)
