"""The Deeper SSD paper's Tables 1, 4 and 6 beside the nets this project builds.

The tables are transcribed from the paper as printed. Every comparison is computed
from static shapes of the built feature nets (``SSDModel.feature_net``); each cell that
disagrees carries a note saying why the built net differs (docs/errata.md has the full text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import shapes
from ..proto import caffe_pb2
from . import zoo

__all__ = ["TABLE1", "MODULE_TABLES", "markdown_table", "table1", "module_table", "format_table1",
           "format_module_table"]


# ---------------------------------------------------------------------------------------------
# Table 1: (layer, Deeper SSD500 outputs, k/s/p, size, SSD300 outputs, k/s/p, size) as printed

TABLE1: Tuple[Tuple[str, str, str, str, str, str, str], ...] = (
    ("conv1_1", "64", "3x3/1/1", "500", "64", "3x3/1/1", "300"),
    ("conv1_2", "64", "3x3/1/1", "500", "64", "3x3/1/1", "300"),
    ("pool1", "", "", "250", "", "", "150"),
    ("conv2_1", "128", "3x3/1/1", "250", "128", "150x150", "150"),
    ("conv2_2", "128", "3x3/1/1", "250", "128", "150x150", "150"),
    ("pool2", "", "", "125", "", "", "75"),
    ("conv3_1", "256", "3x3/1/1", "125", "256", "75x75", "75"),
    ("conv3_2", "256", "3x3/1/1", "125", "256", "75x75", "75"),
    ("conv3_3", "256", "3x3/1/1", "125", "256", "75x75", "75"),
    ("pool3", "", "", "63", "", "", "75"),
    ("conv4_1", "512", "3x3/1/1", "63", "512", "3x3/1/1", "38"),
    ("conv4_2", "512", "3x3/1/1", "63", "512", "3x3/1/1", "38"),
    ("conv4_3", "512", "3x3/1/1", "63", "512", "3x3/1/1", "38"),
    ("pool4", "", "", "32", "", "", "19"),
    ("conv5_1", "512", "3x3/1/1", "32", "512", "3x3/1/1", "19"),
    ("conv5_2", "512", "3x3/1/1", "32", "512", "3x3/1/1", "19"),
    ("conv5_3", "512", "3x3/1/1", "32", "512", "3x3/1/1", "19"),
    ("pool5", "", "", "32", "", "", "19"),
    ("fc6", "1024", "3x3/1/6", "32", "1024", "3x3/1/6", "19"),
    ("fc7", "1024", "1x1/1/0", "32", "1024", "1x1/1/0", "19"),
    ("conv6_1", "256", "1x1/1/0", "32", "256", "1x1/1/0", "19"),
    ("conv6_2", "512", "3x3/2/1", "16", "512", "3x3/2/1", "10"),
    ("conv7_1", "128", "1x1/1/0", "16", "128", "1x1/1/0", "10"),
    ("conv7_2", "256", "3x3/1/0", "16", "256", "3x3/2/1", "5"),
    ("conv8_1", "128", "1x1/1/0", "16", "128", "1x1/1/0", "5"),
    ("conv8_2", "256", "3x3/1/0", "14", "256", "3x3/1/0", "3"),
    ("conv9_1", "128", "1x1/1/0", "14", "128", "1x1/1/0", "3"),
    ("conv9_2", "256", "3x3/1/0", "12", "256", "3x3/1/0", "1"),
    ("conv10_1", "128", "1x1/1/0", "12", "", "", ""),
    ("conv10_2", "256", "3x3/1/0", "10", "", "", ""),
    ("conv11_1", "128", "1x1/1/0", "10", "", "", ""),
    ("conv11_2", "256", "3x3/1/0", "8", "", "", ""),
    ("conv12_1", "128", "1x1/1/0", "8", "", "", ""),
    ("conv12_2", "256", "3x3/1/0", "6", "", "", ""),
)

#: why a built cell differs from the printed one: (model, layer, column) -> explanation
TABLE1_NOTES: Dict[Tuple[str, str, str], str] = {
    **{("ssd300", layer, "k/s/p"): "the k/s/p cell holds the output size (a typesetting slip); "
       "VGG16's convolutions are 3x3/1/1 here as everywhere else"
       for layer in ("conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3")},
    ("ssd300", "pool3", "size"): "printed 75x75, but Caffe pools with ceil rounding: "
    "ceil((75 - 2)/2) + 1 = 38 (and conv4_x is printed 38x38 right below)",
    ("deeper_ssd500", "conv7_2", "k/s/p"): "printed 3x3/1/0 with a 16x16 output; only pad 1 "
    "keeps 16x16 (pad 0 gives 14, and then conv8_2 … conv12_2 could not be 14 … 6). §3.2 says "
    "the stride of conv6_2 changed from 2 to 1, yet the table keeps conv6_2 at 3x3/2/1 (32 → 16): "
    "the change that yields Table 1 is conv7_2's stride (SSD300: 3x3/2/1) becoming 1",
}
#: cells that agree but omit a parameter
TABLE1_REMARKS: Dict[str, str] = {
    "fc6": "the table prints 3x3/1/6; the dilation 6 of the SSD fork's reduced VGG16 is not printed",
}

_BUILT = (("deeper_ssd500", 1, 2, 3), ("ssd300", 4, 5, 6))


@dataclass
class Cell:
    paper: str
    built: str

    @property
    def agrees(self) -> bool:
        return self.paper == self.built


@dataclass
class Table1Row:
    layer: str
    cells: Dict[Tuple[str, str], Cell]          # (model, column) -> cell
    notes: Dict[str, List[str]]                 # model -> explanations (disagreements, remarks)


def _built_rows(model_name: str) -> Dict[str, shapes.LayerRow]:
    net, _, _ = zoo.get(model_name).feature_net()
    return {r.name: r for r in shapes.infer_shapes(net, caffe_pb2.TEST)}


def _undilated(geometry: str) -> str:
    return geometry.split("/d")[0]


def table1() -> List[Table1Row]:
    """Table 1 row by row beside the built ``deeper_ssd500`` and ``ssd300``."""
    built = {name: _built_rows(name) for name, *_ in _BUILT}
    rows = []
    for entry in TABLE1:
        layer, cells, notes = entry[0], {}, {}
        for model, i_out, i_ksp, i_size in _BUILT:
            if not entry[i_size]:
                continue
            row = built[model][layer]
            n, c, h, w = row.shapes[0]
            is_pool = row.type == "Pooling"
            mine = {"outputs": Cell(entry[i_out], "" if is_pool else str(c)),
                    "k/s/p": Cell(entry[i_ksp], "" if is_pool else _undilated(row.geometry)),
                    "size": Cell(f"{entry[i_size]}x{entry[i_size]}", f"{h}x{w}")}
            notes[model] = [f"{model} {column}: " + TABLE1_NOTES.get((model, layer, column),
                                                                   "UNEXPLAINED disagreement")
                            for column, cell in mine.items() if not cell.agrees]
            if layer in TABLE1_REMARKS:
                notes[model].append(f"{model}: {TABLE1_REMARKS[layer]}")
            cells.update({(model, column): cell for column, cell in mine.items()})
        rows.append(Table1Row(layer, cells, notes))
    return rows


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in body])


def format_table1(rows: Optional[List[Table1Row]] = None) -> str:
    """Markdown: paper and built (outputs k/s/p size) per model, marked agree/DISAGREE, with
    numbered notes explaining every disagreement."""
    rows = rows if rows is not None else table1()
    header = ["layer"]
    for model, *_ in _BUILT:
        header += [f"{model} paper", f"{model} built", ""]
    body, notes = [], []
    for row in rows:
        cells = [row.layer]
        for model, *_ in _BUILT:
            mine = [row.cells[(model, col)] for col in ("outputs", "k/s/p", "size")
                    if (model, col) in row.cells]
            if not mine:
                cells += ["–", "–", ""]
                continue
            ids = []
            for note in row.notes.get(model, []):
                notes.append(note)
                ids.append(str(len(notes)))
            mark = "agree" if all(c.agrees for c in mine) else "DISAGREE"
            cells += [" ".join(c.paper for c in mine if c.paper),
                      " ".join(c.built for c in mine if c.built),
                      mark + (f" [{', '.join(ids)}]" if ids else "")]
        body.append(cells)
    disagreements = sum(1 for row in rows for c in row.cells.values() if not c.agrees)
    text = ["Paper Table 1 (outputs, kernel/stride/pad, output size) beside the built nets: "
            f"{disagreements} cells disagree, each explained below", "",
            markdown_table(header, body), ""]
    return "\n".join(text + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]) + "\n"


# ---------------------------------------------------------------------------------------------
# Tables 4 and 6: the modules as printed, beside the built layers

@dataclass(frozen=True)
class PaperOp:
    """One printed operation, matched to a built layer (suffix after ``<module>_``)."""
    printed: str
    layer: str
    num_output: Optional[int] = None
    kernel: Optional[int] = None
    stride: Optional[int] = None          # only where the paper states it
    note: str = ""                        # why the built layer differs (or what was chosen)


MODULE_TABLES: Dict[str, Tuple[str, str, Tuple[Tuple[str, str, Tuple[PaperOp, ...]], ...]]] = {
    "table4": ("deeper_ssd500_up123_concat", "up-sampling modules (Table 4), Concat connection", (
        ("up1", "conv4_3 ← conv6_2: 3x3x512 Deconv, 3x3x512 Conv, 3x3x512 Deconv, 3x3x512 Conv, "
                "ReLU; Concat, ReLU (text: two deconvolutions of stride 3, each enlarging ×3)", (
            PaperOp("3x3x512 Deconv, stride 3", "deconv1", 512, 3, 3,
                    "stride 2 pad 1 (16 → 31): two stride-3 deconvolutions give ×9 (16 → 48 → 144); "
                    "conv6_2 (stride 32) meets conv4_3 (stride 8) after ×4 = two stride-2 steps"),
            PaperOp("3x3x512 Conv", "conv1", 512, 3, note="pad 1 (not printed) keeps the size"),
            PaperOp("3x3x512 Deconv, stride 3", "deconv2", 512, 3, 3, "stride 2 pad 0 (31 → 63 = conv4_3)"),
            PaperOp("3x3x512 Conv, ReLU", "conv2", 512, 3, note="pad 1 (not printed)"),
            PaperOp("Concat (conv4_3, up-sampled), ReLU", ""))),
        ("up2", "fc7 ← conv10_2: 3x3x512 Deconv, 1x1x512 Conv, ReLU; Concat, ReLU", (
            PaperOp("3x3x512 Deconv", "deconv1", 512, 3,
                    note="stride 3 (not printed for this module; 10 → 30, as the text's ×3)"),
            PaperOp("1x1x512 Conv, ReLU", "conv1", 512, 1,
                    note="pad 1 (not printed): 30 → 32 = fc7; no 3x3 deconvolution with pad < 3 takes "
                         "10 to 32 (s·9 + 3 − 2p = 32 has no such solution); the padded ring holds the bias only"),
            PaperOp("Concat (fc7, up-sampled), ReLU", ""))),
        ("up3", "conv7_2 ← conv12_2: 1x1x128 Deconv, 1x1x128 Conv, ReLU; Concat, ReLU", (
            PaperOp("1x1x128 Deconv", "deconv1", 128, 1, note="stride 3 (not printed): 6 → 16 = conv7_2"),
            PaperOp("1x1x128 Conv, ReLU", "conv1", 128, 1),
            PaperOp("Concat (conv7_2, up-sampled), ReLU", ""))))),
    "table6": ("deeper_ssd500_down12_eltwise", "down-sampling modules (Table 6), Eltwise-sum connection", (
        ("down1", "conv4_3 → conv9_2: Pool (stride 2), 3x3x256 Conv, 1x1x512 Conv, 1x1x256 Conv, ReLU; "
                  "conv9_2: 1x1x256 Deconv (stride 2), ReLU; Eltwise-sum, ReLU, Normalize", (
            PaperOp("Pool, stride 2", "pool1", None, None, 2,
                    "MAX 2x2 (kernel not printed); the text orders pool before the convolutions, "
                    "the table prints it between them"),
            PaperOp("3x3x256 Conv", "conv1", 256, 3, note="pad 1 (not printed)"),
            PaperOp("1x1x512 Conv", "conv2", 512, 1),
            PaperOp("1x1x256 Conv, ReLU", "conv3", 256, 1),
            PaperOp("1x1x256 Deconv, stride 2, ReLU", "deconv1", 256, 1, 2),
            PaperOp("(not in the paper)", "crop",
                    note="32x32 cannot be summed with 23x23: Crop from offset 4 (centred; it also "
                         "aligns the receptive-field centres exactly, both maps having stride 16)"),
            PaperOp("Eltwise-sum, ReLU, Normalize", "",
                    note="Normalize = the head's down1_norm (scale 20, as conv4_3_norm)"))),
        ("down2", "fc7 → conv12_2: Pool, 3x3x512 Conv, 1x1x256 Conv, 1x1x256 Conv, ReLU; "
                  "conv12_2: 1x1x256 Deconv, ReLU; Eltwise-sum, ReLU, Normalize", (
            PaperOp("Pool", "pool1", None, None, None, "MAX 2x2 stride 2, as module 1"),
            PaperOp("3x3x512 Conv", "conv1", 512, 3, note="pad 1 (not printed)"),
            PaperOp("1x1x256 Conv", "conv2", 256, 1),
            PaperOp("1x1x256 Conv, ReLU", "conv3", 256, 1),
            PaperOp("1x1x256 Deconv, ReLU", "deconv1", 256, 1, None, "stride 2, as module 1 (6 → 11)"),
            PaperOp("(not in the paper)", "crop", note="16x16 cannot be summed with 11x11: Crop from "
                    "offset 2 (centred)"),
            PaperOp("Eltwise-sum, ReLU, Normalize", "",
                    note="Normalize = the head's down2_norm (scale 20)"))))),
}


@dataclass
class ModuleRow:
    printed: str
    layer: str
    type: str
    geometry: str
    output: str
    agrees: bool
    note: str


def module_table(table: str) -> Tuple[str, str, List[Tuple[str, str, List[ModuleRow]]]]:
    """The modules of ``table`` ("table4" or "table6") as built: one row per printed op."""
    try:
        model, title, modules = MODULE_TABLES[table]
    except KeyError:
        raise KeyError(f"no module table {table!r}; choose from {', '.join(MODULE_TABLES)}") from None
    built = _built_rows(model)
    out = []
    for module, caption, ops in modules:
        rows = []
        for op in ops:
            name = f"{module}_{op.layer}" if op.layer else module
            row = built[name]
            n, c, h, w = row.shapes[0]
            kernel = int(row.geometry.split("x")[0]) if row.geometry else None
            stride = int(row.geometry.split("/")[1]) if row.geometry else None
            checks = ((op.num_output, c if row.type != "Pooling" else None), (op.kernel, kernel),
                      (op.stride, stride))
            agrees = op.printed != "(not in the paper)" and all(
                want is None or want == have for want, have in checks)
            rows.append(ModuleRow(op.printed, name, row.type, row.geometry, f"{c}x{h}x{w}", agrees,
                                  op.note))
        out.append((module, caption, rows))
    return model, title, out


def format_module_table(table: str) -> str:
    model, title, modules = module_table(table)
    text = [f"Paper {title}, as built in {model} (output C×H×W at 500x500)", ""]
    for module, caption, rows in modules:
        text += [f"{module}: {caption}", ""]
        body = [[r.printed, r.layer, r.type, r.geometry, r.output, "agree" if r.agrees else "DISAGREE",
                 r.note] for r in rows]
        header = ["paper", "built layer", "type", "k/s/p", "output", "", "note"]
        text += [markdown_table(header, body), ""]
    return "\n".join(text).rstrip() + "\n"
