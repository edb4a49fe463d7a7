"""ORT embedder, micro-batcher and model holder, on small real ONNX models (no shared data needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.runtime import MicroBatcher, ModelHolder, OrtEmbedder

SHAPE = (5, 14, 14)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript ONNX exporter


class Projection(torch.nn.Module):
    """features [N,5,14,14] -> [N,8] fixed random projection: a stand-in with the backbone's signature."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(8, int(np.prod(SHAPE)), generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1) @ self.weight.T


def export_projection(path: Path, seed: int) -> Path:
    torch.onnx.export(Projection(seed), (torch.zeros(2, *SHAPE),), str(path), input_names=["features"],
                      output_names=["embedding"], dynamic_axes={"features": {0: "N"}, "embedding": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return export_projection(folder / "a.onnx", 1), export_projection(folder / "b.onnx", 2)


class CountingEmbedder:
    """Wraps a real OrtEmbedder; records batch sizes and can slow each run to force queueing."""

    def __init__(self, inner: OrtEmbedder, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.input_shape = inner.input_shape
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay_s)
        return self.inner.embed(batch)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def test_embedder_reports_real_providers(models):
    embedder = OrtEmbedder(models[0], prefer_gpu=True, intra_op_threads=1)
    assert embedder.providers and embedder.providers[-1] == "CPUExecutionProvider"
    assert embedder.input_shape == SHAPE and embedder.embedding_dim == 8
    x = inputs(3)
    expected = Projection(1)(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(embedder.embed(x), expected, atol=1e-4)


def test_concurrent_requests_share_batches_and_get_their_own_results(models):
    counting = CountingEmbedder(OrtEmbedder(models[0], prefer_gpu=False, intra_op_threads=1), delay_s=0.02)
    batcher = MicroBatcher(counting, max_batch=8, max_wait_ms=5)
    x = inputs(40)

    async def main() -> list[np.ndarray]:
        results = await asyncio.gather(*(batcher.embed(row) for row in x))
        await batcher.aclose()
        return results

    results = asyncio.run(main())
    expected = counting.inner.embed(x)
    assert np.allclose(np.stack(results), expected, atol=1e-5)
    assert sum(counting.batch_sizes) == 40 and max(counting.batch_sizes) == 8
    assert len(counting.batch_sizes) <= 6 and batcher.batches_run == len(counting.batch_sizes)
    assert all(name.startswith("ort") for name in counting.threads)  # never on the event-loop thread


def test_a_lone_request_waits_at_most_max_wait(models):
    batcher = MicroBatcher(OrtEmbedder(models[0], prefer_gpu=False, intra_op_threads=1), max_batch=64, max_wait_ms=20)

    async def main() -> float:
        await batcher.embed(inputs(1)[0])  # warm-up
        start = time.perf_counter()
        await batcher.embed(inputs(1)[0])
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.5


def test_bad_requests_fail_alone_and_errors_reach_every_caller(models):
    class Failing(CountingEmbedder):
        def embed(self, batch):
            raise RuntimeError("device lost")

    good = MicroBatcher(OrtEmbedder(models[0], prefer_gpu=False, intra_op_threads=1))
    failing = MicroBatcher(Failing(OrtEmbedder(models[0], prefer_gpu=False, intra_op_threads=1)))

    async def main():
        with pytest.raises(ValueError):
            await good.embed(np.zeros((4, 14, 14), np.float32))
        outcomes = await asyncio.gather(*(failing.embed(row) for row in inputs(3)), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert (await good.embed(inputs(1)[0])).shape == (8,)  # the worker survived

    asyncio.run(main())


def test_swap_keeps_in_flight_requests_on_the_old_model(models):
    old = CountingEmbedder(OrtEmbedder(models[0], prefer_gpu=False, intra_op_threads=1), delay_s=0.05)
    new = OrtEmbedder(models[1], prefer_gpu=False, intra_op_threads=1)
    holder = ModelHolder("v1", MicroBatcher(old, max_batch=4, max_wait_ms=1))
    x = inputs(12)

    async def main():
        before = [asyncio.create_task(holder.embed(row)) for row in x]
        await asyncio.sleep(0)  # let them enqueue on the old model
        swapped = await holder.swap("v2", MicroBatcher(new, max_batch=4, max_wait_ms=1))
        after = await asyncio.gather(*(holder.embed(row) for row in x[:3]))
        return swapped, await asyncio.gather(*before), after

    swapped, before, after = asyncio.run(main())
    assert swapped == "v1" and holder.version == "v2"
    assert [v for v, _ in before] == ["v1"] * 12 and [v for v, _ in after] == ["v2"] * 3
    assert np.allclose(np.stack([e for _, e in before]), old.inner.embed(x), atol=1e-5)
    assert np.allclose(np.stack([e for _, e in after]), new.embed(x[:3]), atol=1e-5)
    assert sum(old.batch_sizes) == 12  # nothing was dropped
