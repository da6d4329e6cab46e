#!/usr/bin/env python3
"""Images per second of ONE data worker (one process, OpenCV single-threaded), by the wall
clock and per CPU second:

* decode only: parse the AnnotatedDatum and cv::imdecode its image;
* the full SSD training transform of ssd_pascal.py (distort, expand, the seven batch samplers,
  crop, random interpolation warp, mirror, mean) at 300x300 and at 500x500;
* the SSD test transform (JPEG re-encode, LINEAR warp, mean) at 500x500.

Then the data layer's loader as training uses it (deeper_ssd.data.loader.BatchLoader, worker
processes, prefetch 3): images/s of the SSD training transform at 300x300 against the worker
count (--workers, default 1,2,4 and this machine's default), with float32 batches (the CPU
default) and uint8 batches (a CUDA net's default: mean and scale applied on the device).

Reads the bundled sample set (generated into a temporary folder unless --db is given).
Prints tables; the docs/performance.md "Data loading" section records the numbers.

    python bench/data.py [--db path/to/trainval_lmdb] [--images 300] [--workers 1,2,4]
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deeper_ssd.data.annoset import AnnotatedDB, parse_record  # noqa: E402
from deeper_ssd.data.loader import AnnotatedBatches, BatchLoader, default_workers, usable_cores  # noqa: E402
from deeper_ssd.data.sample import make_sample_set  # noqa: E402
from deeper_ssd.data.transforms import SSDTransformer, decode_image, sample_from_datum  # noqa: E402
from deeper_ssd.proto import caffe_pb2  # noqa: E402

# the data layer of ssd_pascal.py's train net (docs/semantics.md, "SSD300 reference settings"), resize size substituted
SSD_TRAIN_LAYER = """
transform_param {
  mirror: true  mean_value: 104  mean_value: 117  mean_value: 123
  resize_param { prob: 1 resize_mode: WARP height: %(size)d width: %(size)d
                 interp_mode: LINEAR interp_mode: AREA interp_mode: NEAREST interp_mode: CUBIC interp_mode: LANCZOS4 }
  emit_constraint { emit_type: CENTER }
  distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 contrast_lower: 0.5
                  contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5
                  saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0 }
  expand_param { prob: 0.5 max_expand_ratio: 4 }
}
annotated_data_param {
  batch_sampler { max_sample: 1 max_trials: 1 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { min_jaccard_overlap: 0.1 } max_sample: 1 max_trials: 50 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { min_jaccard_overlap: 0.3 } max_sample: 1 max_trials: 50 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { min_jaccard_overlap: 0.5 } max_sample: 1 max_trials: 50 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { min_jaccard_overlap: 0.7 } max_sample: 1 max_trials: 50 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { min_jaccard_overlap: 0.9 } max_sample: 1 max_trials: 50 }
  batch_sampler { sampler { min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }
                  sample_constraint { max_jaccard_overlap: 1 } max_sample: 1 max_trials: 50 }
}
"""
SSD_TEST_LAYER = """
transform_param { mean_value: 104 mean_value: 117 mean_value: 123
  resize_param { prob: 1 resize_mode: WARP height: %(size)d width: %(size)d interp_mode: LINEAR } }
annotated_data_param { batch_sampler { } }
"""


def transformer(text: str, size: int, phase: int) -> SSDTransformer:
    lp = text_format.Parse(text % {"size": size}, caffe_pb2.LayerParameter())
    return SSDTransformer(lp.transform_param, phase, lp.annotated_data_param.batch_sampler)


def rate(records, work, repeat: int):
    """(images per wall-clock second, images per CPU second) of ``work(record, rng)`` over
    ``records``, best of ``repeat``. On a machine shared with other jobs the CPU-time rate is
    the worker's own capacity; the wall-clock rate also counts time taken by others."""
    wall = cpu = 0.0
    for r in range(repeat):
        rng = np.random.default_rng(r)
        start, start_cpu = time.perf_counter(), time.process_time()
        for record in records:
            work(record, rng)
        wall = max(wall, len(records) / (time.perf_counter() - start))
        cpu = max(cpu, len(records) / (time.process_time() - start_cpu))
    return wall, cpu


def _cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def loader_rate(db_path: str, keys, t: SSDTransformer, workers: int, uint8: bool, batch: int,
                batches: int):
    """(images per wall-clock second, images per CPU second of the workers) of a BatchLoader
    with ``workers`` processes, after the first ``2 * workers`` batches (start-up and a full
    prefetch queue) are taken."""
    dataset = AnnotatedBatches(db_path, keys, batch, t, (3, 300, 300), seed=0, uint8=uint8)
    loader = BatchLoader(dataset, num_workers=workers, prefetch=3)
    try:
        for _ in range(2 * workers):
            loader.next()
        pids = [w.pid for w in loader._iter._workers]
        start, start_cpu = time.perf_counter(), _cpu_seconds(pids)
        for _ in range(batches):
            loader.next()
        wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - start_cpu
        return batches * batch / wall, batches * batch / max(cpu, 1e-9)
    finally:
        loader.close()


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(sorted(f for f in flags if f == "avx2" or f.startswith("avx512"))) or "-"
    except OSError:
        pass
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="annotated LMDB (default: a freshly generated sample set)")
    parser.add_argument("--images", type=int, default=300, help="records to time")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the loader table "
                        "(this machine's default is added)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the loader table")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader row")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = args.db
        if db_path is None:
            make_sample_set(Path(tmp) / "sample", seed=0, train=args.images, test=1)
            db_path = str(Path(tmp) / "sample" / "trainval_lmdb")
        db = AnnotatedDB(db_path)
        keys = db.keys()[:args.images]
        records = [sample_from_datum(parse_record(db.get(k), k.decode()), k.decode()) for k in keys]
        values = [db.get(k) for k in keys]
        first = decode_image(records[0].image)
        print(f"{len(records)} records of {db_path} ({first.shape[1]}x{first.shape[0]} images), "
              "one process, cv2.setNumThreads(1)\n")
        rows = [("decode only (parse + imdecode)",
                 rate(values, lambda v, rng: decode_image(parse_record(v, "?").datum.data), args.repeat))]
        for size in (300, 500):
            t = transformer(SSD_TRAIN_LAYER, size, caffe_pb2.TRAIN)
            rows.append((f"SSD train transform, {size}x{size}", rate(records, t.process, args.repeat)))
        t = transformer(SSD_TEST_LAYER, 500, caffe_pb2.TEST)
        rows.append(("SSD test transform, 500x500", rate(records, t.process, args.repeat)))
        print("| pipeline | images/s per worker (wall clock) | images per CPU second |\n|---|---:|---:|")
        for name, (wall, cpu) in rows:
            print(f"| {name} | {wall:.0f} | {cpu:.0f} |")

        default = default_workers()
        counts = sorted({int(w) for w in args.workers.split(",")} | {default})
        print(f"\nloader: SSD train transform 300x300, batch {args.batch}, {args.batches} batches per row; "
              f"{usable_cores()} usable cores (CPU flags: {cpu_flags()}), default workers {default}\n")
        print("| workers | images/s, float32 batches | images/s, uint8 batches | "
              "images per worker CPU second (float32, uint8) |\n|---:|---:|---:|---:|")
        t = transformer(SSD_TRAIN_LAYER, 300, caffe_pb2.TRAIN)
        warnings.filterwarnings("ignore", message="This DataLoader will create")   # more workers than cores
        for workers in counts:
            (f_wall, f_cpu), (u_wall, u_cpu) = [loader_rate(db_path, keys, t, workers, uint8, args.batch,
                                                            args.batches) for uint8 in (False, True)]
            mark = " (default)" if workers == default else ""
            print(f"| {workers}{mark} | {f_wall:.0f} | {u_wall:.0f} | {f_cpu:.0f}, {u_cpu:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
