"""Save and load graphs as one ``.npz`` file keyed by a content hash of the spec.

The file ``<cache_dir>/<name>-<hash>.npz`` holds every array plus a JSON header with the spec,
its hash and the format version. An unchanged spec is loaded, never rebuilt; a changed spec gets a
new hash and a new file. Files are written to a temporary name and renamed, so processes that build
the same graph at once never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from squall.config import as_flag, to_container
from squall.errors import GraphCacheError, GraphError
from squall.graphs.edges import resolved_spec
from squall.graphs.graph import EdgeSet, Graph, build_graph
from squall.graphs.grids import NodeSet

log = logging.getLogger(__name__)

# Bump when the arrays or their meaning change: old files then hash to different names.
FORMAT_VERSION = 1
_NODE_FIELDS = ("latlon", "area", "mesh_levels", "faces")
_EDGE_FIELDS = ("colptr", "row", "rowptr", "csr_perm", "attrs")


def to_plain(spec) -> dict:
    """A plain dict from a dict or OmegaConf node (interpolations resolved), safe to hash."""
    return json.loads(json.dumps(to_container(spec)))


def spec_hash(spec: dict) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of the spec and the format version.

    Edge specs are hashed with their defaults filled in (:func:`squall.graphs.edges.resolved_spec`):
    a cutoff spec without ``max_neighbours`` and one with the default cap are the same graph.
    """
    body = {k: v for k, v in spec.items() if k not in ("name", "rebuild")}
    if isinstance(body.get("edges"), dict):
        body["edges"] = {k: resolved_spec(v) if isinstance(v, dict) else v
                         for k, v in body["edges"].items()}  # fmt: skip
    text = json.dumps({"format": FORMAT_VERSION, "spec": body}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(spec: dict, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"{spec.get('name', 'graph')}-{spec_hash(spec)}.npz"


def save_graph(graph: Graph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT_VERSION,
        "name": graph.name,
        "spec": graph.spec,
        "spec_hash": graph.spec_hash,
        "build_seconds": graph.build_seconds,
        "nodes": {k: {"meta": v.meta} for k, v in graph.nodes.items()},
        "edges": {k: [e.src, e.dst] for k, e in graph.edges.items()},
    }
    arrays = {"__header__": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for name, nodes in graph.nodes.items():
        for f in _NODE_FIELDS:
            if getattr(nodes, f) is not None:
                arrays[f"nodes/{name}/{f}"] = getattr(nodes, f)
    for name, edges in graph.edges.items():
        for f in _EDGE_FIELDS:
            arrays[f"edges/{name}/{f}"] = getattr(edges, f)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def load_graph(path: str | Path, expected_hash: str | None = None) -> Graph:
    """Read a graph file; a corrupt or stale file raises :class:`GraphCacheError`."""
    path = Path(path)
    hint = f"delete {path} or rebuild with graph.rebuild=true"
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(bytes(f["__header__"]).decode())
            data = {k: f[k] for k in f.files if k != "__header__"}
    except FileNotFoundError:
        raise GraphCacheError(f"graph file {path} not found") from None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise GraphCacheError(f"graph cache file {path} is corrupt ({reason}); {hint}") from None
    if header.get("format") != FORMAT_VERSION:
        raise GraphCacheError(
            f"graph cache file {path} is stale (format {header.get('format')}, this squall "
            f"reads {FORMAT_VERSION}); {hint}"
        )
    if expected_hash is not None and header.get("spec_hash") != expected_hash:
        raise GraphCacheError(
            f"graph cache file {path} is stale (spec hash {header.get('spec_hash')} != "
            f"{expected_hash}); {hint}"
        )
    try:
        nodes = {}
        for name, info in header["nodes"].items():
            arrays = {f: data.get(f"nodes/{name}/{f}") for f in _NODE_FIELDS}
            nodes[name] = NodeSet(name, meta=info["meta"], **arrays)
        edges = {}
        for name, (src, dst) in header["edges"].items():
            arrays = {f: data[f"edges/{name}/{f}"] for f in _EDGE_FIELDS}
            edges[name] = EdgeSet(name, src, dst, len(nodes[src]), len(nodes[dst]), **arrays)
    except KeyError as err:
        raise GraphCacheError(
            f"graph cache file {path} is corrupt (missing {err}); {hint}"
        ) from None
    return Graph(header["name"], header["spec"], header["spec_hash"], nodes, edges,
                 header["build_seconds"], {"loaded_from": str(path)})  # fmt: skip


def load_or_build(spec, cache_dir: str | Path | None, rebuild: bool = False) -> Graph:
    """Load the cached graph of ``spec`` or build and cache it.

    ``spec`` is a dict or the Hydra ``graph`` node. ``cache_dir=None`` builds without caching.
    ``rebuild=True`` (or ``rebuild: true`` in the spec) ignores and replaces an existing file.
    """
    spec = to_plain(spec)
    if not isinstance(spec, dict):
        raise GraphError(f"graph spec must be a mapping, got {type(spec).__name__}")
    rebuild = rebuild or as_flag(spec.pop("rebuild", False), "graph.rebuild")
    key = spec_hash(spec)
    if cache_dir is None:
        return build_graph(spec, key)
    path = cache_path(spec, cache_dir)
    if path.exists() and not rebuild:
        log.info("graph %s: loading %s", spec.get("name"), path)
        return load_graph(path, key)
    graph = build_graph(spec, key)
    save_graph(graph, path)
    log.info("graph %s: built in %.1f s, cached at %s", graph.name, graph.build_seconds, path)
    return graph
