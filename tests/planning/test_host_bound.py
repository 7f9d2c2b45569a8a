"""The host term of the scaling model (squall.planning.scaling.HostTimes): a step's phase takes
at least the host's time to launch it; the host times are read from a profile_launch run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from squall.errors import ConfigError
from squall.models.forecaster import ModelConfig
from squall.planning.scaling import (
    Calibration,
    ClusterSpec,
    HostTimes,
    ScalingModel,
    calibrate,
    load_calibration,
    load_host_times,
)

MCFG = ModelConfig(num_channels=64, num_heads=4, processor_layers=3, mlp_ratio=4,
                   trainable_edge_features=8)  # fmt: skip
CLUSTER = ClusterSpec(name="test", gpus_per_node=4, memory_gib=80.0, nvlink_Bps=400e9,
                      network_Bps=40e9, exchange_latency_s=150e-6, peer_latency_s=70e-6,
                      collective_latency_s=20e-6, hbm_Bps=3e12)  # fmt: skip
STEP_S = 0.050


def model_on(graph, host=None) -> ScalingModel:
    cal = Calibration("test", "gpu", graph.name, MCFG, 1, STEP_S, num_vars=(5, 4), host=host)
    return ScalingModel(graph, MCFG, calibrate(cal, graph, CLUSTER.hbm_Bps), CLUSTER,
                        num_vars=(5, 4))  # fmt: skip


def test_a_host_faster_than_the_device_changes_nothing(small_graph):
    fast = HostTimes(0.001, 0.002, 5, 1000, 300, 4.0, 0.0, "test")
    plain, hosted = model_on(small_graph), model_on(small_graph, fast)
    for gpus in (1, 2, 4):
        a, b = plain.project(gpus, gpus, 1), hosted.project(gpus, gpus, 1)
        assert b.host_s == 0 and b.step_s == a.step_s


def test_the_host_time_is_a_floor_that_model_parallelism_does_not_divide(small_graph):
    """Host phases of 12 and 24 ms against a 50 ms device step: one GPU stays device-bound; at
    4 and 8 ranks the step is the host's time plus its exchanges, never less, while the
    device-only model keeps falling."""
    host = HostTimes(0.012, 0.024, MCFG.processor_layers + 2, 3000, 1000, 5.0, 0.0, "test")
    plain, hosted = model_on(small_graph), model_on(small_graph, host)
    assert hosted.project(1, 1, 1).step_s == pytest.approx(STEP_S, rel=1e-9)
    for gpus in (4, 8):
        p, q = hosted.project(gpus, gpus, 1), plain.project(gpus, gpus, 1)
        assert p.host_s > 0 and p.step_s > q.step_s
        floor = host.forward_s + host.backward_s
        assert p.step_s >= floor + p.grad_s + p.optimizer_s
    assert hosted.project(8, 8, 1).step_s > 0.9 * hosted.project(4, 4, 1).step_s
    # a deeper model launches more: its host time scales with the block count
    deep = replace(MCFG, processor_layers=6)
    cal = Calibration("test", "gpu", small_graph.name, MCFG, 1, STEP_S, num_vars=(5, 4),
                      host=host)  # fmt: skip
    deeper = ScalingModel(small_graph, deep, calibrate(cal, small_graph, CLUSTER.hbm_Bps),
                          CLUSTER, num_vars=(5, 4))  # fmt: skip
    assert deeper.project(8, 8, 1).host_s > hosted.project(8, 8, 1).host_s


def _launch_run(tmp_path, gpus, launches):
    rank = {"real": {"step_s": 0.05, "forward": 0.012, "loss": 0.0004, "backward": 0.036,
                     "optimizer": 0.0016, "host_forward": 0.01, "host_loss": 0.0005,
                     "host_backward": 0.02, "host_optimizer": 0.001},
            "trace": {"real": {"launches": {"forward": 1000, "loss": 0,
                                            "backward": launches - 1000,
                                            "optimizer": 0, "other": 0}}},
            "peak_GiB": 1.5}  # fmt: skip
    small = {"trace": {"real": {"busy_union_s": 0.03, "kernels": 3000}}}
    run = {"info": {"git": "abc1234", "gpu": "GPU"}, "gpus": gpus, "channels": 64, "heads": 4,
           "layers": 3, "backend": "torch", "checkpoint": True, "compile": False, "batch": 1,
           "graphs": {"o16_l3": [rank] * gpus, "tiny": [small] * gpus}}  # fmt: skip
    path = tmp_path / f"launch_{gpus}.json"
    path.write_text(json.dumps(run))
    return path


def test_host_times_from_a_profile_launch_run(tmp_path):
    one = _launch_run(tmp_path, 1, 3000)
    host = load_host_times(one)
    assert host.forward_s == pytest.approx(0.0105) and host.backward_s == pytest.approx(0.021)
    assert host.blocks == 5 and host.launches == 3000 and host.forward_launches == 1000
    assert host.per_launch_s == pytest.approx(0.0315 / 3000)
    assert host.kernel_s == pytest.approx(1e-5)
    # the two-rank run beside it counts the launches each exchange adds: 2 x 5 exchanges
    _launch_run(tmp_path, 2, 3000 + 10 * 6)
    assert load_host_times(one).exchange_launches == pytest.approx(6.0)
    cal = load_calibration(str(one))
    assert cal.graph == "o16_l3" and cal.step_s == 0.05 and cal.host.launches == 3000
    assert cal.mcfg.processor_layers == 3 and cal.fixed_s == pytest.approx(0.0004)
    with pytest.raises(ConfigError, match="a one-GPU profile_launch run is needed"):
        load_host_times(tmp_path / "launch_2.json")
    with pytest.raises(ConfigError, match="host times: no file"):
        load_host_times(tmp_path / "nothing.json")


def test_each_kernel_keeps_its_least_device_time_on_any_share(small_graph):
    """3,000 kernels of at least 2 us each: 6 ms of the 50 ms step do not shrink with the rank's
    share, so 8 ranks take longer than without that floor but never less than it; a floor as
    long as the step is one clear error."""
    floor = HostTimes(0.001, 0.002, MCFG.processor_layers + 2, 3000, 1000, 5.0, 2e-6, "test")
    plain, floored = model_on(small_graph), model_on(small_graph, floor)
    assert floored.project(1, 1, 1).step_s == pytest.approx(STEP_S, rel=1e-9)
    p, q = floored.project(8, 8, 1), plain.project(8, 8, 1)
    assert p.compute_s > q.compute_s and p.compute_s >= 3000 * 2e-6
    with pytest.raises(ConfigError, match="least time .* is not below the step"):
        model_on(small_graph, replace(floor, kernel_s=STEP_S / 3000))
