"""The int8 recipe quantises only the backbone's body, and the session settings PRIVFACE_ORT_THREADS picks
change the speed, never the embeddings (bench/ort_throughput.py measures the speed; docs/operations.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from inference.quantize import QUANTISED_PREFIXES, float_nodes
from inference.runtime import OrtEmbedder

MODEL = Path(__file__).resolve().parent.parent / "inference" / "bundled" / "v1-accurate" / "model.onnx"


def test_only_the_body_is_quantised_and_the_adapter_stem_and_head_stay_float():
    graph = onnx.load(str(MODEL))
    kept_float = set(float_nodes(graph))
    convs = [node.name for node in graph.graph.node if node.op_type == "Conv"]
    body = [name for name in convs if name.startswith(QUANTISED_PREFIXES)]
    assert len(body) >= 40 and not kept_float & set(body)  # the body's 1x1 and depthwise convolutions
    for name in ("/adapter/Conv", "/adapter/idct/Conv", "/backbone/conv1/conv1.0/Conv", "/backbone/conv2/conv2.0/Conv",
                 "/backbone/gdconv/depthwise/Conv", "/backbone/conv3/Conv"):
        assert name in kept_float, name
    assert all(node.name in kept_float for node in graph.graph.node if node.op_type in ("ReduceL2", "Div"))


def test_one_thread_without_spinning_gives_the_default_sessions_embeddings():
    features = np.random.default_rng(0).standard_normal((3, 73, 14, 14)).astype(np.float32)
    default = OrtEmbedder(MODEL, prefer_gpu=False).embed(features)
    tuned = OrtEmbedder(MODEL, prefer_gpu=False, intra_op_threads=1, spin=False).embed(features)
    np.testing.assert_allclose(tuned, default, atol=1e-5)


def test_the_thread_settings_reach_the_session():
    options = OrtEmbedder(MODEL, prefer_gpu=False, intra_op_threads=1, spin=False).session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = OrtEmbedder(MODEL, prefer_gpu=False).session.get_session_options()
    assert default.intra_op_num_threads == 0  # ORT picks one per core, as on main


def test_the_parallel_bench_sums_real_workers(tmp_path: Path) -> None:
    """bench/ort_parallel.py: every (model, processes, batch) setting measured, each a positive summed rate."""
    import json

    from bench.ort_parallel import main

    out = tmp_path / "parallel.json"
    main(["--processes", "1,2", "--batches", "2", "--seconds", "0.3", "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["per_s"]) == {"fp32, 1 process, batch 2", "fp32, 2 processes, batch 2"}
    assert all(row["median"] > 0 and len(row["samples"]) == 1 for row in report["per_s"].values())
