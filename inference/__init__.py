"""privface inference: everything between an aligned face and a protected template.

- transform: the versioned DCT feature transform (client SDK, training and server validation share it)
- compute_stats: per-channel DCT statistics behind the transform's clip bounds
- lfw / evaluation / noise_sweep: LFW access and the verification protocol used for every metric
- mobilefacenet / frequency_model: the pretrained backbone and model v0 (inverse-DCT adapter + backbone)
- export / metadata: ONNX export, ORT-vs-PyTorch check, model.json
- runtime: ONNX Runtime sessions, asyncio micro-batching, atomic model swaps
- protect: keyed orthogonal mapping of embeddings (revocable, unlinkable templates)

Nothing here imports app/, secure/, client/ or training_jobs/.
"""
