# memest: about 2 minutes on one H200 (block counts ~20 s, two o96_l6 steps ~30 s, graph build ~10 s); outputs under $OUT/memest/.
# Settles on the GPU what the peak-memory estimate (squall.planning.estimate.step_phases) takes
# from CPU counts: the tensors one GraphTransformer block keeps for its backward with the Triton
# kernels under CUDA autocast (squall.planning.memory.count_block, device cuda), and for one
# o96_l6 step (1024 ch, 16 layers, triton, eager, bf16 autocast, fused AdamW) with every block
# kept (`none`) and with every block recomputed (`full`): peak allocated per phase of the step
# (end of forward, then between the completion of each block's gradients), counted held bytes.
mkdir -p $OUT/memest
export SQUALL_GIT_SHA=${SQUALL_GIT_SHA:-$(cat _gpu/sha 2>/dev/null)}
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/memest/device.txt
timeout 300 python3 - > $OUT/memest/log.txt 2>&1 <<'EOF'
import json, os, time
from pathlib import Path
import torch, yaml
from squall.graphs import load_or_build
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups
from squall.planning.memory import count_block
from squall.train.loop import area_weighted_mse

out = Path(os.environ["OUT"]) / "memest"
res = {"git": os.environ.get("SQUALL_GIT_SHA"), "gpu": torch.cuda.get_device_name(),
       "torch": torch.__version__, "blocks": [], "steps": []}
t0 = time.time()
for bip in (True, False):
    for pol in ("none", "mlp"):
        r = count_block(channels=1024, heads=16, mlp_ratio=4, n_dst=20000, n_src=33001, degree=8,
                        edge_dim=11, bipartite=bip, autocast=True, policy=pol, device="cuda")
        r.update(bipartite=bip, policy=pol, values_dst=r["dst"] / 2, values_src=r["src"] / 2)
        res["blocks"].append(r)
        print(r, flush=True)
print("blocks", time.time() - t0, "s", flush=True)
spec = yaml.safe_load(Path("conf/graph/o96_l6.yaml").read_text())
g = load_or_build(spec, "/tmp/memest_graphs")
GIB = 1024**3
for pol in ("none", "full"):
    torch.manual_seed(0)
    mcfg = ModelConfig(num_channels=1024, num_heads=16, processor_layers=16, mlp_ratio=4,
                       trainable_edge_features=8, attention_backend="triton",
                       checkpoint_encoder=pol, checkpoint_processor=pol, checkpoint_decoder=pol)
    model = GraphForecaster(g, mcfg, 100, 100, 2).cuda()
    model = parallelize(model, g, ParallelConfig(), single_process_groups())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n = model.graph.num_data
    x = torch.randn(1, 2, n, 100, device="cuda")
    y = torch.randn(1, n, 100, device="cuda")
    groups = {"head": [*model.norm_out.parameters(), *model.head.parameters()],
              "decoder": list(model.decoder.parameters()),
              **{f"processor {i}": list(b.parameters()) for i, b in enumerate(model.processor)},
              "encoder": list(model.encoder.parameters())}
    left, phases = {}, []

    def record(name):
        torch.cuda.synchronize()
        phases.append((name, torch.cuda.max_memory_allocated() / GIB,
                       torch.cuda.memory_allocated() / GIB))
        torch.cuda.reset_peak_memory_stats()

    def hook(name, p):
        left[name] -= 1
        if left[name] == 0:
            record(f"until {name} gradients")

    for name, ps in groups.items():
        for p in ps:
            p.register_post_accumulate_grad_hook(lambda p, name=name: hook(name, p))

    def step(marks):
        for k, ps in groups.items():
            left[k] = len(ps)
        opt.zero_grad(set_to_none=True)
        if marks:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            phases.clear(); phases.append(("start", 0.0, torch.cuda.memory_allocated() / GIB))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = area_weighted_mse(model(x), y, model.graph.area)
        if marks:
            record("forward (autocast cache held)")
        loss.backward()
        if marks:
            record("rest of backward")
        opt.step()
        if marks:
            record("optimizer")

    for _ in range(2):
        step(False)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    step(True)
    whole = max(p[1] for p in phases)
    res["steps"].append({"graph": "o96_l6", "policy": pol, "peak_GiB": whole,
                         "phases": phases, "params": sum(p.numel() for p in model.parameters())})
    print(pol, f"peak {whole:.3f} GiB", flush=True)
    for ph in phases:
        print(f"  {ph[0]:<40} peak {ph[1]:7.3f}  allocated after {ph[2]:7.3f}", flush=True)
    del model, opt, x, y
    torch.cuda.empty_cache()
(out / "memest.json").write_text(json.dumps(res, indent=1))
print("done", time.time() - t0, "s")
EOF
echo "rc=$?" >> $OUT/memest/log.txt
tail -60 $OUT/memest/log.txt
