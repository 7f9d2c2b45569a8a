"""The benchmark model and its training step, shared by bench_step.py and profile_step.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from squall.graphs import build_graph
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups
from squall.planning.estimate import estimate

ROOT = Path(__file__).resolve().parents[1]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model size flags: defaults are the o96-class model (1024 ch x 16 layers x 16 heads)."""
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vars", type=int, default=100)
    p.add_argument("--edge-features", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile every block")


def load_graph(name: str):
    return build_graph(yaml.safe_load((ROOT / "conf" / "graph" / f"{name}.yaml").read_text()))


def model_config(graph, args, backend: str, checkpoint: str) -> ModelConfig:
    """``checkpoint``: ``off`` | ``on`` (every block ``full``) | a policy for every block
    (``none``, ``mlp``, ``full``) | ``budget:<GiB>`` (policies chosen by the dry-run estimate)."""
    policy = {"off": "none", "on": "full"}.get(checkpoint, checkpoint)
    budget = float(policy.split(":")[1]) if policy.startswith("budget:") else None
    policy = "none" if budget is not None else policy
    cfg = ModelConfig(
        num_channels=args.channels, num_heads=args.heads, processor_layers=args.layers,
        mlp_ratio=4, trainable_edge_features=args.edge_features, attention_backend=backend,
        checkpoint_encoder=policy, checkpoint_processor=policy, checkpoint_decoder=policy,
        checkpoint_budget_gib=budget, compile=args.compile,
    )  # fmt: skip
    if budget is not None:
        *_, cfg = estimate(graph, cfg, ParallelConfig(), 1, 1, (args.vars, args.vars))
    return cfg


def make_step(graph, args, backend: str, checkpoint: str):
    """Model on the GPU run as a training run runs it on one GPU (checkpoint policies and compile
    applied by ``parallelize``), random normalised inputs (never zeros) and a closure doing one
    step: forward in bf16 autocast, MSE, backward, fused AdamW."""
    cfg = model_config(graph, args, backend, checkpoint)
    torch.manual_seed(0)
    v = args.vars
    model = GraphForecaster(graph, cfg, v, v, 2, [(i, i) for i in range(v)]).cuda()
    parallelize(model, graph, ParallelConfig(), single_process_groups())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(1, 2, model.graph.num_data, v, device="cuda")
    y = torch.randn(1, model.graph.num_data, v, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()

    return model, step


def make_processor_step(model):
    """Forward + backward of the processor alone on random mesh features (bf16 autocast), each
    layer through the model's block runner (its checkpoint policy applies)."""
    gi = model.graph
    x = torch.randn(1, gi.num_mesh, model.cfg.num_channels, device="cuda", requires_grad=True)
    edge_attr = model.edge_inputs("processor")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = x
            for layer in model.processor:
                z = model.runner(gi, "processor", layer, z, z, edge_attr)
            loss = z.float().square().mean()
        loss.backward()

    return step


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 matrix rate on random data, the ceiling for the model's matrix products."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
