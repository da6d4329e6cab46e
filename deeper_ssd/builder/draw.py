"""Draw a net prototxt as a graph of layers and blobs with their shapes, like Caffe's draw_net.

Graphviz is not needed: the layout (layers and blobs in ranks by longest path from the input,
ordered within a rank by the mean position of their neighbours) is computed here and drawn with
matplotlib, to any format matplotlib writes (png, svg, pdf). In-place layers (ReLU, BatchNorm,
Scale) are folded into the box of the layer whose blob they rewrite. ``.dot`` writes Graphviz
source instead, for users who have ``dot``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from .. import shapes
from ..layers import format_shape
from ..proto import caffe_pb2

__all__ = ["Graph", "net_graph", "layout", "draw", "to_dot"]

#: box colours by layer type (others: grey)
COLOURS = {
    "Convolution": "#9ecae1", "Deconvolution": "#fdae6b", "Pooling": "#a1d99b", "Concat": "#fdd0a2",
    "Eltwise": "#fdd0a2", "Crop": "#fdd0a2", "Normalize": "#dadaeb", "PriorBox": "#c7e9c0",
    "Permute": "#f0f0f0", "Flatten": "#f0f0f0", "Reshape": "#f0f0f0", "Softmax": "#fcbba1",
    "DetectionOutput": "#fc9272", "DetectionEvaluate": "#fc9272", "MultiBoxLoss": "#fc9272",
    "Input": "#ffffff", "AnnotatedData": "#ffffff",
}


@dataclass
class Node:
    key: str
    label: str
    kind: str                      # "layer" or "blob"
    type: str = ""
    rank: int = 0
    x: float = 0.0


@dataclass
class Graph:
    """Layer and blob nodes with directed edges (blob → layer for bottoms, layer → blob for tops)."""
    name: str
    nodes: Dict[str, Node] = field(default_factory=dict)
    edges: List[Tuple[str, str]] = field(default_factory=list)


def _layer_rows(net: caffe_pb2.NetParameter, phase: int):
    """(name, type, geometry, bottoms, tops, top shapes) of the layers in ``phase``; a net
    whose shapes cannot be inferred raises the LayerError naming the layer (no drawing)."""
    return [(r.name, r.type, r.geometry, r.bottoms, r.tops, r.shapes)
            for r in shapes.infer_shapes(net, phase)]


def net_graph(net: caffe_pb2.NetParameter, phase: int = caffe_pb2.TEST) -> Graph:
    """The graph of ``net`` in ``phase``; blob nodes carry their shapes."""
    graph = Graph(net.name or "net")
    latest: Dict[str, str] = {}          # blob name -> key of the node holding its latest value
    producer: Dict[str, str] = {}        # blob node key -> layer node key
    for name, type_, geometry, bottoms, tops, top_shapes in _layer_rows(net, phase):
        if tops and list(tops) == list(bottoms) and bottoms[0] in latest:
            owner = producer.get(latest[bottoms[0]])     # in place: fold into the producer
            if owner:
                graph.nodes[owner].label += f"\n+ {name} ({type_})"
                continue
        key = f"layer:{name}"
        label = f"{name}\n{type_}" + (f" {geometry}" if geometry else "")
        graph.nodes[key] = Node(key, label, "layer", type_)
        for bottom in bottoms:
            graph.edges.append((latest[bottom], key))
        for i, top in enumerate(tops):
            blob_key = f"blob:{top}:{len(graph.nodes)}"
            graph.nodes[blob_key] = Node(blob_key, f"{top}\n{format_shape(top_shapes[i])}", "blob")
            graph.edges.append((key, blob_key))
            latest[top], producer[blob_key] = blob_key, key
    return graph


def layout(graph: Graph, sweeps: int = 4) -> int:
    """Assign ``rank`` (longest path from a source) and ``x`` (ordered by the mean x of each
    node's neighbours, pushed right to keep one unit apart within a rank) to every node; returns the
    number of ranks."""
    preds: Dict[str, List[str]] = {k: [] for k in graph.nodes}
    succs: Dict[str, List[str]] = {k: [] for k in graph.nodes}
    for a, b in graph.edges:
        succs[a].append(b)
        preds[b].append(a)
    for key in graph.nodes:                     # nodes were added in topological order
        node = graph.nodes[key]
        node.rank = max((graph.nodes[p].rank + 1 for p in preds[key]), default=0)
    ranks: Dict[int, List[Node]] = {}
    for node in graph.nodes.values():
        ranks.setdefault(node.rank, []).append(node)
    for nodes in ranks.values():
        for i, node in enumerate(nodes):
            node.x = i - (len(nodes) - 1) / 2

    # a blob read by many layers (the image, read by every PriorBox) would drag them all to
    # one place: it neither pulls nor is pulled
    hubs = {k for k, s in succs.items() if len(s) > 6}

    def place(nodes: List[Node], neighbours: Dict[str, List[str]]) -> None:
        desired = []
        for node in nodes:
            xs = [] if node.key in hubs else [graph.nodes[k].x for k in neighbours[node.key]
                                              if k not in hubs]
            desired.append(sum(xs) / len(xs) if xs else node.x)
        order = sorted(range(len(nodes)), key=lambda i: desired[i])
        xs, last = [], None
        for i in order:
            x = desired[i] if last is None else max(desired[i], last + 1.0)
            xs.append(x)
            last = x
        for i, x in zip(order, xs):
            nodes[i].x = x

    for _ in range(sweeps):
        for r in sorted(ranks)[1:]:
            place(ranks[r], preds)
        for r in sorted(ranks, reverse=True)[1:]:
            place(ranks[r], succs)
    for r in sorted(ranks)[1:]:
        place(ranks[r], preds)
    for hub in hubs:                  # above its first reader, with its producer
        graph.nodes[hub].x = graph.nodes[succs[hub][0]].x
        for p in preds[hub]:
            graph.nodes[p].x = graph.nodes[hub].x
    return len(ranks)


def to_dot(graph: Graph, rankdir: str = "TB") -> str:
    """Graphviz source: layers as boxes, blobs as octagons (Caffe's draw_net style)."""
    lines = [f'digraph "{graph.name}" {{', f"  rankdir={rankdir};"]
    for node in graph.nodes.values():
        label = node.label.replace('"', r'\"').replace("\n", r"\n")
        if node.kind == "layer":
            colour = COLOURS.get(node.type, "#d9d9d9")
            lines.append(f'  "{node.key}" [shape=record, style=filled, fillcolor="{colour}", '
                         f'label="{label}"];')
        else:
            lines.append(f'  "{node.key}" [shape=octagon, label="{label}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def draw(net: caffe_pb2.NetParameter, out: str, phase: int = caffe_pb2.TEST, rankdir: str = "TB",
         dpi: int = 80) -> Path:
    """Write the drawing of ``net`` to ``out`` (.png, .svg, .pdf … or .dot)."""
    out_path = Path(out)
    graph = net_graph(net, phase)
    if out_path.suffix.lower() == ".dot":
        out_path.write_text(to_dot(graph, rankdir))
        return out_path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = layout(graph)
    xs = [n.x for n in graph.nodes.values()]
    span = max(xs) - min(xs) + 1
    unit_x, unit_y = 2.4, 0.62                  # inches per layout unit across / along ranks
    if rankdir == "LR":
        size = (count * unit_x * 0.75, span * unit_y * 1.6)
        pos = {k: (n.rank * unit_x * 0.75, -(n.x - min(xs)) * unit_y * 1.6)
               for k, n in graph.nodes.items()}
    else:
        size = (span * unit_x, count * unit_y)
        pos = {k: ((n.x - min(xs)) * unit_x, -n.rank * unit_y) for k, n in graph.nodes.items()}
    fig = plt.figure(figsize=(max(size[0], 4), max(size[1], 3)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    for a, b in graph.edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.6, shrinkA=9, shrinkB=9))
    for key, node in graph.nodes.items():
        x, y = pos[key]
        if node.kind == "layer":
            box = dict(boxstyle="round,pad=0.3", fc=COLOURS.get(node.type, "#d9d9d9"),
                       ec="#333333", lw=0.6)
            ax.text(x, y, node.label, ha="center", va="center", fontsize=6.5, bbox=box, zorder=3)
        else:
            ax.text(x, y, node.label, ha="center", va="center", fontsize=5.5, color="#222222",
                    bbox=dict(boxstyle="round4,pad=0.2", fc="#ffffe0", ec="#999999", lw=0.4), zorder=3)
    ax.set_xlim(min(p[0] for p in pos.values()) - unit_x, max(p[0] for p in pos.values()) + unit_x)
    ax.set_ylim(min(p[1] for p in pos.values()) - unit_y, max(p[1] for p in pos.values()) + unit_y)
    ax.set_title(graph.name, fontsize=9)
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path
