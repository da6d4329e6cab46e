"""Layers that produce the net's inputs: Input (fed by the caller) and the data layers, which
read their own source (:class:`DataLayer`, Caffe's BaseDataLayer; AnnotatedData reads an LMDB)."""
from __future__ import annotations

import os

from ..proto import caffe_pb2
from .base import Layer
from .registry import register

__all__ = ["Input", "DataLayer", "AnnotatedData"]


@register
class Input(Layer):
    """Tops with fixed shapes whose values the caller supplies: ``net.forward(data=tensor)``.
    ``input_param.shape`` holds one shape for all tops or one per top."""

    caffe_type = "Input"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_source = True

    def setup(self, bottoms):
        shapes = [tuple(s.dim) for s in self.lp.input_param.shape]
        tops = len(self.lp.top)
        if len(shapes) not in (1, tops):
            raise ValueError(f"input_param has {len(shapes)} shapes for {tops} tops; give 1 or {tops}")
        for shape in shapes:
            if any(d < 1 for d in shape):                 # Caffe's Reshape refuses negative dims
                raise ValueError(f"input_param.shape {list(shape)}: every dimension must be positive")
        return shapes * tops if len(shapes) == 1 else shapes

    def forward(self):
        raise RuntimeError(f"Input layer '{self.name}' has no data of its own: pass its tops "
                           f"({', '.join(self.lp.top)}) to Net.forward as keyword arguments")


class DataLayer(Layer):
    """Base of the layers that read batches from their own source (Caffe's BaseDataLayer):
    no bottoms, tops the caller may feed instead. The solver and the test tool find them with
    ``isinstance`` (:attr:`deeper_ssd.net.Net.data_layers`) and drive them through these knobs:

    * :meth:`set_seed` — the augmentation seed and the batch index to continue from;
    * :attr:`batches_served` — index of the next batch (what a snapshot records);
    * :meth:`configure_loader` — worker processes, prefetch, pinned memory, uint8 transfer;
    * :meth:`set_shard` — read only this rank's share (one process per GPU);
    * :attr:`timing` — a :class:`deeper_ssd.data.loader.DataTiming` (seconds each forward
      waited for its batch);
    * :meth:`close` — stop worker processes (the next forward restarts where reading stopped).

    A subclass implements :meth:`set_seed` and :attr:`batches_served` (without them a resumed
    run could not continue exactly) and, when it decodes in worker processes or can be
    sharded, the other knobs; the defaults read in the calling process and never wait.
    """

    num_bottoms = (0, 0)
    is_source = True

    def __init__(self, *args, **kwargs):
        from ..data.loader import DataTiming
        super().__init__(*args, **kwargs)
        self.timing = DataTiming()

    def set_seed(self, seed: int, start_batch: int = 0) -> None:
        """Seed the augmentation and continue from batch ``start_batch`` (0 = the first record)."""
        raise NotImplementedError(f"{type(self).__name__} must implement set_seed")

    @property
    def batches_served(self) -> int:
        """Index of the next batch this layer will return."""
        raise NotImplementedError(f"{type(self).__name__} must implement batches_served")

    def configure_loader(self, num_workers: int = None, prefetch: int = None,
                         pin_memory: bool = None, uint8: bool = None) -> None:
        """Worker processes, batches prefetched per worker, pinned memory, pixels moved as
        uint8 and normalised on the net's device (default: ignored, the layer reads in the
        calling process)."""

    def set_shard(self, rank: int, world_size: int) -> None:
        """Read every ``world_size``-th record starting at ``rank``; refused by default."""
        if world_size != 1:
            raise self.error(f"cannot be sharded over {world_size} processes")

    def close(self) -> None:
        """Stop worker processes (default: there are none)."""


@register
class AnnotatedData(DataLayer):
    """The SSD fork's AnnotatedData layer: batches of an annotated LMDB (``data_param.source``,
    ``batch_size``, ``backend: LMDB``), augmented by ``transform_param`` and
    ``annotated_data_param.batch_sampler`` exactly as the fork's load_batch does
    (deeper_ssd.data.transforms), decoded in worker processes with prefetch.

    Tops: ``data`` ``(batch_size, C, H, W)`` float32 (H, W from ``resize_param`` or the crop;
    C 1 with ``force_gray`` else 3) and optionally ``label`` ``(1, 1, G, 8)`` float32, rows
    ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]`` with normalised box
    coordinates, one row of -1 when the batch has no object. Both are CPU tensors, except
    ``data`` in uint8 mode, which is on the net's device.

    The database is opened at the first forward, never at construction (shape-only builds on
    the ``meta`` device read nothing). The :class:`DataLayer` knobs: default seed
    ``torch.initial_seed()`` when the first batch is read (batches depend only on the seed and
    the start batch); :func:`deeper_ssd.data.loader.default_workers` worker processes, 3
    batches prefetched per worker (Caffe's PREFETCH_COUNT); records dealt round-robin over
    ranks as Caffe's DataReader does, by default torch.distributed's rank and world size in
    TRAIN. On a CUDA net, by default, batches arrive in pinned host memory and 8-bit pixels
    travel as uint8, ``(pixel - mean) * scale`` then runs on the GPU (the same float32 values,
    :meth:`deeper_ssd.data.transforms.SSDTransformer.normalize_tensor`).
    """

    caffe_type = "AnnotatedData"
    num_tops = (1, 2)

    def setup(self, bottoms):
        from ..data.transforms import SSDTransformer, TransformError
        dp = self.lp.data_param
        if not dp.source:
            raise ValueError("data_param.source is not set")
        if dp.batch_size < 1:
            raise ValueError("data_param.batch_size must be at least 1")
        if dp.backend != caffe_pb2.DataParameter.LMDB:
            raise ValueError(f"data_param.backend is {caffe_pb2.DataParameter.DB.Name(dp.backend)} "
                             "(the proto default); only LMDB databases are supported: set 'backend: LMDB'")
        samplers = list(self.lp.annotated_data_param.batch_sampler)
        try:
            self.transformer = SSDTransformer(self.lp.transform_param, self.phase, samplers)
        except TransformError as err:
            raise ValueError(str(err)) from None
        resize = self.lp.transform_param.resize_param
        if (self.lp.transform_param.HasField("resize_param") and not self.transformer.crop_hw
                and resize.resize_mode == caffe_pb2.ResizeParameter.FIT_SMALL_SIZE and dp.batch_size != 1):
            raise ValueError("resize_mode FIT_SMALL_SIZE gives every image its own size and needs "
                             f"batch_size 1, not {dp.batch_size}")
        self.image_shape = self.transformer.output_shape()
        self._seed = None
        self._start_batch = 0
        self._workers, self._prefetch, self._pin, self._uint8 = None, 3, None, None
        self._shard = None
        self._loader = None
        tops = [(dp.batch_size,) + self.image_shape]
        if len(self.lp.top) > 1:
            tops.append((1, 1, -1, 8))
        return tops

    # -- trainer knobs ---------------------------------------------------------------------------
    def set_seed(self, seed: int, start_batch: int = 0) -> None:
        """Seed the augmentation and continue from batch ``start_batch`` (0 = the first record);
        takes effect at the next forward."""
        self.close()
        self._seed, self._start_batch = int(seed), int(start_batch)

    def configure_loader(self, num_workers: int = None, prefetch: int = None,
                         pin_memory: bool = None, uint8: bool = None) -> None:
        """Worker processes (0 = decode in the calling process), batches prefetched per worker,
        pinned host memory, uint8 pixels normalised on the net's device (pinning and uint8
        default to on for a CUDA net); takes effect at the next forward (the read position is
        kept)."""
        position = self.batches_served
        self.close()
        self._start_batch = position
        if num_workers is not None:
            self._workers = max(0, int(num_workers))
        if prefetch is not None:
            self._prefetch = max(1, int(prefetch))
        if pin_memory is not None:
            self._pin = bool(pin_memory)
        if uint8 is not None:
            self._uint8 = bool(uint8)

    def loader_settings(self, world_size: int = 1) -> dict:
        """The settings the next forward starts its loader with: ``num_workers``,
        ``prefetch``, ``pin_memory``, ``uint8`` (defaults resolved for ``world_size`` training
        processes and this layer's device)."""
        from ..data.loader import default_workers
        cuda = self.device_for_blobs.type == "cuda"
        return dict(num_workers=default_workers(world_size) if self._workers is None else self._workers,
                    prefetch=self._prefetch, pin_memory=cuda if self._pin is None else self._pin,
                    uint8=(cuda if self._uint8 is None else self._uint8) and self.transformer.uint8_capable)

    def set_shard(self, rank: int, world_size: int) -> None:
        """Read every ``world_size``-th record starting at ``rank`` (one process per GPU)."""
        if not 0 <= rank < world_size:
            raise self.error(f"rank {rank} outside world size {world_size}")
        self.close()
        self._shard = (int(rank), int(world_size))

    @property
    def batches_served(self) -> int:
        """Index of the next batch this layer will return."""
        return self._loader.next_batch if self._loader is not None else self._start_batch

    def close(self) -> None:
        """Stop the worker processes; the next forward starts them again where reading stopped."""
        if self._loader is not None:
            self._start_batch = self._loader.next_batch
            self._loader.close()
            self._loader = None

    # -- data ------------------------------------------------------------------------------------
    def _open(self):
        import torch
        from ..data.annoset import AnnosetError, AnnotatedDB
        from ..data.loader import AnnotatedBatches, BatchLoader
        where = f"layer '{self.name}' (AnnotatedData)"
        try:
            db = AnnotatedDB(self.lp.data_param.source, f"{where}: data_param.source LMDB")
            keys = db.keys()
            db.close()
        except AnnosetError as err:
            raise self.error(str(err).replace(f"{where}: ", "")) from None
        if not keys:
            raise self.error(f"LMDB {self.lp.data_param.source} has no records")
        rank, world = self._shard or (0, 1)
        dist = torch.distributed
        processes = world                     # training processes sharing this machine's cores
        if dist.is_available() and dist.is_initialized():
            processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
            if self._shard is None and self.phase == caffe_pb2.TRAIN:
                rank, world = dist.get_rank(), dist.get_world_size()
        seed = self._seed if self._seed is not None else torch.initial_seed() % (1 << 63)
        self._seed = seed
        settings = self.loader_settings(processes)
        dataset = AnnotatedBatches(
            self.lp.data_param.source, keys, self.lp.data_param.batch_size, self.transformer,
            self.image_shape, seed, output_labels=len(self.lp.top) > 1,
            anno_type_override=self.lp.annotated_data_param.HasField("anno_type"),
            rank=rank, world_size=world, where=where, uint8=settings["uint8"])
        self._loader = BatchLoader(dataset, self._start_batch, settings["num_workers"],
                                   settings["prefetch"], settings["pin_memory"], self.timing)

    def forward(self):
        import torch
        from ..data.transforms import TransformError
        if self._loader is None:
            self._open()
        try:
            data, label = self._loader.next()
        except TransformError as err:
            raise self.error(str(err)) from None
        if data.dtype == torch.uint8:
            data = self.transformer.normalize_tensor(data.to(self.device_for_blobs, non_blocking=True))
        return (data, label) if len(self.lp.top) > 1 else data
