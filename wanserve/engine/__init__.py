"""The engine: every rank builds the served model the same way and runs each request together.

Rooms, read in this order:
- `startup`, `config`, `assembly`: what configures a rank and the ordered build of its model;
- `model/`: the pipeline, its layouts and weights, offload and peak memory;
- `adapters/`: LoRA loading and each request's choice;
- `parallel/`: process groups, the layout, xfuser's runtime and its workarounds;
- `serving/`: the queue, replicas, and one request on one rank;
- `cpu/`: the CPU test vehicle, behind its one door (`cpu.tune`, called by the assembly alone).

Imports run serving → model / adapters / parallel, and assembly → all of them; nothing here
imports `wanserve.api`.
"""
