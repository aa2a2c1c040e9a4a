# PyTorch's own matmul rate on this machine (2 threads), to compare with the GEMM peak that
# `adapterkit bench` reports. Run with the bench venv: $venv/bin/python bench/torch_gemm_rate.py
# (MKL_ENABLE_INSTRUCTIONS=AVX512 or ONEDNN_MAX_CPU_ISA=AVX512_CORE did not change it here).
# `--dtypes` adds bf16 and fp16 matmuls (oneDNN's reduced-precision paths), to set beside the
# f32 FMA, bf16 dot and fp16 FMA instruction rates of `kernels::probe`.
import sys, time
import torch

torch.set_num_threads(2)


def rate(dtype, m, k, n, reps):
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    ts.sort()
    return 2 * m * k * n / ts[reps // 2] / 1e9


dtypes = [torch.float32]
if "--dtypes" in sys.argv[1:]:
    dtypes += [torch.bfloat16, torch.float16]
for dtype in dtypes:
    tag = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
    print(f"1024x384x1536{tag} GFLOP/s", rate(dtype, 1024, 384, 1536, 20))
    print(f"2048x768x3072{tag} GFLOP/s", rate(dtype, 2048, 768, 3072, 8))
