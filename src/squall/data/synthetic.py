"""Synthetic weather-like datasets on any grid, deterministic from a seed.

The fields are continuous functions of (latitude, longitude, time), so one seed gives the same
planet on every grid and the result does not depend on the grid's ordering.

Dynamics
--------
A zonal flow with angular velocity ``omega(lat) = (U_sb + U_jet sin^2(2 lat)) / R`` (solid-body
rotation plus jets at 45 degrees) advects two families of Gaussian "blobs": a streamfunction
``psi`` (highs and lows) and a temperature anomaly ``T'``. Each blob lives a finite time; at age
``a`` it sits at ``lon - omega(lat) a`` (so it shears with the jet), its width grows as a heat
kernel ``sigma^2 = sigma_0^2 + 2 nu a / R^2`` with its amplitude falling as ``sigma_0^2 /
sigma^2`` (diffusion), and it fades in and out smoothly at birth and death. Births are spread
uniformly in time so the population is stationary. A small smooth noise (fixed large-scale basis
with AR(1) coefficients in time) is added to ``psi`` and ``T'``.

Stochastic part
---------------
Two things cannot be predicted from the past states: blob births, and the noise's AR(1) shocks.
The shocks have a known spread: each basis coefficient gets an independent normal shock of standard
deviation ``a sqrt(1 - rho^2)`` per step (``a``: ``noise`` times the blob amplitude, ``rho``:
``noise_memory``), so a variable that is linear in the noise has a one-step unpredictable part of
known standard deviation at every point (:meth:`Synthetic.shock_std`). An ensemble trained on
data with a larger ``noise`` has this spread to learn, and its calibration can be checked
against it. ``noise_seed`` draws another realisation of the noise with the same blobs and land.

Variables derive from these fields:

* ``u_850, v_850``: the advecting zonal flow plus the non-divergent wind of ``psi``
  (``u' = -dpsi/dy``, ``v' = dpsi/dx``), so the winds are those that move the patterns.
* ``z_500``: geopotential in balance with the zonal flow plus ``f psi`` (geostrophic anomaly).
* ``msl``: pressure with subtropical highs and subpolar lows plus ``rho f psi``.
* ``t_850`` and ``2t``: a latitude gradient shifted with the season plus ``T'``; ``2t`` adds a
  lapse-rate correction over orography and a diurnal cycle that is larger over land.
* ``10u, 10v``: the 850 hPa wind reduced by surface friction, more over land.
* ``tp`` (a diagnostic): 6-hourly precipitation where the geopotential anomaly is low and warm.
* ``lsm, z``: a static land-sea mask and surface geopotential (orography on land).
* forcings ``cos/sin_local_time``, ``insolation`` (cosine of the solar zenith angle, clipped at
  zero), ``cos/sin_julian_day``, ``cos/sin_latitude``, ``cos/sin_longitude``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from squall.data.zarr_dataset import DatasetWriter, parse_timedelta
from squall.errors import DataError
from squall.graphs.grids import NodeSet
from squall.progress import Progress

log = logging.getLogger(__name__)

# Physical constants (SI).
EARTH_RADIUS_M = 6.371e6
OMEGA_EARTH = 7.292e-5  # rad/s
GRAVITY = 9.80665
RHO_AIR = 1.2  # kg/m^3, near-surface air density
LAPSE_RATE = 0.0065  # K/m, standard atmosphere
OBLIQUITY = np.radians(23.44)

STATIC = ("lsm", "z", "cos_latitude", "sin_latitude", "cos_longitude", "sin_longitude")
TIME_FORCINGS = ("cos_local_time", "sin_local_time", "insolation", "cos_julian_day",
                 "sin_julian_day")  # fmt: skip
DYNAMIC = ("z_500", "t_850", "u_850", "v_850", "2t", "msl", "10u", "10v", "tp")
#: Every variable the generator can write.
CATALOGUE = DYNAMIC + STATIC + TIME_FORCINGS
#: Written by default: 6 prognostic, 1 diagnostic (tp), 7 forcings.
DEFAULT_VARIABLES = (
    "z_500",
    "t_850",
    "u_850",
    "v_850",
    "2t",
    "msl",
    "tp",
    "lsm",
    "z",
) + TIME_FORCINGS


@dataclass(frozen=True)
class SyntheticSettings:
    """Knobs of the generator; defaults give mid-latitude-like weather.

    Attributes
    ----------
    num_times : int
        Number of time steps written.
    start_date : str
        ISO date of the first time.
    frequency : str
        Spacing of the times, e.g. ``"6h"``.
    seed : int
        Everything random (land, mountains, blobs, noise) derives from this seed.
    variables : tuple of str
        Variables to write, any subset of :data:`CATALOGUE`, in this order.
    solid_body_ms, jet_ms : float
        Zonal wind of the solid-body part at the equator and added peak of the jets (m/s).
    diffusivity_m2s : float
        Horizontal diffusivity widening the blobs (m^2/s).
    psi_blobs, temperature_blobs : int
        Mean number of live streamfunction and temperature blobs at any time.
    lifetime_days : tuple of float
        Range of blob lifetimes.
    noise : float
        Amplitude of the smooth noise relative to one blob's amplitude.
    noise_memory : float
        AR(1) coefficient of the noise per time step, in [0, 1).
    noise_seed : int or None
        Seed of the noise alone; ``None`` derives it from ``seed``.
    block : int
        Times generated and written per block (bounds memory: ``block * vars * grid`` floats).
    """

    num_times: int = 400
    start_date: str = "2020-01-01T00:00"
    frequency: str = "6h"
    seed: int = 0
    variables: tuple[str, ...] = field(default=DEFAULT_VARIABLES)
    solid_body_ms: float = 5.0
    jet_ms: float = 20.0
    diffusivity_m2s: float = 2.0e5
    psi_blobs: int = 24
    temperature_blobs: int = 10
    lifetime_days: tuple[float, float] = (6.0, 14.0)
    noise: float = 0.03
    noise_memory: float = 0.8
    noise_seed: int | None = None
    block: int = 32

    def validate(self) -> None:
        unknown = [v for v in self.variables if v not in CATALOGUE]
        if unknown:
            raise DataError(
                f"synthetic generator cannot make {unknown}; choose from {', '.join(CATALOGUE)}"
            )
        if len(set(self.variables)) != len(self.variables) or not self.variables:
            raise DataError(f"synthetic variables must be unique and non-empty: {self.variables}")
        if self.num_times < 1:
            raise DataError(f"synthetic num_times must be >= 1, got {self.num_times}")
        if self.noise < 0 or not 0 <= self.noise_memory < 1:
            raise DataError(f"synthetic noise must be >= 0 and noise_memory in [0, 1); got "
                            f"{self.noise} and {self.noise_memory}")


# ----------------------------------------------------------------------------------------------
# Zonal flow
# ----------------------------------------------------------------------------------------------


def angular_velocity(lat: np.ndarray, s: SyntheticSettings) -> np.ndarray:
    """Zonal angular velocity ``omega(lat)`` in rad/s (smooth, finite at the poles)."""
    return (s.solid_body_ms + s.jet_ms * np.sin(2 * lat) ** 2) / EARTH_RADIUS_M


def _angular_velocity_dlat(lat: np.ndarray, s: SyntheticSettings) -> np.ndarray:
    return 2 * s.jet_ms * np.sin(4 * lat) / EARTH_RADIUS_M


def balanced_geopotential(lat: np.ndarray, s: SyntheticSettings) -> np.ndarray:
    """Geopotential (m^2/s^2) at 500 hPa in geostrophic balance with the zonal flow.

    Integrates ``dZ/dlat = -f R u`` with ``u = R cos(lat) omega(lat)``, in closed form in
    ``s = sin(lat)``; 5,880 gpm at the equator, as in the tropics.
    """
    sn = np.sin(lat)
    omr = OMEGA_EARTH * EARTH_RADIUS_M
    return (5880.0 * GRAVITY - omr * s.solid_body_ms * sn**2
            - 2 * omr * s.jet_ms * (sn**4 - 2.0 / 3.0 * sn**6))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Blobs: Gaussian bumps on the sphere advected by the zonal flow and diffused
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blobs:
    """A population of blobs: birth time (s), lifetime (s), centre, width (rad), amplitude."""

    birth: np.ndarray
    life: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    sigma: np.ndarray
    amp: np.ndarray

    @classmethod
    def sample(cls, rng, mean_alive, t_end_s, s: SyntheticSettings, amp, storm_track):
        lo, hi = (d * 86400.0 for d in s.lifetime_days)
        mean_life = 0.5 * (lo + hi)
        # Births from one maximum lifetime before the start, so the first time is already full.
        t0 = -hi
        count = rng.poisson(mean_alive * (t_end_s - t0) / mean_life)
        birth = rng.uniform(t0, t_end_s, count)
        life = rng.uniform(lo, hi, count)
        if storm_track:  # mid-latitude storm tracks: |lat| around 45 deg, spread 15 deg
            lat = np.radians(np.clip(rng.normal(45.0, 15.0, count), 5.0, 85.0))
            lat = lat * rng.choice([-1.0, 1.0], count)
        else:  # uniform on the sphere
            lat = np.arcsin(rng.uniform(-1.0, 1.0, count))
        lon = rng.uniform(0.0, 2 * np.pi, count)
        # 8 to 15 degrees: synoptic scale, at least three O32 grid lengths (2.8 deg) wide.
        sigma = np.radians(rng.uniform(8.0, 15.0, count))
        sign = rng.choice([-1.0, 1.0], count)
        return cls(birth, life, lat, lon, sigma, sign * amp * rng.uniform(0.5, 1.0, count))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


# exp(-18) = 1.5e-8 is below float32 resolution (6e-8): blobs are evaluated only within the
# latitude band where their Gaussian exceeds it, which is exact at the precision written.
_CUTOFF_EXPONENT = 18.0


def blob_field(blobs: Blobs, times_s, lat, lon, s: SyntheticSettings, derivatives=False):
    """Sum of the live blobs at ``times_s`` on points ``(lat, lon)`` (radians).

    Returns the field ``[T, N]`` and, with ``derivatives``, its partial derivatives with respect
    to latitude and to longitude (per radian), exact, including the shear of the zonal flow.
    """
    times_s = np.asarray(times_s, dtype=np.float64)
    # Work in latitude order so that each blob touches one contiguous slice of points.
    order = np.argsort(lat, kind="stable")
    lat, lon = lat[order], lon[order]
    shape = (len(times_s), len(lat))
    out = np.zeros(shape)
    d_lat = np.zeros(shape) if derivatives else None
    d_lon = np.zeros(shape) if derivatives else None
    omega = angular_velocity(lat, s)
    domega = _angular_velocity_dlat(lat, s) if derivatives else None
    sin_lat, cos_lat = np.sin(lat), np.cos(lat)
    fade = 1.5 * 86400.0  # 1.5 days to grow and to fade: slower than one 6 h step
    spread = 2 * s.diffusivity_m2s / EARTH_RADIUS_M**2  # rad^2/s
    for i in range(len(blobs.birth)):
        age = times_s - blobs.birth[i]
        live = np.nonzero((age > 0) & (age < blobs.life[i]))[0]
        if live.size == 0:
            continue
        a = age[live][:, None]
        var = blobs.sigma[i] ** 2 + spread * a
        # dot <= cos(lat - lat_c), so points with 1 - cos(lat - lat_c) > 18 var are negligible.
        reach = np.arccos(max(1.0 - _CUTOFF_EXPONENT * float(var.max()), -1.0))
        lo, hi = np.searchsorted(lat, [blobs.lat[i] - reach, blobs.lat[i] + reach])
        if hi <= lo:
            continue
        band = slice(lo, hi)
        amp = (blobs.amp[i] * blobs.sigma[i] ** 2 / var
               * _smoothstep(a / fade) * _smoothstep((blobs.life[i] - a) / fade))  # fmt: skip
        dlon = lon[band] - omega[band] * a - blobs.lon[i]
        cos_c, sin_c = np.cos(blobs.lat[i]), np.sin(blobs.lat[i])
        cos_d = np.cos(dlon)
        dot = cos_lat[band] * cos_c * cos_d + sin_lat[band] * sin_c
        g = amp * np.exp((dot - 1.0) / var)
        out[live, band] += g
        if derivatives:
            k = g / var
            ddot_dlon = -cos_lat[band] * cos_c * np.sin(dlon)
            d_lon[live, band] += k * ddot_dlon
            d_lat[live, band] += k * (
                -sin_lat[band] * cos_c * cos_d
                + cos_lat[band] * sin_c
                - ddot_dlon * domega[band] * a
            )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    if derivatives:
        return out[:, inverse], d_lat[:, inverse], d_lon[:, inverse]
    return out[:, inverse], None, None


class SmoothNoise:
    """Large-scale noise: fixed Gaussian basis on the sphere with AR(1) coefficients in time."""

    def __init__(self, rng, lat, lon, num_times, amp, basis=24, rho=0.8):
        # 24 bumps of 30 deg: smooth at the scale of the blobs; rho = 0.8 per 6 h step keeps it
        # smooth in time but unpredictable beyond a day.
        c_lat = np.arcsin(rng.uniform(-1.0, 1.0, basis))
        c_lon = rng.uniform(0.0, 2 * np.pi, basis)
        var = np.radians(30.0) ** 2
        cos_d = np.cos(lon[None] - c_lon[:, None])
        dot = (
            np.cos(lat)[None] * np.cos(c_lat)[:, None] * cos_d
            + np.sin(lat)[None] * np.sin(c_lat)[:, None]
        )
        g = np.exp((dot - 1.0) / var)
        self.basis = g
        ddot_dlon = -np.cos(lat)[None] * np.cos(c_lat)[:, None] * np.sin(lon[None] - c_lon[:, None])
        ddot_dlat = (-np.sin(lat)[None] * np.cos(c_lat)[:, None] * cos_d
                     + np.cos(lat)[None] * np.sin(c_lat)[:, None])  # fmt: skip
        self.d_lon = g * ddot_dlon / var
        self.d_lat = g * ddot_dlat / var
        coef = np.zeros((num_times, basis))
        self.shock_std = amp * np.sqrt(1 - rho**2)
        shocks = rng.normal(0.0, self.shock_std, (num_times, basis))
        coef[0] = rng.normal(0.0, amp, basis)
        for t in range(1, num_times):
            coef[t] = rho * coef[t - 1] + shocks[t]
        self.coef = coef

    def __call__(self, index):
        c = self.coef[index]
        return c @ self.basis, c @ self.d_lat, c @ self.d_lon


# ----------------------------------------------------------------------------------------------
# Static fields and solar forcings
# ----------------------------------------------------------------------------------------------


def _fibonacci_sphere(n: int) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(n) + 0.5
    return np.arcsin(1 - 2 * k / n), np.mod(np.pi * (1 + 5**0.5) * k, 2 * np.pi)


def static_fields(rng, lat, lon, land_fraction=0.3):
    """Land-sea mask in [0, 1] and surface geopotential (m^2/s^2), smooth and grid-independent."""
    count = 40
    c_lat, c_lon = np.arcsin(rng.uniform(-1.0, 1.0, count)), rng.uniform(0, 2 * np.pi, count)
    var = np.radians(rng.uniform(10.0, 25.0, count)) ** 2
    weight = rng.normal(0.0, 1.0, count)

    def continents(la, lo):
        dot = np.cos(la)[:, None] * np.cos(c_lat) * np.cos(lo[:, None] - c_lon) + np.sin(la)[
            :, None
        ] * np.sin(c_lat)
        return np.exp((dot - 1.0) / var) @ weight

    # Threshold from a fixed, grid-independent point set, so every grid sees the same coasts.
    ref = continents(*_fibonacci_sphere(20000))
    threshold = np.quantile(ref, 1 - land_fraction)
    width = 0.05 * ref.std()  # coasts a few grid lengths wide: lsm is fractional there
    lsm = 1.0 / (1.0 + np.exp(-(continents(lat, lon) - threshold) / width))

    m = 25  # mountain ranges: narrow bumps of up to 3 km
    m_lat, m_lon = np.arcsin(rng.uniform(-1.0, 1.0, m)), rng.uniform(0, 2 * np.pi, m)
    m_var = np.radians(rng.uniform(2.0, 6.0, m)) ** 2
    heights = rng.uniform(500.0, 3000.0, m)
    dot = np.cos(lat)[:, None] * np.cos(m_lat) * np.cos(lon[:, None] - m_lon) + np.sin(lat)[
        :, None
    ] * np.sin(m_lat)
    height = lsm * (np.exp((dot - 1.0) / m_var) @ heights + 100.0)
    return lsm, GRAVITY * height


def solar(dates: np.ndarray, lat: np.ndarray, lon: np.ndarray):
    """Local-time phase, insolation and day-of-year phase, each ``[T, N]`` (julian ``[T, 1]``)."""
    seconds = (dates - dates.astype("datetime64[Y]")).astype("timedelta64[s]").astype(np.float64)
    day_of_year = seconds / 86400.0
    utc_hours = np.mod(seconds / 3600.0, 24.0)
    local = np.mod(utc_hours[:, None] + np.degrees(lon)[None] / 15.0, 24.0)
    phase_local = 2 * np.pi * local / 24.0
    phase_year = 2 * np.pi * day_of_year / 365.25
    # Declination: -23.44 deg at the December solstice (day ~ -10).
    decl = -OBLIQUITY * np.cos(2 * np.pi * (day_of_year + 10.0) / 365.25)
    hour_angle = phase_local - np.pi
    cos_zenith = (np.sin(lat)[None] * np.sin(decl)[:, None]
                  + np.cos(lat)[None] * np.cos(decl)[:, None] * np.cos(hour_angle))  # fmt: skip
    return phase_local, np.clip(cos_zenith, 0.0, None), phase_year[:, None], decl


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


class Synthetic:
    """All random draws of one seed on one grid; :meth:`fields` evaluates any block of times."""

    def __init__(self, nodes: NodeSet, settings: SyntheticSettings):
        settings.validate()
        self.s = s = settings
        self.lat = nodes.latlon[:, 0].astype(np.float64)
        self.lon = nodes.latlon[:, 1].astype(np.float64)
        self.step = parse_timedelta(s.frequency)
        start = np.datetime64(s.start_date, "s")
        self.dates = start + np.arange(s.num_times) * self.step
        self.seconds = np.arange(s.num_times) * self.step.astype(np.float64)
        rng = np.random.default_rng(s.seed)
        # Separate streams so changing one setting leaves the other fields unchanged.
        r_static, r_psi, r_temp, r_noise = (np.random.default_rng(x) for x in rng.integers(
            0, 2**63, 4))  # fmt: skip
        if s.noise_seed is not None:
            r_noise = np.random.default_rng(s.noise_seed)
        self.lsm, self.orography = static_fields(r_static, self.lat, self.lon)
        end = float(self.seconds[-1]) + 1.0
        # 2e7 m^2/s: ~10 m/s wind and ~200 gpm geopotential anomalies at 45 deg, as in real
        # synoptic systems.
        self.psi_amp = 2.0e7
        self.psi = Blobs.sample(r_psi, s.psi_blobs, end, s, self.psi_amp, storm_track=True)
        self.temp = Blobs.sample(r_temp, s.temperature_blobs, end, s, 4.0, storm_track=False)
        self.psi_noise = SmoothNoise(r_noise, self.lat, self.lon, s.num_times,
                                     s.noise * self.psi_amp, rho=s.noise_memory)  # fmt: skip
        self.temp_noise = SmoothNoise(r_noise, self.lat, self.lon, s.num_times, s.noise * 4.0,
                                      rho=s.noise_memory)  # fmt: skip

    def shock_std(self) -> dict[str, np.ndarray]:
        """One-step unpredictable standard deviation ``[N]`` of each variable linear in the noise.

        For ``X_{t+1} = D_{t+1} + rho (X_t - D_t) + shock`` (``D``: the noise-free fields of the
        same seed), the shock at a point is a sum of independent normal basis shocks, so its
        standard deviation is the shock scale times the norm of the variable's basis row. ``tp``
        is not linear in the noise and has no entry.
        """
        cos_lat = np.maximum(np.cos(self.lat), 1e-6)
        coriolis = 2 * OMEGA_EARTH * np.sin(self.lat)
        p, t = self.psi_noise, self.temp_noise
        psi = p.shock_std * np.linalg.norm(p.basis, axis=0)
        u = p.shock_std * np.linalg.norm(p.d_lat, axis=0) / EARTH_RADIUS_M
        v = p.shock_std * np.linalg.norm(p.d_lon, axis=0) / (EARTH_RADIUS_M * cos_lat)
        temp = t.shock_std * np.linalg.norm(t.basis, axis=0)
        friction = 0.8 - 0.35 * self.lsm
        std = {"z_500": np.abs(coriolis) * psi, "msl": RHO_AIR * 0.8 * np.abs(coriolis) * psi,
               "u_850": u, "v_850": v, "10u": friction * u, "10v": friction * v,
               "t_850": temp, "2t": 0.8 * temp}  # fmt: skip
        return {k: std[k] for k in self.s.variables if k in std}

    def fields(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Every catalogue variable needed by the settings at time indices ``index``, ``[T, N]``."""
        s, lat, lon = self.s, self.lat, self.lon
        want = set(s.variables)
        t = self.seconds[index]
        T = len(index)
        out = {}
        sin_lat, cos_lat = np.sin(lat), np.cos(lat)
        coriolis = 2 * OMEGA_EARTH * sin_lat

        psi, psi_lat, psi_lon = blob_field(self.psi, t, lat, lon, s, derivatives=True)
        n, n_lat, n_lon = self.psi_noise(index)
        psi, psi_lat, psi_lon = psi + n, psi_lat + n_lat, psi_lon + n_lon
        u_flow = EARTH_RADIUS_M * cos_lat * angular_velocity(lat, s)
        u850 = u_flow - psi_lat / EARTH_RADIUS_M
        # dpsi/dlon carries a cos(lat) factor from the geometry, so this is finite at the poles.
        v850 = psi_lon / (EARTH_RADIUS_M * np.maximum(cos_lat, 1e-6))
        out["u_850"], out["v_850"] = u850, v850
        z_anom = coriolis * psi
        out["z_500"] = balanced_geopotential(lat, s) + z_anom

        temp = blob_field(self.temp, t, lat, lon, s)[0] + self.temp_noise(index)[0]
        phase_local, insolation, phase_year, decl = solar(self.dates[index], lat, lon)
        season = 8.0 * sin_lat * (np.sin(decl) / np.sin(OBLIQUITY))[:, None]  # summer +8 K
        out["t_850"] = 283.0 - 35.0 * sin_lat**2 + season + temp
        # Diurnal cycle peaking at 15 local time, 6 K over land and 1 K over sea (typical ranges).
        diurnal = (1.0 + 5.0 * self.lsm) * np.cos(phase_local - 2 * np.pi * 15 / 24)
        out["2t"] = (300.0 - 45.0 * sin_lat**2 + 1.5 * season + 0.8 * temp + diurnal
                     - LAPSE_RATE * self.orography / GRAVITY)  # fmt: skip
        # -cos(6 lat): equatorial trough, subtropical highs at 30 deg, subpolar lows at 60 deg, polar
        # highs (+-8 hPa); plus the surface part of the geostrophic anomaly, rho f psi.
        out["msl"] = 101325.0 - 800.0 * np.cos(6 * lat) + RHO_AIR * 0.8 * z_anom
        friction = 0.8 - 0.35 * self.lsm  # 10 m wind 45-80 % of 850 hPa wind
        out["10u"], out["10v"] = friction * u850, friction * v850
        # 6 h precipitation (m) where geopotential is low, more when warm (Clausius-Clapeyron-like
        # 7 %/K); softplus keeps it smooth and >= 0; ~ 1-10 mm in active systems.
        softplus = np.logaddexp(0.0, -z_anom / 400.0 - 1.0)
        out["tp"] = 2e-3 * softplus * np.exp(0.07 * (out["t_850"] - 283.0))

        out["lsm"] = np.broadcast_to(self.lsm, (T, len(lat)))
        out["z"] = np.broadcast_to(self.orography, (T, len(lat)))
        for name, fn, arg in (
            ("cos_latitude", np.cos, lat),
            ("sin_latitude", np.sin, lat),
            ("cos_longitude", np.cos, lon),
            ("sin_longitude", np.sin, lon),
        ):
            if name in want:
                out[name] = np.broadcast_to(fn(arg), (T, len(lat)))
        out["cos_local_time"], out["sin_local_time"] = np.cos(phase_local), np.sin(phase_local)
        out["insolation"] = insolation
        out["cos_julian_day"] = np.broadcast_to(np.cos(phase_year), (T, len(lat)))
        out["sin_julian_day"] = np.broadcast_to(np.sin(phase_year), (T, len(lat)))
        return {k: out[k] for k in s.variables}


def generate(path, nodes: NodeSet, settings: SyntheticSettings, grid_name: str = "",
             overwrite: bool = False) -> Path:  # fmt: skip
    """Write a synthetic dataset on ``nodes`` to ``path`` (see :mod:`squall.data.zarr_dataset`).

    Parameters
    ----------
    path : str or Path
        Target zarr store; written to a temporary name and renamed when complete.
    nodes : NodeSet
        The grid (usually the graph's ``data`` nodes).
    settings : SyntheticSettings
        Generator settings.
    grid_name : str
        Recorded as the ``resolution`` attribute (e.g. ``"o32"``).
    overwrite : bool
        Replace an existing store instead of raising :class:`DataError`.

    Returns
    -------
    Path
        ``path``.
    """
    start = time.perf_counter()
    gen = Synthetic(nodes, settings)
    s = settings
    attrs = {
        "source": "squall.data.synthetic",
        "synthetic": {"seed": s.seed, "psi_blobs": s.psi_blobs, "jet_ms": s.jet_ms,
                      "solid_body_ms": s.solid_body_ms, "noise": s.noise,
                      "noise_memory": s.noise_memory, "noise_seed": s.noise_seed},
    }  # fmt: skip
    with (
        DatasetWriter(
            path,
            variables=list(s.variables),
            dates=gen.dates,
            frequency=s.frequency,
            latitudes=np.degrees(gen.lat),
            longitudes=np.degrees(gen.lon),
            area_weights=nodes.area,
            resolution=grid_name or nodes.meta.get("grid", ""),
            attrs=attrs,
            overwrite=overwrite,
        ) as writer,
        Progress(s.num_times, f"generating {Path(path).name}", unit="time") as bar,
    ):
        for first in range(0, s.num_times, s.block):
            index = np.arange(first, min(first + s.block, s.num_times))
            fields = gen.fields(index)
            block = np.empty((len(index), len(s.variables), 1, len(nodes)), dtype=np.float32)
            for i, name in enumerate(s.variables):
                block[:, i, 0] = fields[name]
            writer.write(first, block)
            bar.update(len(index))
    log.info("synthetic dataset: %d times x %d variables x %d points in %.1f s -> %s",
             s.num_times, len(s.variables), len(nodes), time.perf_counter() - start, path)  # fmt: skip
    return Path(path)
