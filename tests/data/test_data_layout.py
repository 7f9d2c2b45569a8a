"""On-disk layout, statistics and the generator's determinism and physics."""

from __future__ import annotations

import numpy as np
import zarr

from squall.data.synthetic import (
    DEFAULT_VARIABLES,
    Blobs,
    Synthetic,
    SyntheticSettings,
    angular_velocity,
    blob_field,
    generate,
)
from squall.data.zarr_dataset import DatasetWriter, read_info
from squall.graphs.grids import point_set, select


def test_layout_and_attributes(small_dataset, grid):
    path, settings = small_dataset
    g = zarr.open_group(str(path), mode="r")
    assert g.metadata.zarr_format == 2
    data = g["data"]
    n_var = len(DEFAULT_VARIABLES)
    assert data.shape == (60, n_var, 1, len(grid))
    assert data.chunks == (1, n_var, 1, len(grid))
    assert data.dtype == np.float32
    dates = g["dates"][:]
    assert dates.dtype == np.dtype("datetime64[s]")
    assert np.all(np.diff(dates) == np.timedelta64(6, "h"))
    assert str(dates[0]) == "2020-01-01T00:00:00"
    np.testing.assert_allclose(g["latitudes"][:], np.degrees(grid.latlon[:, 0]))
    np.testing.assert_allclose(g["longitudes"][:], np.degrees(grid.latlon[:, 1]))
    np.testing.assert_allclose(g["area_weights"][:], grid.area)
    attrs = dict(g.attrs)
    assert attrs["variables"] == list(DEFAULT_VARIABLES)
    assert attrs["name_to_index"]["msl"] == DEFAULT_VARIABLES.index("msl")
    assert attrs["start_date"] == "2020-01-01T00:00:00"
    assert attrs["end_date"] == str(dates[-1])
    assert attrs["frequency"] == "6h"
    assert attrs["resolution"] == "O16"
    assert attrs["ensemble_dimension"] == 2
    assert attrs["format_version"] == 1
    assert attrs["synthetic"]["seed"] == settings.seed
    assert np.isfinite(data[:]).all()
    # No temporary store is left next to the dataset.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_statistics_equal_numpy(small_dataset):
    path, _ = small_dataset
    g = zarr.open_group(str(path), mode="r")
    x = g["data"][:].astype(np.float64).transpose(1, 0, 2, 3).reshape(len(g.attrs["variables"]), -1)
    np.testing.assert_allclose(g["mean"][:], x.mean(1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(g["stdev"][:], x.std(1), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(g["minimum"][:], x.min(1))
    np.testing.assert_array_equal(g["maximum"][:], x.max(1))


def test_writer_statistics_over_uneven_blocks(tmp_path):
    rng = np.random.default_rng(0)
    # A pressure-like variable (large mean, small spread) checks the shifted sums.
    data = rng.normal([[1e5], [0.0]], [[30.0], [1.0]], size=(7, 2, 50))[:, :, None].astype("f4")
    lat = np.linspace(-80, 80, 50)
    dates = np.datetime64("2021-01-01") + np.arange(7) * np.timedelta64(1, "h")
    with DatasetWriter(tmp_path / "d.zarr", ["p", "q"], dates, "1h", lat, lat * 0) as w:
        w.write(0, data[:3])
        w.write(3, data[3:])
    info = read_info(tmp_path / "d.zarr")
    x = data.astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(info.statistics["mean"], x.mean(1), rtol=1e-12)
    np.testing.assert_allclose(info.statistics["stdev"], x.std(1), rtol=1e-7)


def test_deterministic_from_seed(tmp_path, grid):
    s = SyntheticSettings(num_times=8, seed=5)
    a = generate(tmp_path / "a.zarr", grid, s)
    b = generate(tmp_path / "b.zarr", grid, s)
    c = generate(tmp_path / "c.zarr", grid, SyntheticSettings(num_times=8, seed=6))
    da, db, dc = (zarr.open_group(str(p), mode="r")["data"][:] for p in (a, b, c))
    np.testing.assert_array_equal(da, db)
    z500 = DEFAULT_VARIABLES.index("z_500")
    assert np.abs(da[:, z500] - dc[:, z500]).max() > 100.0  # m^2/s^2, ~10 gpm


def test_fields_are_pointwise(grid):
    """Any subset of points sees exactly the full grid's values there (grid-independent planet)."""
    s = SyntheticSettings(num_times=6, seed=2)
    mask = np.zeros(len(grid), dtype=bool)
    mask[::7] = True
    full = Synthetic(grid, s).fields(np.arange(6))
    part = Synthetic(select(grid, mask), s).fields(np.arange(6))
    for name in s.variables:
        np.testing.assert_allclose(part[name], full[name][:, mask], rtol=1e-12, atol=1e-9)


def test_blob_derivatives_match_finite_differences():
    s = SyntheticSettings()
    rng = np.random.default_rng(0)
    blobs = Blobs.sample(rng, 8, 10 * 86400.0, s, 1.0, storm_track=True)
    lat = np.radians(rng.uniform(-80, 80, 200))
    lon = np.radians(rng.uniform(0, 360, 200))
    t = np.array([3 * 86400.0, 7 * 86400.0])
    _, d_lat, d_lon = blob_field(blobs, t, lat, lon, s, derivatives=True)
    h = 1e-6
    fd_lat = (
        blob_field(blobs, t, lat + h, lon, s)[0] - blob_field(blobs, t, lat - h, lon, s)[0]
    ) / (2 * h)
    fd_lon = (
        blob_field(blobs, t, lat, lon + h, s)[0] - blob_field(blobs, t, lat, lon - h, s)[0]
    ) / (2 * h)
    scale = np.abs(d_lat).max()
    assert scale > 0.1
    np.testing.assert_allclose(d_lat, fd_lat, atol=1e-6 * scale)
    np.testing.assert_allclose(d_lon, fd_lon, atol=1e-6 * scale)


def test_patterns_move_with_the_zonal_wind():
    """Along 45N the geopotential anomaly shifts east by omega(45N) * 6 h between steps."""
    lon = np.arange(0.0, 360.0, 0.25)
    lat = np.full_like(lon, 45.0)
    s = SyntheticSettings(num_times=40, seed=4, noise=0.0, variables=("z_500", "u_850"))
    gen = Synthetic(point_set(lat, lon), s)
    f = gen.fields(np.arange(40))
    z = f["z_500"] - f["z_500"].mean(axis=1, keepdims=True)
    shifts = np.arange(0, 80)  # 0 .. 20 deg in 0.25 deg steps
    score = [np.sum(z[1:] * np.roll(z[:-1], k, axis=1)) for k in shifts]
    best = shifts[int(np.argmax(score))] * 0.25
    expected = np.degrees(angular_velocity(np.radians(45.0), s)[()] * 6 * 3600)
    assert abs(best - expected) <= 0.5, (best, expected)
    # ... and the advecting flow is the row-mean wind (the anomaly winds average out).
    u_flow = angular_velocity(np.radians(45.0), s)[()] * 6.371e6 * np.cos(np.radians(45.0))
    assert abs(f["u_850"].mean() - u_flow) < 0.15 * u_flow
