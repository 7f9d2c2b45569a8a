import numpy as np
import pytest

from squall.errors import GraphError
from squall.graphs import grids


@pytest.mark.parametrize("n", [1, 2, 32, 96])
def test_octahedral_counts(n):
    g = grids.octahedral_gaussian(n)
    assert len(g) == 4 * n * (n + 9)
    lat = g.latlon[:, 0]
    assert np.all(np.diff(lat) <= 0), "rows run north to south"
    assert np.allclose(np.sort(lat), np.sort(-lat)), "rows symmetric about the equator"


def test_o96_is_40320_points():
    assert len(grids.grid_from_name("O96")) == 40_320


def test_gaussian_latitudes_integrate_polynomials():
    lat, w = grids.gaussian_latitudes(8)
    x = np.sin(lat)
    assert np.isclose(w.sum(), 2.0)
    assert np.isclose((w * x**10).sum(), 2 / 11)


EPS = np.finfo(np.float64).eps
#: The roots get one Newton step in extended precision where numpy has it (x86 long double).
EXTENDED = np.finfo(np.longdouble).eps < EPS


@pytest.mark.parametrize("n", [1, 2, 8, 32, 96, 160])
def test_gaussian_latitudes_match_leggauss_and_are_symmetric(n):
    lat, w = grids.gaussian_latitudes(n)
    m = 2 * n
    assert lat.shape == w.shape == (m,) and np.all(np.diff(lat) < 0), "north to south"
    np.testing.assert_array_equal(lat, -lat[::-1])
    np.testing.assert_array_equal(w, w[::-1])
    # an m-term recurrence or eigensolver: either result carries ~m eps of rounding at most
    assert abs(w.sum() - 2.0) <= m * EPS * 2.0
    half = grids._gauss_legendre_half(m)[0]  # positive roots, descending
    x_ref, w_ref = np.polynomial.legendre.leggauss(m)  # ascending
    np.testing.assert_allclose(np.concatenate([-half, half[::-1]]), x_ref, rtol=0, atol=m * EPS)
    # latitude error = error of sin(latitude) / cos(latitude), plus arcsin's own rounding
    lat_ref = np.arcsin(x_ref[::-1])
    assert np.all(np.abs(lat - lat_ref) <= m * EPS / np.cos(lat_ref) + np.spacing(lat_ref))
    # leggauss's weights are themselves off by up to 1e-9 relative at m = 640 (derivatives taken
    # at its eigensolver roots); the exact weights are checked against mpmath below
    np.testing.assert_allclose(w, w_ref[::-1], rtol=1e-6)


def test_gaussian_latitudes_are_the_rounded_roots():
    """Against 40-digit roots and weights of P_64 (mpmath): roots to the nearest float64 (half an
    ulp, plus the reference's own rounding) and weights to a few eps, where numpy has extended
    precision; otherwise within the float64 Newton noise of an m-term recurrence (m ulps)."""
    mpmath = pytest.importorskip("mpmath")
    m = 64
    x, w = grids._gauss_legendre_half(m)
    ctx = mpmath.mp.clone()
    ctx.dps = 40
    root_tol, weight_tol = (0.5 + 1e-3, 4 * EPS) if EXTENDED else (m, m * EPS)
    for xi_f, wi_f in zip(x, w, strict=True):
        xi = ctx.mpf(xi_f)
        for _ in range(3):  # Newton from a root already good to ~1e-16: 40 digits
            p, q = ctx.legendre(m, xi), ctx.legendre(m - 1, xi)
            xi -= p * (1 - xi**2) / (m * (q - xi * p))
        wi = 2 * (1 - xi**2) / (m * ctx.legendre(m - 1, xi)) ** 2
        assert float(abs(ctx.mpf(xi_f) - xi)) <= root_tol * np.spacing(xi_f)
        assert float(abs(ctx.mpf(wi_f) / wi - 1)) <= weight_tol


@pytest.mark.parametrize("level", [0, 1, 3, 5])
def test_icosahedral_counts_and_prefix(level):
    mesh = grids.icosahedral_mesh(level)
    assert len(mesh) == 10 * 4**level + 2
    assert len(mesh.faces) == 20 * 4**level
    assert np.allclose(np.linalg.norm(mesh.xyz, axis=1), 1.0)
    if level:
        coarse = grids.icosahedral_mesh(level - 1)
        assert np.allclose(mesh.latlon[: len(coarse)], coarse.latlon)
        assert mesh.mesh_levels[len(coarse)] == level


def test_negative_level_is_an_error():
    with pytest.raises(GraphError, match="level must be >= 0"):
        grids.icosahedral_mesh(-1)


def test_latlon_grid_and_cut_out():
    g = grids.latlon_grid(1.0)
    assert len(g) == 181 * 360
    box = grids.cut_out(g, (40, 60, -10, 20))
    assert len(box) == 21 * 31  # lon -10..20 wraps through 0
    lat, lon = np.degrees(box.latlon[:, 0]), np.degrees(box.latlon[:, 1])
    assert np.isclose(lat.min(), 40) and np.isclose(lat.max(), 60)
    assert set(np.round(lon).astype(int)) == set(range(0, 21)) | set(range(350, 360))


def test_stretched_grid_fine_inside_coarse_outside():
    region = (50, 70, 0, 30)
    s = grids.stretched(grids.latlon_grid(0.5, bounds=region), grids.grid_from_name("O16"), region)
    fine = s.meta["num_fine"]
    assert fine == 41 * 61
    assert grids.in_box(s.latlon[:fine], region).all()
    assert not grids.in_box(s.latlon[fine:], region).any()
    assert np.isclose(s.area.mean(), 1.0)


def test_point_set_and_bad_points():
    p = grids.point_set([10.0, -20.5], [350.0, -10.0])
    assert len(p) == 2 and np.allclose(np.degrees(p.latlon[1]), [-20.5, 350.0])
    with pytest.raises(GraphError, match="latitudes"):
        grids.point_set([95.0], [0.0])
    with pytest.raises(GraphError, match="equal"):
        grids.point_set([1.0, 2.0], [0.0])


@pytest.mark.parametrize("bad", ["X96", "O", "grid", "-1"])
def test_unknown_grid_names(bad):
    with pytest.raises(GraphError, match="unknown grid"):
        grids.grid_from_name(bad)
