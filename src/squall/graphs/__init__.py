"""Graphs of AIFS-class models: node sets on the sphere, edge sets, attributes and a disk cache."""

from squall.graphs.graph import EdgeSet, Graph, build_graph, build_nodes
from squall.graphs.grids import NodeSet
from squall.graphs.store import load_graph, load_or_build, save_graph

__all__ = [
    "EdgeSet", "Graph", "NodeSet", "build_graph", "build_nodes",
    "load_graph", "load_or_build", "save_graph",
]  # fmt: skip
