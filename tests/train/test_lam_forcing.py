"""A driven limited-area model: the band forced in every state, the loss blind to it."""

import copy

import numpy as np
import pytest
import torch

from squall.data.zarr_dataset import read_info
from squall.tracking import NullLogger
from squall.train.boundary import BoundaryForcing
from squall.train.forecast import ModelStep, Rollout
from squall.train.runner import build_run

# A 1-degree box of 31 x 41 points (the 396 within 3 degrees of the edge are the boundary band)
# under a level-5 mesh, driven by an O16 run of the same generator.
LAM = [
    "graph=lam_alps", "graph.name=lam_tiny", "graph.nodes.data.resolution=1.0",
    "graph.nodes.data.region=[30,60,0,40]", "graph.nodes.data.boundary.width_deg=3.0",
    "graph.nodes.hidden.level=5", "graph.nodes.hidden.region=[30,60,0,40]",
    "graph.edges.encoder.factor=0.7", "data.boundary.grid=O16",
    "data.generator.num_times=40", "data.num_workers=0",
    "data.train.start=0", "data.train.end=29", "data.validation.start=30",
    "data.validation.end=39", "data.test.start=30", "data.test.end=39",
    "model.num_channels=16", "model.num_heads=2", "training.rollout=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def lam_parts(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from tests.train.conftest import CONF

    cache = tmp_path_factory.mktemp("lam")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*LAM, f"paths.cache={cache}"])
    return cfg, build_run(cfg, NullLogger(), device=torch.device("cpu"))


class Recording(torch.nn.Module):
    """The real model, keeping every input it is given and optionally changing the band rows of
    its output (to show the loss cannot see them)."""

    def __init__(self, model, rows=None, shift=0.0):
        super().__init__()
        self.model, self.rows, self.shift = model, rows, shift
        self.inputs = []

    def forward(self, state):
        self.inputs.append(state.detach().clone())
        out = self.model(state)
        if self.rows is not None:
            out = out.index_add(1, self.rows, torch.full_like(out[:, self.rows], self.shift))
        return out


def _driver_reference(cfg, dataset, times, prognostic):
    """The driver's values on the boundary points, interpolated here by brute force (every
    driver point's distance), normalised like the dataset: ``[T, P, V]`` float64."""
    import zarr

    info = read_info(str(cfg.data.boundary.path))
    driver = zarr.open_group(str(cfg.data.boundary.path), mode="r")["data"]
    rows = dataset.boundary.rows
    lat, lon = np.radians(dataset.latitudes[rows]), np.radians(dataset.longitudes[rows])
    dlat, dlon = np.radians(info.latitudes), np.radians(info.longitudes)
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
    dxyz = np.stack([np.cos(dlat) * np.cos(dlon), np.cos(dlat) * np.sin(dlon), np.sin(dlat)], 1)
    chord = np.linalg.norm(xyz[:, None] - dxyz[None], axis=-1)  # [P, N]
    near = np.argsort(chord, axis=1, kind="stable")[:, :4]
    w = 1.0 / np.take_along_axis(chord, near, 1) ** 2
    w /= w.sum(1, keepdims=True)
    var = [info.variables.index(v) for v in prognostic]
    dates = dataset.dates[times]
    idx = [int(np.flatnonzero(info.dates == d)[0]) for d in dates]
    raw = np.stack([driver[t, :, 0][var] for t in idx])  # [T, V, N]
    values = (raw[:, :, near] * w).sum(-1).transpose(0, 2, 1)  # [T, P, V]
    norm = dataset.normaliser.subset(prognostic)
    return (values - norm.offset.double().numpy()) / norm.scale.double().numpy()


def test_samples_carry_the_driver_interpolated_onto_the_band(lam_parts):
    cfg, parts = lam_parts
    data, layout = parts.train_set, parts.layout
    prognostic = [data.variables[layout.inputs[j]] for j in layout.prognostic_in]
    sample = data[5]
    ref = _driver_reference(cfg, data, data.window_times(5), prognostic)
    got = sample["boundary"].double().numpy()
    assert got.shape == (data.input_steps + 3, 396, len(prognostic))
    # float32 values of magnitude ~3 (normalised): a few float32 ulps after the weighted sum
    np.testing.assert_allclose(got, ref, rtol=0, atol=8 * np.finfo(np.float32).eps * 4)


def rollout_inputs(parts, index: int) -> tuple[dict, list[torch.Tensor]]:
    """Training sample ``index`` as a batch of one, and the model inputs of every step of the
    trainer's rollout of it."""
    trainer = parts.trainer
    batch = {k: v[None] if torch.is_tensor(v) else v for k, v in parts.train_set[index].items()}
    net, trainer.net = trainer.net, Recording(parts.model)
    try:
        with torch.no_grad():
            list(trainer.rollout(batch))
        return batch, trainer.net.inputs
    finally:
        trainer.net = net


def test_band_overwritten_every_training_rollout_step_with_the_driver(lam_parts):
    _, parts = lam_parts
    forcing = parts.trainer.boundary
    assert isinstance(forcing, BoundaryForcing)
    batch, seen = rollout_inputs(parts, 3)
    assert len(seen) == 3
    rows, cols = forcing.rows, forcing.columns
    for r, state in enumerate(seen):  # state [1, T_in, G, V_in]
        for t in range(state.shape[1]):
            time = r + t  # position in the window: inputs first, then the rollout's states
            band = state[0, t][rows][:, cols]
            assert torch.equal(band, batch["boundary"][0, time]), (r, t)
        # the interior of a fed-back state is the model's, not the truth
        if r:
            interior = ~torch.as_tensor(forcing.mask)
            truth = batch["y"][0, r - 1][:, parts.layout.inputs][:, parts.layout.prognostic_in]
            assert not torch.equal(state[0, -1][interior][:, cols], truth[interior])


def test_loss_unchanged_when_band_predictions_change(lam_parts):
    _, parts = lam_parts
    trainer, data = parts.trainer, parts.train_set
    batch = {k: v[None] if torch.is_tensor(v) else v for k, v in data[7].items()}
    net = trainer.net
    try:
        losses = []
        for shift in (0.0, 10.0):
            trainer.net = Recording(parts.model, trainer.boundary.rows, shift)
            with torch.no_grad():
                losses.append(trainer.rollout_loss(batch))
        # the same shift on five interior points: the loss sees it
        inside = torch.as_tensor(np.flatnonzero(~trainer.boundary.mask)[:5])
        trainer.net = Recording(parts.model, inside, 10.0)
        with torch.no_grad():
            interior_shift = trainer.rollout_loss(batch)
    finally:
        trainer.net = net
    assert torch.equal(losses[0], losses[1])
    assert interior_shift > losses[0]
    w = trainer.loss_area()
    assert float(w[trainer.boundary.rows].abs().sum()) == 0.0
    assert abs(float(w.mean()) - 1.0) < 1e-6


def test_forecast_rollout_forces_the_band_at_every_lead_time(lam_parts):
    _, parts = lam_parts
    data = parts.val_set
    sample = data[0]
    forcing = BoundaryForcing.for_dataset(data, parts.layout, torch.device("cpu"))
    recorder = Recording(parts.model)
    area = torch.from_numpy(parts.graph.nodes["data"].area.astype(np.float32))
    roll = Rollout(recorder, parts.layout, area, None,
                   ModelStep(recorder, torch.device("cpu"), None, False))  # fmt: skip
    roll.boundary = forcing
    roll.run(sample["x"][None], sample["y"][None], None, 1, sample["boundary"])
    assert len(recorder.inputs) == 3
    for s, state in enumerate(recorder.inputs):
        for t in range(state.shape[1]):
            band = state[0, t][forcing.rows][:, forcing.columns]
            assert torch.equal(band, sample["boundary"][s + t]), (s, t)


@pytest.mark.slow
def test_forecast_job_scores_the_interior_forced_and_unforced(lam_parts, tmp_path):
    from omegaconf import open_dict

    from squall.train.forecast import forecast

    cfg, parts = lam_parts
    with open_dict(cfg):
        cfg.training.run_dir = str(tmp_path / "run")
        cfg.training.max_steps = 3
        cfg.tracking.enabled = False
        cfg.forecast.steps = 3
        cfg.forecast.max_starts = 2
        cfg.forecast.checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    parts = build_run(cfg, NullLogger(), device=torch.device("cpu"))
    from squall.train.runner import train_loader_factory

    parts.trainer.fit(train_loader_factory(parts, cfg))
    result = forecast(cfg)
    assert result["boundary_points"] == 396 and result["forced"]
    forced, free = np.array(result["rmse_model"]), np.array(result["rmse_model_unforced"])
    assert forced.shape == free.shape == (3,)
    # the first step differs only by the driver's interpolation on the band: the rollouts part
    # afterwards, when the free one feeds back its own band
    assert not np.array_equal(forced[1:], free[1:])


def test_each_step_sees_the_driver_band_at_the_time_it_predicts(lam_parts):
    _, parts = lam_parts
    trainer, data, layout = parts.trainer, parts.train_set, parts.layout
    forcing = trainer.boundary
    v_in, v_prog = len(layout.inputs), len(layout.prognostic_in)
    assert forcing.lookahead and forcing.extra_inputs == v_prog + 1
    node_dim = parts.model.graph.data_attrs.shape[1]
    assert parts.model.embed_data.in_features == data.input_steps * (v_in + v_prog + 1) + node_dim
    batch, seen = rollout_inputs(parts, 4)
    interior = torch.as_tensor(~forcing.mask)
    for r, state in enumerate(seen):
        for t in range(state.shape[1]):
            extra = state[0, t, :, v_in:]
            # the driver one step after this state's time, and the boundary flag
            assert torch.equal(extra[forcing.rows, :v_prog], batch["boundary"][0, r + t + 1])
            assert bool((extra[forcing.rows, v_prog] == 1).all())
            assert not bool(extra[interior].any()), (r, t)


def test_free_rollout_gets_its_own_band_as_lookahead(lam_parts):
    _, parts = lam_parts
    data, layout = parts.val_set, parts.layout
    forced = BoundaryForcing.for_dataset(data, layout, torch.device("cpu"))
    free = forced.unforced()
    assert forced.forced and not free.forced and free.extra_inputs == forced.extra_inputs
    sample = data[1]
    recorder = Recording(parts.model)
    area = torch.from_numpy(parts.graph.nodes["data"].area.astype(np.float32))
    roll = Rollout(recorder, layout, area, None,
                   ModelStep(recorder, torch.device("cpu"), None, False))  # fmt: skip
    roll.boundary = free
    roll.run(sample["x"][None], sample["y"][None], None, 1, sample["boundary"])
    v_in, rows, cols = len(layout.inputs), free.rows, free.columns
    x0 = sample["x"][:, :, layout.inputs]  # the dataset's own inputs, nothing forced
    for t in range(data.input_steps):
        state = recorder.inputs[0][0, t]
        assert torch.equal(state[:, :v_in], x0[t])
        assert torch.equal(state[rows, v_in:-1], x0[t][rows][:, cols])
    # later states: the band is the model's own prediction, repeated as the lookahead
    last = recorder.inputs[-1][0, -1]
    assert torch.equal(last[rows, v_in:-1], last[rows][:, cols])
    assert not torch.equal(last[rows][:, cols], sample["boundary"][data.input_steps + 1])


def test_without_lookahead_states_keep_the_dataset_columns():
    g, v_in, rows, cols = 12, 5, [0, 1, 11], [0, 2]
    mask = np.zeros(g, dtype=bool)
    mask[rows] = True
    state = torch.randn(2, 2, g, v_in)
    batch = {"boundary": torch.randn(2, 4, len(rows), len(cols))}
    plain = BoundaryForcing(rows, cols, mask, 2, torch.device("cpu"), lookahead=False)
    ahead = BoundaryForcing(rows, cols, mask, 2, torch.device("cpu"))
    a, b = plain.force_inputs(state, batch), ahead.force_inputs(state, batch)
    assert a.shape == state.shape and b.shape == (2, 2, g, v_in + len(cols) + 1)
    assert torch.equal(b[..., :v_in], a)  # the same forcing, then the extra columns
    assert torch.equal(b[:, 1, rows, v_in:-1], batch["boundary"][:, 2])
    nxt = plain.force_next(state[:, 0], batch, 2)  # the second prediction's time: position 3
    assert torch.equal(nxt[:, rows][..., cols], batch["boundary"][:, 3])
    assert torch.equal(nxt[:, 2:11], state[:, 0, 2:11])


def test_interior_next_to_the_band_sees_the_band_inputs(lam_parts):
    # the band's values reach the interior through encoder, processor and decoder: a model can
    # use the forcing only if this path exists (the trained tiny models barely do:
    # profiling/lam_sensitivity.py)
    _, parts = lam_parts
    data, forcing = parts.train_set, parts.trainer.boundary
    model = copy.deepcopy(parts.model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.1)  # zero at initialisation: the output is persistence
    batch = {k: v[None] if torch.is_tensor(v) else v for k, v in data[2].items()}
    x = batch["x"].index_select(-1, parts.trainer.inputs)
    state = forcing.force_inputs(x, batch)
    shifted = state.clone()
    shifted[:, :, forcing.rows] += 1.0
    with torch.no_grad():
        change = (model(shifted) - model(state)).abs()[0].amax(-1).numpy()
    lat, lon = data.latitudes, data.longitudes
    # the interior's first ring: 3 degrees (the band's width) from the region's edge, 1-degree grid
    edge = np.minimum(np.minimum(lat - 30, 60 - lat), np.minimum(lon, 40 - lon))
    ring = ~forcing.mask & (edge == 3)
    assert ring.sum() > 0
    # fp32 forward of O(1) outputs: changes below 1e3 ulps would be rounding
    assert change[ring].min() > 1e3 * np.finfo(np.float32).eps, change[ring].min()
