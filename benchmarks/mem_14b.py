"""Where the memory of e2e.py's Wan2.1-14B 720p turbo row goes: allocated / peak GPU memory after each step of
that row's setup (random bf16 weights, one bf16 forward, SageSLA + W8A8 fast + fused norms + text K/V cache),
then three turbo forwards, the text K/V cache cleared before the third. Prints only (H100 output of 2026-11-22:
benchmarks/results/mem_14b_h100_2026-11-22.log).

    PYTHONPATH=. python benchmarks/mem_14b.py
"""
import sys, torch
sys.path.insert(0, "benchmarks")
import e2e as E
from turbovid.models.dit import WanDiT
GB = 1e9
def m(tag):
    torch.cuda.synchronize()
    print(f"{tag}: alloc {torch.cuda.memory_allocated()/GB:.2f} GB, peak {torch.cuda.max_memory_allocated()/GB:.2f} GB", flush=True)
cfg = E.DIT_14B
with torch.device("meta"):
    net = WanDiT(cfg).to(torch.bfloat16)
net = E.random_init_(net.to_empty(device="cuda")).eval().requires_grad_(False); m("bf16 init")
context = torch.randn(1, E.TEXT.text_len, E.TEXT.d_model, device="cuda", dtype=torch.bfloat16)
x = torch.randn(E.LATENT_720P, device="cuda").to(torch.bfloat16); t = torch.tensor([988.0], device="cuda")
with torch.no_grad():
    net(x, t, context)
m("after bf16 dense fwd")
E.set_attention(net, "sagesla", 0.1); E.quantize(net, "fast"); torch.cuda.empty_cache(); m("quantized")
E.fuse_qk_norm_rope(E.enable_text_kv_cache(E.fuse_block_norms(net))); torch.cuda.empty_cache(); m("fused")
print("state bytes GB", sum(v.nbytes for v in net.state_dict().values()) / GB, flush=True)
for i in range(3):
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        net(x, t, context)
    m(f"turbo fwd {i}")
    if i == 1:
        net.text_kv.clear(); m("kv cleared")
