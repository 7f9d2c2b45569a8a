"""How much of a limited-area forecast can the boundary band decide? A kinematic oracle.

    PYTHONPATH=src .venv/bin/python profiling/lam_oracle.py [--cache DIR] [--override ...]

The synthetic weather (:mod:`squall.data.synthetic`) is carried by a zonal flow whose angular
velocity ``omega(lat)`` is known. On ``lam_alps`` (43-49 N, 4-17 E) it moves 4.8 degrees
of longitude eastward per 6 h step, so air crosses the 13-degree box in about 16 h: at 24 h no
interior point holds air that was inside the box at the start. The oracle forecasts each
prognostic variable's anomaly (from a per-point, per-hour-of-day climatology of the training
split) by moving it along that flow (semi-Lagrangian, exact departure points, linear
interpolation along the grid row), and differs only in what it knows about air that was outside
the box at the start:

* ``none``: nothing (the box's west-edge anomaly held; ``climatology``: zero anomaly);
* ``band_lagged``: the driver's values on the 1-degree band at the 6-hourly times before the
  lead (what a model rolled out with forcing sees when it predicts that lead);
* ``band``: the same plus the band at the lead time itself;
* ``wide_start``: the driver's whole field at the start, nothing later (a band wide enough to
  hold all the inflow, seen once: it ages as the lead grows, unlike the band's snapshots).

Every variant knows the whole box at the start, so they differ in the inflow alone. Band samples
of one grid row are placed at their Lagrangian longitude (``lon - omega t``) and interpolated
linearly between snapshots (4.8 degrees apart; the blobs are 8-15 degrees wide). Diffusion,
births, deaths and the noise are not modelled: every variant pays for them alike.

RMSE over the interior (cos-latitude weights, variables normalised by the dataset's statistics,
root of the mean over the prognostic variables' MSE: the units of ``jobs.forecast``), mean over
every test start with 48 h of truth. Rows to results/lam_oracle.csv, table lam_oracle.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, write_rows  # noqa: E402

from squall.data.boundary import Interpolation  # noqa: E402
from squall.data.synthetic import SyntheticSettings, angular_velocity  # noqa: E402
from squall.data.zarr_dataset import _open_group, read_info  # noqa: E402
from squall.graphs.boundary import boundary_mask, boundary_spec  # noqa: E402
from squall.graphs.grids import NodeSet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROGNOSTIC = ("z_500", "t_850", "u_850", "v_850", "2t", "msl")
VARIANTS = ("persistence", "climatology", "none", "band_lagged", "band", "wide_start")


def load(path: Path, variables) -> tuple:
    info = read_info(path)
    data = _open_group(path)[1]
    idx = info.index_of(variables)
    values = np.stack([data[t, :, 0][idx] for t in range(info.shape[0])])  # [T, V, G]
    return info, values.astype(np.float64)


def slot_climatology(values, hours, train) -> np.ndarray:
    """``[24 // 6, V, G]`` mean of the training times per hour of day (6-hourly data)."""
    return np.stack([values[train & (hours == h)].mean(axis=0) for h in (0, 6, 12, 18)])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "squall")
    p.add_argument("--steps", type=int, default=8, help="6-hourly leads (8: 48 h)")
    p.add_argument("--override", nargs="*", default=[],
                   help="Hydra overrides naming the data, e.g. +experiment=lam_alps")  # fmt: skip
    p.add_argument("--name", default="lam_oracle", help="file name of the csv and md")
    args = p.parse_args()
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["graph=lam_alps", f"paths.cache={args.cache}",
                                           *args.override])  # fmt: skip
    spec = OmegaConf.to_container(cfg.graph, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    lam_path, drv_path = Path(data_cfg["path"]), Path(data_cfg["boundary"]["path"])
    for path in (lam_path, drv_path):
        if not path.exists():
            sys.exit(f"{path} missing: run `python -m jobs.make_dataset graph=lam_alps "
                     f"{' '.join(args.override)}` once (or set --cache to the SQUALL_CACHE that "
                     "holds it)")  # fmt: skip
    info, lam = load(lam_path, PROGNOSTIC)
    dinfo, drv = load(drv_path, PROGNOSTIC)
    if not np.array_equal(info.dates, dinfo.dates):
        sys.exit("driver and LAM dataset dates differ")
    mean = info.statistics["mean"][info.index_of(PROGNOSTIC)][None, :, None]
    std = info.statistics["stdev"][info.index_of(PROGNOSTIC)][None, :, None]
    lam, drv = (lam - mean) / std, (drv - mean) / std

    lat, lon = info.latitudes, info.longitudes
    lats, lons = np.unique(lat), np.unique(lon)
    if len(lats) * len(lons) != len(lat):
        sys.exit("lam_alps is expected to be a regular lat-lon box")
    nodes = NodeSet("data", np.radians(np.stack([lat, lon], axis=1)), info.area_weights)
    band = boundary_mask(nodes, boundary_spec(spec), spec["nodes"]["data"])
    # grid -> [row, column] of the regular box (rows by latitude, columns by longitude)
    row, col = np.searchsorted(lats, lat), np.searchsorted(lons, lon)
    grid = np.full((len(lats), len(lons)), -1)
    grid[row, col] = np.arange(len(lat))
    west = lons[0]

    hours = (info.dates.astype("datetime64[h]").astype(np.int64) % 24).astype(int)
    slot = hours // 6
    train = info.dates <= np.datetime64(data_cfg["train"]["end"])
    test0 = np.datetime64(data_cfg["test"]["start"])
    clim = slot_climatology(lam, hours, train)
    anom = lam - clim[slot]
    dclim = slot_climatology(drv, hours, train)
    danom = drv - dclim[slot]
    # the driver's anomaly on the band (what forcing gives) and anywhere (wide_start)
    interp_band = Interpolation.inverse_distance(
        np.radians(np.stack([dinfo.latitudes, dinfo.longitudes], 1)),
        np.radians(np.stack([lat[band], lon[band]], 1)))  # fmt: skip
    drv_ll = np.radians(np.stack([dinfo.latitudes, dinfo.longitudes], 1))

    s = SyntheticSettings(jet_ms=float(data_cfg["generator"]["jet_ms"]),
                          solid_body_ms=float(data_cfg["generator"]["solid_body_ms"]))  # fmt: skip
    rate = np.degrees(angular_velocity(np.radians(lats), s)) * 3600.0  # deg lon per hour per row
    interior = ~band
    w = np.cos(np.radians(lat)) * interior
    w = w / w.sum()

    starts = [i for i in range(len(info.dates)) if info.dates[i] >= test0
              and i + args.steps < len(info.dates)]  # fmt: skip
    sums = {v: np.zeros((args.steps, len(PROGNOSTIC))) for v in VARIANTS}
    inflow_frac = np.zeros(args.steps)
    width = float(spec["nodes"]["data"]["boundary"]["width_deg"])
    west_cols = np.flatnonzero(lons <= west + width + 1e-6)  # the inflow side's band columns
    band_index = np.full(len(lat), -1)
    band_index[np.flatnonzero(band)] = np.arange(int(band.sum()))
    departures = {}  # lead -> interior-or-band points whose air was west of the box, weights
    for k in range(1, args.steps + 1):
        pts_k, ll_k = [], []
        for r in range(len(lats)):
            xi = lons - rate[r] * 6.0 * k
            out = np.flatnonzero(xi < west)
            pts_k.append(grid[r][out])
            ll_k.append(np.stack([np.full(len(out), lats[r]), xi[out]], 1))
        pts_k = np.concatenate(pts_k)
        interp = (Interpolation.inverse_distance(drv_ll, np.radians(np.concatenate(ll_k)))
                  if len(pts_k) else None)  # fmt: skip
        departures[k] = (pts_k, interp)
    for t0 in starts:
        band_anom = {}
        for k in range(1, args.steps + 1):  # driver anomaly on the band at each lead time
            raw = interp_band(drv[t0 + k])  # [V, P] normalised driver values
            band_anom[k] = raw - clim[slot[t0 + k]][:, band]
        for k in range(1, args.steps + 1):
            hours_ahead = 6.0 * k
            truth = lam[t0 + k]
            fc = {v: np.empty_like(truth) for v in VARIANTS}
            fc["persistence"] = lam[t0].copy()
            fc["climatology"] = clim[slot[t0 + k]].copy()
            for r in range(len(lats)):
                pts = grid[r]
                xi = lons - rate[r] * hours_ahead  # departure longitude of each column
                a0 = anom[t0][:, pts]  # [V, C]
                # samples along the Lagrangian longitude: the box at t0, then band snapshots
                xs, vs = [lons], [a0]
                lag_x, lag_v = [lons], [a0]
                for j in range(1, k + 1):
                    cols = west_cols[band[pts[west_cols]]]
                    xj = lons[cols] - rate[r] * 6.0 * j
                    vj = band_anom[j][:, band_index[pts[cols]]]
                    xs.append(xj)
                    vs.append(vj)
                    if j < k:
                        lag_x.append(xj)
                        lag_v.append(vj)
                for name, sx, sv in (("band", xs, vs), ("band_lagged", lag_x, lag_v)):
                    x_all = np.concatenate(sx)
                    v_all = np.concatenate(sv, axis=1)
                    order = np.argsort(x_all, kind="stable")
                    x_all, v_all = x_all[order], v_all[:, order]
                    fc[name][:, pts] = np.stack([np.interp(xi, x_all, v_all[v])
                                                 for v in range(len(PROGNOSTIC))])  # fmt: skip
                held = np.stack([np.interp(xi, lons, a0[v]) for v in range(len(PROGNOSTIC))])
                fc["none"][:, pts] = held  # np.interp holds the edge value west of the box
                fc["wide_start"][:, pts] = held
            out_pts, interp = departures[k]
            if len(out_pts):
                fc["wide_start"][:, out_pts] = interp(danom[t0])
            for name in ("none", "band_lagged", "band", "wide_start"):
                fc[name] += clim[slot[t0 + k]]
            for name in VARIANTS:
                sums[name][k - 1] += ((fc[name] - truth) ** 2 * w).sum(axis=1)
            inflow_frac[k - 1] += w[out_pts].sum()
    n = len(starts)
    rmse = {v: np.sqrt((sums[v] / n).mean(axis=1)) for v in VARIANTS}
    inflow_frac /= n
    info_row = machine_info()
    rows = [{"lead_h": 6 * (k + 1), "inflow_fraction": round(float(inflow_frac[k]), 3),
             **{f"rmse_{v}": round(float(rmse[v][k]), 4) for v in VARIANTS},
             "starts": n, "date": info_row["date"], "git": info_row["git"]}
            for k in range(args.steps)]  # fmt: skip
    out = write_rows(RESULTS / f"{args.name}.csv", rows)
    lines = ["# lam_alps: what the boundary band can decide (kinematic oracle)", "",
             f"Generated by `profiling/lam_oracle.py {' '.join(sys.argv[1:])}` ({n} test starts, git {info_row['git']}). "
             "RMSE inside the domain, normalised units. inflow = interior area whose air was "
             "outside the box at the start.", "",
             "| lead h | inflow | persistence | climatology | none | band_lagged | band | wide_start "
             "| band vs none |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        gain = 1 - r["rmse_band"] / r["rmse_none"]
        lines.append(f"| {r['lead_h']} | {r['inflow_fraction']:.0%} | "
                     + " | ".join(f"{r[f'rmse_{v}']:.3f}" for v in VARIANTS)
                     + f" | {gain:.0%} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
