"""wanserve: an OpenAI-style image-to-video server for Wan2.2, sharded with xDiT.

Three layers, imported in one direction only: `wanserve.api` (HTTP, jobs, MP4) →
`wanserve.engine` (ranks, model, generation) → `wanserve.kernels` (attention backends).
"""
