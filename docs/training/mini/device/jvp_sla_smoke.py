"""GPU smoke check before a `--sla-student` rCM run: the JVP of a mini-size SLA DiT (bf16 autocast, MathSLA) is
finite and its value matches the fused SLA forward. Usage: python3 jvp_sla_smoke.py"""
import torch

from turbovid.config import MINI_DIT
from turbovid.models.dit import WanDiT
from turbovid.train.losses import trigflow_velocity
from turbovid.train.trigflow import denoise, student_F_jvp

torch.manual_seed(0)
net = WanDiT(MINI_DIT, attention="sla", topk=0.5).cuda()
for block in net.blocks:
    torch.nn.init.normal_(block.self_attn.attn_op.local_attn.proj_l.weight, std=0.05)
x = torch.randn(2, 16, 9, 30, 30, device="cuda")
t = torch.tensor([0.6, 1.2], dtype=torch.float64, device="cuda")
ctx = torch.randn(2, MINI_DIT.text_len, MINI_DIT.text_dim, device="cuda")
with torch.autocast("cuda", dtype=torch.bfloat16):
    value, tangent = student_F_jvp(net, x, t, ctx, torch.randn_like(x), torch.ones_like(t))
    with torch.no_grad():
        fused = trigflow_velocity(x, t, denoise(net, x, t, ctx))
rel = ((value.float() - fused.float()).norm() / fused.float().norm()).item()
print(f"jvp smoke: tangent finite {bool(tangent.isfinite().all())}, value vs fused SLA rel {rel:.4f}")
assert tangent.isfinite().all() and rel < 0.05
