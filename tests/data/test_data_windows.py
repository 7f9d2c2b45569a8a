"""Windows, normalisation, grid subsets and the DataLoader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from squall.data.normalise import Normaliser, area_weights_from_latitudes
from squall.data.zarr_dataset import DatasetWriter, WindowDataset, make_dataloader
from squall.errors import DataError
from squall.graphs.grids import latlon_grid, octahedral_gaussian

VARS = ["msl", "z_500", "lsm", "insolation"]  # any order, a subset


def _raw(path):
    g = zarr.open_group(str(path), mode="r")
    return g["data"][:, :, 0], list(g.attrs["variables"])


def test_windows_match_raw_data(small_dataset):
    path, _ = small_dataset
    raw, names = _raw(path)
    vi = [names.index(v) for v in VARS]
    ds = WindowDataset(path, VARS, input_steps=3, rollout=2, start=10, end=45, timestep="12h")
    # Times 10..45 at stride 2: windows span (3 - 1 + 2) * 2 + 1 = 9 times -> 36 - 9 + 1 = 28.
    assert len(ds) == 28
    for k in (0, 13, len(ds) - 1):
        sample = ds[k]
        t = 10 + 2 * 2 + k  # last input time
        assert sample["index"] == t
        assert sample["x"].shape == (3, raw.shape[-1], len(VARS))
        assert sample["y"].shape == (2, raw.shape[-1], len(VARS))
        assert sample["x"].dtype == torch.float32
        x = ds.normaliser.denormalise(sample["x"]).numpy()
        y = ds.normaliser.denormalise(sample["y"]).numpy()
        expect_x = raw[[t - 4, t - 2, t]][:, vi].transpose(0, 2, 1)
        expect_y = raw[[t + 2, t + 4]][:, vi].transpose(0, 2, 1)
        np.testing.assert_allclose(x, expect_x, rtol=1e-6, atol=1e-6 * np.abs(expect_x).max())
        np.testing.assert_allclose(y, expect_y, rtol=1e-6, atol=1e-6 * np.abs(expect_y).max())
    assert ds.window_times(len(ds) - 1)[-1] == 45
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_normalised_statistics_and_metadata(small_dataset, grid):
    path, _ = small_dataset
    ds = WindowDataset(path, ["z_500", "u_850"], input_steps=1, rollout=0)
    x = torch.stack([ds[k]["x"][0] for k in range(len(ds))])  # every time once
    # Over the whole dataset, mean-std normalised variables have mean 0 and stdev 1.
    np.testing.assert_allclose(x.mean(dim=(0, 1)).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(dim=(0, 1), unbiased=False).numpy(), 1.0, atol=1e-4)
    assert ds.variables == ("z_500", "u_850")
    assert set(ds.statistics) == {"mean", "stdev", "minimum", "maximum"}
    np.testing.assert_allclose(ds.latitudes, np.degrees(grid.latlon[:, 0]))
    np.testing.assert_allclose(ds.area_weights, grid.area)
    assert str(ds.dates[0]) == "2020-01-01T00:00:00"


def test_date_range_selects_inclusive_times(small_dataset):
    path, _ = small_dataset
    ds = WindowDataset(path, ["msl"], 2, 1, start="2020-01-02T00:00", end="2020-01-05T00:00")
    assert (ds.first, ds.last) == (4, 16)
    assert len(ds) == 13 - 2
    assert ds.dates[ds.window_times(0)[0]] == np.datetime64("2020-01-02T00:00")


def test_grid_indices_subset(small_dataset):
    path, _ = small_dataset
    rows = np.array([5, 900, 3, 1599, 77])
    full = WindowDataset(path, VARS, 2, 1)
    part = WindowDataset(path, VARS, 2, 1, grid_indices=rows)
    a, b = full[7], part[7]
    torch.testing.assert_close(b["x"], a["x"][:, rows], rtol=0, atol=0)
    torch.testing.assert_close(b["y"], a["y"][:, rows], rtol=0, atol=0)
    np.testing.assert_array_equal(part.latitudes, full.latitudes[rows])
    np.testing.assert_array_equal(part.area_weights, full.area_weights[rows])


def test_dataloader_with_workers(small_dataset):
    path, _ = small_dataset
    ds = WindowDataset(path, VARS, 2, 2)
    loader = make_dataloader(ds, batch_size=4, shuffle=True, num_workers=2, seed=11)
    seen = []
    for batch in loader:
        assert batch["x"].shape[1:] == (2, 1600, len(VARS))
        for i, t in enumerate(batch["index"].tolist()):
            direct = ds[t - ds.first - (ds.input_steps - 1)]
            torch.testing.assert_close(batch["x"][i], direct["x"], rtol=0, atol=0)
            torch.testing.assert_close(batch["y"][i], direct["y"], rtol=0, atol=0)
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(1, 1 + len(ds)))
    again = [b["index"].tolist() for b in make_dataloader(ds, 4, True, 0, seed=11)]
    assert sum(again, []) == seen  # same seed, same order, workers or not


def test_dataset_pickles_without_open_store(small_dataset):
    path, _ = small_dataset
    ds = WindowDataset(path, VARS, 1, 1)
    first = ds[0]
    assert ds._data is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None
    torch.testing.assert_close(clone[0]["x"], first["x"])


def _write(path, data, names, lat, lon):
    dates = np.datetime64("2022-06-01") + np.arange(len(data)) * np.timedelta64(6, "h")
    with DatasetWriter(path, names, dates, "6h", lat, lon) as w:
        w.write(0, data)
    return path


def test_constant_fields_and_normaliser_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    lat = np.repeat([60.0, 0.0, -60.0], 4)
    lon = np.tile([0.0, 90.0, 180.0, 270.0], 3)
    data = np.stack([np.full((10, 12), 5.0), rng.normal(3.0, 2.0, (10, 12)),
                     rng.uniform(0, 1, (10, 12))], axis=1)[:, :, None]  # fmt: skip
    path = _write(tmp_path / "c.zarr", data.astype("f4"), ["const", "b", "c"], lat, lon)
    ds = WindowDataset(path, None, 1, 1, normalisation={"min-max": ["c"], "none": []})
    s = ds[3]
    assert torch.isfinite(s["x"]).all()
    assert torch.all(s["x"][..., 0] == 0)  # constant: shifted to 0, not divided by 0
    assert 0 <= s["x"][..., 2].min() and s["x"][..., 2].max() <= 1
    x = torch.randn(2, 12, 3)
    torch.testing.assert_close(ds.normaliser.denormalise(ds.normaliser.normalise(x)), x)
    sub = ds.normaliser.subset(["c", "b"])
    torch.testing.assert_close(
        sub.normalise(x[..., [2, 1]]), ds.normaliser.normalise(x)[..., [2, 1]]
    )
    # No stored area weights: derived from the latitudes (equal bands, 4 points each).
    np.testing.assert_allclose(ds.area_weights, area_weights_from_latitudes(lat))


@pytest.mark.parametrize("nodes", [octahedral_gaussian(12), latlon_grid(7.5)])
def test_area_weights_from_latitudes_match_grid(nodes):
    lat = np.degrees(nodes.latlon[:, 0])
    w = area_weights_from_latitudes(lat)
    np.testing.assert_allclose(w.mean(), 1.0)
    # Away from the outermost rows (whose band edge is the pole, where grids follow their own
    # conventions) the bands between mid-latitudes are proportional to the grid's weights to 0.1 %.
    inner = np.abs(lat) < np.abs(lat).max() - 1e-9
    ratio = w[inner] / nodes.area[inner]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-3)


def test_normaliser_state_dict_round_trip():
    n = Normaliser(["a", "b"], [1.0, 2.0], [3.0, 4.0])
    m = Normaliser(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    m.load_state_dict(n.state_dict())
    x = torch.tensor([[4.0, 6.0]])
    torch.testing.assert_close(m.normalise(x), torch.tensor([[1.0, 1.0]]))


def test_sampler_shares_epochs_drops_the_tail_and_resumes_at_any_sample():
    from itertools import islice

    from squall.data.sampler import ResumableSampler

    n, replicas = 10, 3
    streams = [list(islice(ResumableSampler(n, seed=3, rank=r, replicas=replicas), 9))
               for r in range(replicas)]  # fmt: skip
    for epoch in range(3):  # 3 samples per replica and epoch (10 // 3)
        shares = [s[3 * epoch : 3 * epoch + 3] for s in streams]
        seen = sum(shares, [])
        assert len(seen) == len(set(seen)) == 9, "replicas never overlap, no sample twice"
        assert set(seen) < set(range(n))  # one sample of each epoch left out: the tail
    firsts = [sorted(sum((s[3 * e : 3 * e + 3] for s in streams), [])) for e in range(3)]
    assert len({tuple(f) for f in firsts}) > 1, "each epoch draws a new order"
    # Resuming after k samples gives exactly the rest of the uninterrupted stream.
    whole = list(islice(ResumableSampler(n, seed=3, rank=1, replicas=replicas), 12))
    for k in (0, 1, 3, 7):
        resumed = list(islice(ResumableSampler(n, 3, samples_seen=k, rank=1, replicas=3), 12 - k))
        assert resumed == whole[k:]
    # One replica reads every sample once per epoch, nothing dropped.
    one = list(islice(ResumableSampler(n, seed=3), 2 * n))
    assert sorted(one[:n]) == sorted(one[n:]) == list(range(n)) and one[:n] != one[n:]
    with pytest.raises(DataError, match="2 samples cannot feed 3 data-parallel replicas"):
        ResumableSampler(2, seed=0, rank=0, replicas=3)


def test_normalisation_methods():
    stats = {"mean": np.array([2.0, 2.0, 2.0, 2.0, 2.0]), "stdev": np.array([4.0] * 5),
             "minimum": np.array([-1.0] * 5), "maximum": np.array([9.0] * 5)}  # fmt: skip
    names = ["a", "b", "c", "d", "e"]
    methods = {"default": "mean-std", "std": ["b"], "min-max": ["c"], "max": ["d"], "none": ["e"]}
    n = Normaliser.from_statistics(names, stats, methods)
    x = torch.full((1, 5), 9.0)
    torch.testing.assert_close(n.normalise(x), torch.tensor([[1.75, 2.25, 1.0, 1.0, 9.0]]))
    with pytest.raises(DataError, match="unknown"):
        Normaliser.from_statistics(names, stats, {"log": ["a"]})
