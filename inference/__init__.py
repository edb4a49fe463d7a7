"""privface inference: everything between an aligned face and a protected template.

- transform: the versioned DCT feature transform (client SDK, training and server validation share it)
- lfw / evaluation / operating_points: LFW access, the verification protocol and the threshold calibration that
  `export` runs when it builds a servable version (so they serve the product, not only research)
- mobilefacenet / frequency_model: the pretrained backbone and model v0 (inverse-DCT adapter + backbone)
- export / metadata: ONNX export, ORT-vs-PyTorch check, model.json
- runtime: ONNX Runtime sessions, asyncio micro-batching, atomic model swaps
- protect: keyed orthogonal mapping of embeddings (revocable, unlinkable templates)

Nothing here imports app/, secure/, client/ or training_jobs/. Measurements that only produce numbers for the
docs (the DCT statistics behind the clip bounds, the noise sweep) are model work: training_jobs/.
"""
