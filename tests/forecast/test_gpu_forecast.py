"""GPU only (skipped without CUDA), and without MLflow so that they run on a bare GPU machine: the
captured rollout equals the eager one, fields reach the store while the next step overwrites the
buffer they came from, the profile writes a memory snapshot, and an out-of-memory names its
snapshot."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from squall.data.normalise import Normaliser
from squall.train.forecast_store import FieldWriter, create_store

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------
# The captured step against the eager one


def _gpu_rollout(cuda_graphs: bool, dtype, x, y):
    """A 4-step rollout of a small random model on the GPU; the fields of every step."""
    from squall.graphs import build_graph
    from squall.models.forecaster import GraphForecaster, ModelConfig
    from squall.train.forecast import ModelStep, Rollout
    from squall.train.loop import VariableLayout

    spec = {"name": "o8_l2", "nodes": {"data": {"type": "grid", "grid": "O8"},
                                       "hidden": {"type": "icosahedral", "level": 2}},
            "edges": {"encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
                      "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
                      "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3}}}  # fmt: skip
    graph = build_graph(spec)
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=32, num_heads=4, processor_layers=2, attention_backend="triton")
    model = GraphForecaster(graph, cfg, 5, 5, 2, [(i, i) for i in range(5)]).to(device).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    step = ModelStep(model, device, dtype, cuda_graphs)
    layout = VariableLayout([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2])
    area = torch.from_numpy(graph.nodes["data"].area.astype(np.float32)).to(device)
    roll = Rollout(model, layout, area, None, step)
    fields = []
    for _ in range(2):  # the second rollout replays the graph captured in the first
        fields = []
        roll.run(x, y, lambda s, f, out=fields: out.append(f.float().clone()))
    return torch.stack(fields), step


@gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_captured_rollout_equals_the_eager_one(dtype):
    """Replaying the captured step runs the eager step's kernels: it may differ from the eager
    rollout by no more than two eager rollouts differ from each other (atomics)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 2, 544, 5, generator=gen), torch.randn(1, 4, 544, 5, generator=gen)
    eager, _ = _gpu_rollout(False, dtype, x, y)
    again, _ = _gpu_rollout(False, dtype, x, y)
    captured, step = _gpu_rollout(True, dtype, x, y)
    assert step.graph is not None, "the step was not captured (see the warning in the log)"
    noise = (again - eager).abs().max().item()
    assert (captured - eager).abs().max().item() <= 2 * noise


# ----------------------------------------------------------------------------------------------
# The writer's device side: staged on the compute stream, copied on its own


@gpu
def test_gpu_fields_are_stored_although_the_next_step_overwrites_their_buffer(tmp_path):
    """The rollout hands over a CUDA graph's output buffer and overwrites it at the next replay;
    the writer's copy must be the field as it was when handed over (bf16, as under autocast)."""
    device = torch.device("cuda")
    grid, names, steps = 200_003, [f"v{i}" for i in range(7)], 6
    norm = Normaliser(names, np.linspace(-5, 5, 7), np.linspace(0.5, 4, 7))
    path = tmp_path / "fc.zarr"
    create_store(path, (1, steps, len(names), grid), {"variables": names})
    writer = FieldWriter(path, device, norm, queue_size=2)
    static = torch.empty(grid, len(names), dtype=torch.bfloat16, device=device)

    def field(s):
        gen = torch.Generator(device).manual_seed(s)
        return torch.randn(grid, len(names), generator=gen, device=device)

    for s in range(steps):
        static.copy_(field(s))  # the "replay" writes the buffer...
        writer.put(0, s, static)  # ...the writer takes it, and the next replay comes at once
    writer.close()
    stored = zarr.open_group(str(path), mode="r")["data"][0]
    for s in range(steps):  # the normaliser's x * scale + offset, bitwise on either device
        expected = norm.denormalise(field(s).to(torch.bfloat16).float().cpu()).numpy().T
        assert np.array_equal(stored[s], expected), f"step {s}"


# ----------------------------------------------------------------------------------------------
# Memory snapshots (the profile job with tracking off needs no MLflow)

# O8 grid and a level-2 mesh: a step in milliseconds.
TINY = ["graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
        "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
        "data.train.start=0", "data.train.end=39", "data.validation.start=40",
        "data.validation.end=59", "model.num_channels=16", "model.num_heads=2",
        "profile.warmup_steps=0", "profile.steps=1", "tracking.enabled=false"]  # fmt: skip


@gpu
def test_gpu_profile_writes_a_memory_snapshot_and_kernel_rates(tmp_path):
    from hydra import compose, initialize_config_dir

    from squall import schema
    from squall.profiler import profile_job

    schema.register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("profile", overrides=[*TINY, f"paths.cache={tmp_path}",
                                            f"profile.output={tmp_path}/profile"])  # fmt: skip
    result = profile_job(cfg)
    folder = tmp_path / "profile" / "rank0"
    assert (folder / "memory_snapshot.pickle") == result["files"]["memory_snapshot"]
    snapshot = pickle.loads((folder / "memory_snapshot.pickle").read_bytes())
    assert snapshot["segments"] and any(snapshot["device_traces"])  # allocations were recorded
    with open(folder / "kernels.csv") as fh:
        kernels = list(csv.DictReader(fh))
    assert any(k["tflops"] for k in kernels), "no matrix-product kernel with a FLOP rate"
    assert result["peak_allocated_GiB"] > 0


@gpu
def test_gpu_out_of_memory_names_its_snapshot(tmp_path):
    from squall.profiler import ProfileOOM, profile_steps

    device = torch.device("cuda")
    too_much = 2 * torch.cuda.get_device_properties(device).total_memory

    def step():
        torch.empty(too_much, dtype=torch.uint8, device=device)

    with pytest.raises(ProfileOOM) as err:
        profile_steps(step, tmp_path, device, warmup=0, steps=1)
    snapshot = tmp_path / "memory_snapshot.pickle"
    assert str(err.value).startswith(f"out of memory during the profiled steps on {device} (")
    assert f"memory snapshot {snapshot} (open it at https://pytorch.org/memory_viz)" in str(
        err.value
    )
    assert snapshot.stat().st_size > 0
