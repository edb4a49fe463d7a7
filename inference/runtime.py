"""Serving the ONNX backbone: an ORT session, asyncio micro-batching, and atomic model swaps.

- OrtEmbedder: one ORT session (CUDA provider when present, CPU otherwise), [B,K,14,14] -> [B,d].
- MicroBatcher: requests arriving together share one ORT run (up to max_batch, waiting at most
  max_wait_ms for company); ORT runs in a worker thread so the event loop keeps serving.
- ModelHolder: the active batcher behind one reference; swapping it sends new requests to the new
  model while requests already queued on the old one finish there, then the old one shuts down.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OrtEmbedder:
    """features float32 [B, K, 14, 14] -> embeddings float32 [B, d] with one ORT session."""

    def __init__(self, model_path: Path | str, prefer_gpu: bool = True, intra_op_threads: int | None = None,
                 spin: bool | None = None) -> None:
        """`intra_op_threads` None/0 and `spin` None keep ORT's defaults (a thread per core, spinning workers).

        On a CPU shared with the event loop, the MPC clients and other processes, one thread that does not
        spin is faster (bench/ort_throughput.py): a spinning worker burns the core the others need.
        """
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if spin is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        wanted = [CUDA, CPU] if prefer_gpu and CUDA in ort.get_available_providers() else [CPU]
        self.session = ort.InferenceSession(str(model_path), options, providers=wanted)
        # What really runs: onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing.
        self.providers: list[str] = self.session.get_providers()
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in model_input.shape[1:])
        declared = self.session.get_outputs()[0].shape[1]
        self.embedding_dim: int | None = declared if isinstance(declared, int) else None

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"expected features [B, {', '.join(map(str, self.input_shape))}], got {batch.shape}")
        embeddings: np.ndarray = self.session.run(None, {self.input_name: batch})[0]
        return embeddings


class _Request:
    __slots__ = ("features", "future")

    def __init__(self, features: np.ndarray, future: asyncio.Future[np.ndarray]) -> None:
        self.features = features
        self.future = future


_STOP = None  # queued after the last request: the worker finishes what is before it, then returns
Queue = asyncio.Queue[_Request | None]


class MicroBatcher:
    """`await batcher.embed(features [K,14,14]) -> [d]`; concurrent calls are embedded in one ORT run."""

    def __init__(self, embedder: OrtEmbedder, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches_run = 0  # observable, for tests and metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._queue: Queue | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def embed(self, features: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this batcher is closed")
        features = np.asarray(features, dtype=np.float32)
        if features.shape != self.embedder.input_shape:  # refuse here so one bad call cannot fail a batch
            raise ValueError(f"expected features {self.embedder.input_shape}, got {features.shape}")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._ensure_worker().put_nowait(_Request(features, future))
        return await future

    async def aclose(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        self._closed = True
        if self._queue is not None and self._worker is not None and not self._worker.done():
            self._queue.put_nowait(_STOP)
            await self._worker
        self._executor.shutdown(wait=False)

    def _ensure_worker(self) -> Queue:
        """Start the worker on the running loop (again, if an earlier loop has gone away)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        return self._queue

    async def _run(self, queue: Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, stop = await self._collect(queue)
            if batch:
                await self._embed_batch(loop, batch)
            if stop:
                return

    async def _collect(self, queue: Queue) -> tuple[list[_Request], bool]:
        """First request (waiting as long as needed), then whatever else arrives within max_wait."""
        first = await queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _embed_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        stacked = np.stack([request.features for request in batch])
        try:
            embeddings = await loop.run_in_executor(self._executor, self.embedder.embed, stacked)
        except Exception as exc:  # every caller of the batch gets the error, the worker lives on
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self.batches_run += 1
        for request, embedding in zip(batch, embeddings):
            if not request.future.done():
                request.future.set_result(embedding)


class ModelHolder:
    """The active (version, batcher); swap() is atomic and never drops a request."""

    def __init__(self, version: str, batcher: MicroBatcher) -> None:
        self._lock = threading.Lock()
        self._active = (version, batcher)

    @property
    def version(self) -> str:
        return self._active[0]

    @property
    def batcher(self) -> MicroBatcher:
        return self._active[1]

    async def embed(self, features: np.ndarray) -> tuple[str, np.ndarray]:
        """(model version that made it, embedding); the version and batcher are read together once."""
        version, batcher = self._active
        return version, await batcher.embed(features)

    async def swap(self, version: str, batcher: MicroBatcher) -> str:
        """Point new requests at `batcher`; drain and close the old one. Returns the old version."""
        with self._lock:
            old_version, old_batcher = self._active
            self._active = (version, batcher)
        if old_batcher is not batcher:
            await old_batcher.aclose()
        return old_version
