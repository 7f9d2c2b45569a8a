"""The frozen Graph: node sets and destination-sorted edge sets built from a spec.

A spec (one file in ``conf/graph/``) names node sets and edge sets::

    name: o96_l6
    nodes:
      data:   {type: grid, grid: O96}
      hidden: {type: icosahedral, level: 6}
    edges:
      encoder:   {src: data,   dst: hidden, type: cutoff, factor: 0.6}
      processor: {src: hidden, dst: hidden, type: multiscale}
      decoder:   {src: hidden, dst: data,   type: knn, k: 3}

Node types: ``grid`` (``grid: O96`` or a lat-lon spacing), ``latlon`` (``resolution``, optional
``region``), ``icosahedral`` (``level``, optional ``region`` and ``margin_deg`` for a limited area),
``stretched_grid`` (``global_grid``, ``regional_resolution``, ``region``), ``stretched_mesh``
(``level`` globally, ``fine_level`` inside ``region`` widened by ``margin_deg``), ``points``
(``path`` of an ``.npz`` with ``latitudes``/``longitudes`` in degrees, or inline lists).
Regions are ``[lat_min, lat_max, lon_min, lon_max]`` in degrees.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from squall.errors import GraphError
from squall.graphs import grids
from squall.graphs.attributes import edge_attributes, edge_attributes_tensor, node_attributes
from squall.graphs.boundary import boundary_mask, boundary_spec, check_coverage
from squall.graphs.edges import build_edges, resolved_spec, search_steps
from squall.graphs.search import search_device
from squall.progress import Progress


@dataclass(frozen=True, eq=False)
class EdgeSet:
    """Directed edges ``src -> dst`` sorted by destination, then source.

    Index conventions: edge ``e`` (CSC numbering) goes from source node ``row[e]`` to the
    destination ``d`` with ``colptr[d] <= e < colptr[d + 1]``. The reverse (CSR) view lists the same
    edges grouped by source: ``csr_perm[rowptr[s]:rowptr[s + 1]]`` are the CSC ids of the edges
    leaving source ``s``, ascending. ``attrs[e]`` belongs to CSC edge ``e``.
    """

    name: str
    src: str
    dst: str
    num_src: int
    num_dst: int
    colptr: np.ndarray
    row: np.ndarray
    rowptr: np.ndarray
    csr_perm: np.ndarray
    attrs: np.ndarray

    @classmethod
    def from_pairs(cls, name, src_set: grids.NodeSet, dst_set: grids.NodeSet, src, dst) -> EdgeSet:
        """Sort ``(src, dst)`` pairs into CSC order once and compute the CSR view and attributes.

        Pairs are int64 numpy arrays or tensors. When the graph search runs on a GPU
        (:func:`squall.graphs.search.search_device`), sorts, pointers and attributes are computed
        there from the node sets' device copies (:meth:`squall.graphs.grids.NodeSet.on_device`)
        and only the finished arrays come back to the host.
        """
        device = search_device()
        if device is not None and device.type == "cuda":
            return cls._from_pairs_on(device, name, src_set, dst_set, src, dst)
        src, dst = (p.cpu().numpy() if isinstance(p, torch.Tensor) else p for p in (src, dst))
        src, dst, csr_perm = _sorted_pairs(src, dst, len(src_set))
        colptr = _pointer(dst, len(dst_set))
        rowptr = _pointer(src[csr_perm], len(src_set))
        attrs = edge_attributes(src_set.xyz, dst_set.xyz, src, dst)
        return cls(name, src_set.name, dst_set.name, len(src_set), len(dst_set),
                   colptr, src, rowptr, csr_perm, attrs)  # fmt: skip

    @classmethod
    def _from_pairs_on(cls, device, name, src_set, dst_set, src, dst, pool=None):
        """:meth:`from_pairs` on a CUDA ``device``: the host's permutations (stable sorts of
        the same keys) and the device attributes of :func:`edge_attributes_tensor`.

        With a thread ``pool`` the five finished arrays are copied to the host on its threads
        (each copy waits for its host pages; concurrent copies overlap those waits) and a
        function returning the edge set is returned instead.
        """
        s, d = (torch.as_tensor(p, dtype=torch.int64).to(device) for p in (src, dst))
        s, d, csr_perm = _torch_sorted_pairs(s, d, len(src_set))
        colptr, rowptr = _pointer_tensor(d, len(dst_set)), _pointer_tensor(s, len(src_set))
        attrs = edge_attributes_tensor(src_set.on_device(device)[1], dst_set.on_device(device)[1],
                                       s, d, device)  # fmt: skip
        arrays = (colptr, s, rowptr, csr_perm, attrs)
        head = (name, src_set.name, dst_set.name, len(src_set), len(dst_set))
        if pool is None:
            return cls(*head, *(t.cpu().numpy() for t in arrays))
        copies = [pool.submit(_to_host, t) for t in arrays]
        return lambda: cls(*head, *(c.result() for c in copies))

    @property
    def num_edges(self) -> int:
        return int(self.row.shape[0])

    @cached_property
    def dst_index(self) -> np.ndarray:
        """Destination of every edge in CSC order, ``[E]`` int64."""
        return np.repeat(np.arange(self.num_dst, dtype=np.int64), np.diff(self.colptr))

    def in_degree(self) -> np.ndarray:
        return np.diff(self.colptr)

    def degree_stats(self) -> dict:
        """In-degree ``min``, ``mean``, percentiles ``p50``/``p90``/``p99`` and ``max``."""
        deg = self.in_degree()
        p50, p90, p99 = (float(v) for v in np.percentile(deg, [50, 90, 99]))
        return {"min": int(deg.min()), "mean": float(deg.mean()), "p50": p50, "p90": p90,
                "p99": p99, "max": int(deg.max())}  # fmt: skip

    def unreached_sources(self) -> int:
        """Source nodes with no outgoing edge: their information never crosses this edge set."""
        return int((np.diff(self.rowptr) == 0).sum())


def _sorted_pairs(src, dst, num_src: int, device=None):
    """``(src, dst, csr_perm)``: the pairs in CSC order (destination major, source minor; one
    stable sort of the combined key) and the stable order of the sorted sources (CSR view).

    With a torch ``device`` the two stable sorts run in torch there (:func:`_torch_sorted_pairs`);
    stable sorts of the same keys give the same permutations as numpy's.
    """
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if device is not None:
        s, d = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (src, dst))
        return tuple(t.cpu().numpy() for t in _torch_sorted_pairs(s, d, num_src))
    order = np.argsort(dst * num_src + src, kind="stable")
    src, dst = src[order], dst[order]
    return src, dst, np.argsort(src, kind="stable").astype(np.int64)


def _to_host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _torch_sorted_pairs(s: torch.Tensor, d: torch.Tensor, num_src: int):
    """:func:`_sorted_pairs` of int64 tensors, left on their device."""
    order = torch.sort(d * num_src + s, stable=True).indices
    s, d = s[order], d[order]
    return s, d, torch.sort(s, stable=True).indices


def _pointer(sorted_index: np.ndarray, n: int) -> np.ndarray:
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_index, minlength=n), out=ptr[1:])
    return ptr


def _pointer_tensor(index: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`_pointer` of an int64 tensor (counts need no sorted order)."""
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=n), 0, out=ptr[1:])
    return ptr


@dataclass(frozen=True, eq=False)
class Graph:
    """Node sets and edge sets of one model, built once from a spec and cached to disk."""

    name: str
    spec: dict
    spec_hash: str
    nodes: dict[str, grids.NodeSet]
    edges: dict[str, EdgeSet]
    build_seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def boundary_mask(self, name: str = "data") -> np.ndarray | None:
        """``[N]`` bool of the points of ``name`` forced by a driving model (the spec's
        ``nodes.<name>.boundary``, :mod:`squall.graphs.boundary`), or None without one."""
        spec = boundary_spec(self.spec, name)
        if spec is None:
            return None
        return boundary_mask(self.nodes[name], spec, dict(self.spec["nodes"][name]))

    def node_attributes(self, name: str) -> np.ndarray:
        """``[N, 4]`` float32 sin/cos latitude and longitude of node set ``name``."""
        return node_attributes(self.nodes[name].latlon)

    def statistics(self) -> dict:
        """Nodes per set, edges and in-degree per edge set, build time: one JSON-able dict."""
        return {
            "graph": self.name,
            "spec_hash": self.spec_hash,
            "nodes": {k: len(v) for k, v in self.nodes.items()},
            "edges": {
                k: {
                    "src": e.src,
                    "dst": e.dst,
                    "edges": e.num_edges,
                    "in_degree": e.degree_stats(),
                    "unreached_src": e.unreached_sources(),
                }
                for k, e in self.edges.items()
            },
            "build_s": round(self.build_seconds, 3),
        } | self._boundary_counts()

    def _boundary_counts(self) -> dict:
        mask = self.boundary_mask()
        return {} if mask is None else {"boundary": {"data": int(mask.sum())}}

    def in_degree_report(self, names=("encoder",)) -> str:
        """The in-degree distribution of edge sets ``names`` (those the graph has) as text: the
        statistics of :meth:`EdgeSet.degree_stats`, the spec's cap and how many destinations
        reach it, and a histogram over powers of two."""
        lines = []
        for name in names:
            if name not in self.edges:
                continue
            e, spec = self.edges[name], dict(self.spec.get("edges", {}).get(name) or {})
            d, deg = e.degree_stats(), e.in_degree()
            cap = resolved_spec(spec).get("max_neighbours")
            capped = ""
            if cap is not None:
                full = int((deg >= int(cap)).sum())
                capped = f", cap {cap} (reached by {full:,} of {len(deg):,})"
            lines.append(f"{name} in-degree ({e.src}->{e.dst}, {e.num_edges:,} edges): min "
                         f"{d['min']}, mean {d['mean']:.1f}, p50 {d['p50']:g}, p90 {d['p90']:g}, "
                         f"p99 {d['p99']:g}, max {d['max']}{capped}")  # fmt: skip
            top = max(1, int(deg.max()))
            edges = [0, 1] + [1 << k for k in range(1, top.bit_length() + 1)]
            counts = np.histogram(deg, bins=[*edges[:-1], max(edges[-1], top + 1)])[0]
            bins = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
                    for lo, hi in zip(edges[:-1], edges[1:], strict=True)]  # fmt: skip
            lines.append("  histogram: " + ", ".join(
                f"{b}: {c:,}" for b, c in zip(bins, counts, strict=True) if c))  # fmt: skip
        return "\n".join(lines)


def _region(spec, key="region"):
    region = spec.get(key)
    if region is None:
        return None
    region = [float(x) for x in region]
    if len(region) != 4:
        raise GraphError(f"region {region} must be [lat_min, lat_max, lon_min, lon_max] in degrees")
    return region


def _widen(region, margin):
    lat_min, lat_max, lon_min, lon_max = region
    return [max(-90.0, lat_min - margin), min(90.0, lat_max + margin),
            lon_min - margin, lon_max + margin]  # fmt: skip


def _level(spec, key="level") -> int:
    level = int(spec.get(key, -1))
    if level < 0:
        raise GraphError(f"icosahedral {key} must be a non-negative integer, got {spec.get(key)}")
    return level


def build_nodes(name: str, spec: dict) -> grids.NodeSet:
    """Build one node set from its spec (see the module docstring for the types)."""
    kind = spec.get("type")
    if kind == "grid":
        return grids.grid_from_name(spec["grid"], name)
    if kind == "latlon":
        return grids.latlon_grid(float(spec["resolution"]), name, _region(spec))
    if kind == "icosahedral":
        mesh = grids.icosahedral_mesh(_level(spec), name)
        region = _region(spec)
        if region is None:
            return mesh
        return grids.cut_out(mesh, _widen(region, float(spec.get("margin_deg", 0.0))))
    if kind == "stretched_grid":
        region = _region(spec)
        fine = grids.latlon_grid(float(spec["regional_resolution"]), name, region)
        return grids.stretched(fine, grids.grid_from_name(spec["global_grid"], name), region, name)
    if kind == "stretched_mesh":
        level, fine_level = _level(spec), _level(spec, "fine_level")
        if fine_level < level:
            raise GraphError(f"stretched mesh: fine_level {fine_level} < level {level}")
        fine = grids.icosahedral_mesh(fine_level, name)
        region = _widen(_region(spec), float(spec.get("margin_deg", 0.0)))
        keep = (fine.mesh_levels <= level) | grids.in_box(fine.latlon, region)
        nodes = grids.select(fine, keep, meta={"finest_level": fine_level})
        return nodes
    if kind == "points":
        if "path" in spec:
            path = Path(spec["path"])
            if not path.is_file():
                raise GraphError(f"point set {name!r}: file {path} not found")
            with np.load(path) as f:
                return grids.point_set(f["latitudes"], f["longitudes"], name)
        return grids.point_set(spec["latitudes"], spec["longitudes"], name)
    known = "grid, latlon, icosahedral, stretched_grid, stretched_mesh, points"
    raise GraphError(f"node set {name!r}: unknown type {kind!r}; choose one of {known}")


#: Threads copying finished edge arrays from the GPU (five per edge set). The o1280_l8 build
#: on an H200 spent 0.62 of its 1.10 s in one-at-a-time ``.cpu()`` copies of its 1 GB of edge
#: arrays into fresh pageable host memory, ~1.6 GB/s: the host side, not the bus, sets the pace.
DOWNLOAD_THREADS = 8


def build_graph(spec: dict, spec_hash: str = "") -> Graph:
    """Build every node and edge set of ``spec`` (a plain dict; see the module docstring).

    Node sets are built concurrently, one thread each; on a GPU, finished edge arrays are copied
    to the host on :data:`DOWNLOAD_THREADS` threads while the next edge sets are built. The
    seconds of each stage (``nodes (all sets)``, ``nodes/<set> (own thread)``, ``<edge
    set>/search``, ``<edge set>/sort+attrs``, ``copies to host (rest)``) are in
    ``graph.meta["build_timings_s"]``.
    """
    start = time.perf_counter()
    if not spec.get("nodes") or not spec.get("edges"):
        raise GraphError("graph spec needs non-empty 'nodes' and 'edges' sections")
    title = f"graph {spec.get('name', 'graph')}"
    device = search_device()
    on_gpu = device is not None and device.type == "cuda"
    clock = _StageClock(device if on_gpu else None)
    nodes = {}
    try:
        with Progress(len(spec["nodes"]), f"{title}: node sets", unit="set") as bar, \
                ThreadPoolExecutor(len(spec["nodes"])) as pool:  # fmt: skip
            # Node sets are independent: each is built on its own thread (numpy releases the
            # GIL in its array loops), with its unit vectors and, on a GPU, its device copy.
            jobs = {name: pool.submit(_node_set, name, dict(s), device if on_gpu else None)
                    for name, s in spec["nodes"].items()}  # fmt: skip
            for name, job in jobs.items():
                bar.set_postfix(name)
                nodes[name], clock.seconds[f"nodes/{name} (own thread)"] = job.result()
                bar.update()
        clock.stop("nodes (all sets)")
        edge_specs = {name: dict(s) for name, s in spec["edges"].items()}
        for name, s in edge_specs.items():
            for end in ("src", "dst"):
                if s.get(end) not in nodes:
                    raise GraphError(
                        f"edge set {name!r}: {end}={s.get(end)!r} is not a node set "
                        f"(have {sorted(nodes)})"
                    )
        # One step per block of destinations searched (squall.graphs.edges.SEARCH_CHUNK).
        steps = sum(search_steps(s, nodes[s["dst"]]) for s in edge_specs.values())
        edges = {}
        with Progress(steps, f"{title}: edge sets", unit="step") as bar, \
                ThreadPoolExecutor(DOWNLOAD_THREADS) as downloads:  # fmt: skip
            for name, s in edge_specs.items():
                bar.set_postfix(f"{name} ({s.get('type')})")
                src_set, dst_set = nodes[s["src"]], nodes[s["dst"]]
                pairs = build_edges(s, src_set, dst_set, bar.update, keep_on_device=on_gpu)
                clock.stop(f"{name}/search")
                if on_gpu:  # copied to the host while the next edge sets are built
                    edges[name] = EdgeSet._from_pairs_on(device, name, src_set, dst_set, *pairs,
                                                         pool=downloads)  # fmt: skip
                else:
                    edges[name] = EdgeSet.from_pairs(name, src_set, dst_set, *pairs)
                clock.stop(f"{name}/sort+attrs")
            edges = {name: e() if callable(e) else e for name, e in edges.items()}
        clock.stop("copies to host (rest)")
        _check_boundaries(spec, nodes, edges)
    except KeyError as err:
        raise GraphError(f"graph spec {spec.get('name')!r}: missing key {err}") from None
    except (TypeError, ValueError) as err:
        raise GraphError(f"graph spec {spec.get('name')!r}: bad value ({err})") from None
    finally:
        for node_set in nodes.values():
            node_set.drop_device()
    return Graph(spec.get("name", "graph"), spec, spec_hash, nodes, edges,
                 time.perf_counter() - start, {"build_timings_s": clock.seconds})  # fmt: skip


def _node_set(name: str, spec: dict, device: torch.device | None) -> tuple[grids.NodeSet, float]:
    """:func:`build_nodes` with the unit vectors computed and, with a ``device``, copied there;
    and the seconds it took."""
    start = time.perf_counter()
    nodes = build_nodes(name, spec)
    nodes.xyz  # noqa: B018 (computed once and kept)
    if device is not None:
        nodes.on_device(device)
        torch.cuda.synchronize(device)
    return nodes, round(time.perf_counter() - start, 4)


class _StageClock:
    """Seconds between successive :meth:`stop` calls (on a GPU after its queued work is done)."""

    def __init__(self, device: torch.device | None):
        self.device, self.seconds, self.last = device, {}, time.perf_counter()

    def stop(self, stage: str) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 4)
        self.last = now


def _check_boundaries(spec: dict, nodes: dict, edges: dict) -> None:
    """Every node set with a boundary: each interior point is a source of the edge sets leaving
    that set (:func:`squall.graphs.boundary.check_coverage`)."""
    for name, nodes_set in nodes.items():
        bspec = boundary_spec(spec, name)
        if bspec is None:
            continue
        mask = boundary_mask(nodes_set, bspec, dict(spec["nodes"][name]))
        leaving = [e for e in edges.values() if e.src == name]
        if not leaving:
            raise GraphError(f"node set {name!r} has a boundary but no edge set leaves it")
        out_degree = sum(np.diff(e.rowptr) for e in leaving)
        check_coverage(nodes_set, mask, out_degree, "/".join(e.name for e in leaving))
