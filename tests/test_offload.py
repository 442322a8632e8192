"""--offload-inactive-expert: one expert resident at a time, swapped only at the boundary, and
the same video as with both experts resident."""
from __future__ import annotations

import requests

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
