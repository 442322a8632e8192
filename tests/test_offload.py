"""--offload-inactive-expert: one expert resident at a time, swapped only at the boundary, and
the same video as with both experts resident; a swap copies only towards the device; LoRA
adapters (fused, per request, loaded later) survive the swaps."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import requests
import torch
from torch import nn

from wanserve.engine.adapters.lora import Adapters, AdapterUse
from wanserve.engine.model.offload import ExpertOffload

from conftest import start_server
from lora_files import make_lora, write_diffusers
from test_http_e2e import create, decode_frames, video_of


def test_offloaded_experts_swap_at_the_boundary_and_change_nothing(server, tmp_path):
    from wanserve.engine.model.tiny_model import ensure_tiny_model

    lora = write_diffusers(make_lora(ensure_tiny_model(), 1), tmp_path / "a.safetensors")
    offloaded = start_server(tmp_path, "--offload-inactive-expert", "--lora", f"a={lora}")
    try:
        health = requests.get(offloaded.url + "/health", timeout=5).json()
        assert health["placement"]["experts"] == "one resident, the other in CPU memory"
        assert health["adapters"]["loaded"]["transformer_2"] == ["a"]
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
        # an adapter with offload: served, and it changes the video
        adapted = decode_frames(video_of(create(offloaded, {"lora": "a"})))
        assert requests.get(offloaded.url + "/health", timeout=5).json()["expert_swaps"] == 5
        assert np.abs(adapted.astype(int) - first).max() > 10
    finally:
        assert offloaded.stop() == 0


def _expert_outputs(pipe, adapters, steps) -> list[torch.Tensor]:
    """For each adapter choice, a forward of each expert, switching twice (two swaps)."""
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 36, 1, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    outputs = []
    with torch.no_grad():
        for uses in steps:
            adapters.apply(uses)
            for expert in (pipe.transformer, pipe.transformer_2, pipe.transformer):
                outputs.append(expert(hidden_states=hidden, timestep=torch.tensor([500]),
                                      encoder_hidden_states=text, return_dict=False)[0])
    return outputs


def test_adapters_survive_the_swaps_of_an_offloaded_expert(tmp_path):
    """The tiny model's experts with a fused default, then per request an unfused adapter,
    the default again and a --lora-dir adapter loaded while an expert is resident: the
    outputs of each expert equal those without offload. The device is simulated by copies
    (a clone per tensor), so a host copy left stale by a fuse on the device would show.
    Checked with: `Adapters._tensors_changed` a no-op (the fused weights of the expert
    resident at the fuse are lost at its first swap: outputs differ by 0.49), and with
    `ExpertOffload.refresh` not copying the resident expert's changed layers back (the same)."""
    from diffusers import WanImageToVideoPipeline  # plain diffusers: no parallel state needed

    from wanserve.engine.model.tiny_model import ensure_tiny_model

    model = ensure_tiny_model()
    files = [write_diffusers(make_lora(model, seed), tmp_path / f"{seed}.safetensors")
             for seed in (1, 2, 3)]
    cfg = SimpleNamespace(lora_cache=2, lora_unfuse_per_request=True)
    fused, other = AdapterUse("F", 1.0, 1.0), AdapterUse("O", 0.5, 1.5)
    steps = [(fused,), (other,), (fused,), (AdapterUse("dir-x", 1.0, 0.7, str(files[2])),)]
    outputs = {}
    for offloaded in (False, True):
        pipe = WanImageToVideoPipeline.from_pretrained(model, torch_dtype=torch.float32)
        offload = (ExpertOffload(pipe, torch.device("cpu"), copy_to_device=lambda t: t.clone())
                   if offloaded else None)
        adapters = Adapters(pipe, cfg, offload)
        adapters.load("F", str(files[0]), str(files[0]))
        adapters.load("O", str(files[1]), str(files[1]))
        adapters.fuse_default((fused,))
        outputs[offloaded] = _expert_outputs(pipe, adapters, steps)
        assert offload is None or offload.swaps == 2 * len(steps)
    for index, (want, got) in enumerate(zip(outputs[False], outputs[True])):
        assert torch.allclose(got, want, atol=1e-6), (index, (got - want).abs().max())
    assert (outputs[False][0] - outputs[False][3]).abs().max() > 1e-2  # the adapters differ


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
