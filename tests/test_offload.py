"""--offload-inactive-expert: one expert resident at a time, swapped only at the boundary, and
the same video as with both experts resident; a swap copies only towards the device."""
from __future__ import annotations

from types import SimpleNamespace

import requests
import torch
from torch import nn

from engine.offload import ExpertOffload

from conftest import start_server
from test_http_e2e import create, decode_frames, video_of


def test_offloaded_experts_swap_at_the_boundary_and_change_nothing(server, tmp_path):
    offloaded = start_server(tmp_path, "--offload-inactive-expert")
    try:
        health = requests.get(offloaded.url + "/health", timeout=5).json()
        assert health["placement"]["experts"] == "one resident, the other in CPU memory"
        assert health["expert_swaps"] == 0
        # 4 steps, boundary 0.875: high-noise expert first, one swap to the low-noise expert
        first = decode_frames(video_of(create(offloaded)))
        assert requests.get(offloaded.url + "/health", timeout=5).json()["expert_swaps"] == 1
        # the next request starts on the high-noise expert again: a swap back, then one more
        create(offloaded)
        assert requests.get(offloaded.url + "/health", timeout=5).json()["expert_swaps"] == 3
        # boundary 0: the low-noise expert never runs, so no swap at all
        create(offloaded, {"boundary_ratio": "0"})
        assert requests.get(offloaded.url + "/health", timeout=5).json()["expert_swaps"] == 4
        reference = decode_frames(video_of(create(server)))
        assert (first == reference).all()
    finally:
        assert offloaded.stop() == 0


def test_swaps_point_back_at_one_host_copy_and_allocate_nothing():
    """A copy to the device is simulated by a fresh clone (the CPU is the only device here).
    Swapping an expert out must leave it on its one host copy, the same memory every time,
    with its values intact: nothing copied back, nothing allocated on the host.
    Checked with: the copy back restored (the expert moved back with `t.data.clone()`): the
    host memory changes at every swap."""
    torch.manual_seed(0)
    pipe = SimpleNamespace(transformer=nn.Linear(8, 8), transformer_2=nn.Linear(8, 8))
    pipe.transformer_2.register_buffer("scale", torch.rand(8))
    weights = {name: [t.detach().clone() for t in (*m.parameters(), *m.buffers())]
               for name, m in vars(pipe).items()}
    copies = []
    offload = ExpertOffload(pipe, torch.device("cpu"),
                            copy_to_device=lambda t: copies.append(t) or t.clone())
    host = {name: [copy.data_ptr() for _, copy in tensors] for name, tensors in offload.host.items()}

    def on_host(name):
        tensors = [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]
        return ([t.data_ptr() for t in tensors] == host[name]
                and all(torch.equal(t, w) for t, w in zip(tensors, weights[name])))

    for _ in range(3):
        assert on_host("transformer_2") and not on_host("transformer")
        offload.make_resident("transformer_2")
        assert on_host("transformer") and not on_host("transformer_2")
        offload.make_resident("transformer")
    assert offload.swaps == 6
    assert len(copies) == 2 + 3 * (2 + 3)  # only towards the device: 2 tensors, then 3
