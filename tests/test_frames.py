"""Frames on their way to the MP4 encoder: rounded to uint8 on the device exactly as the encoder
rounds float frames (wanserve/engine/serving/frames.py), and a replica leader's frames to rank 0
in bounded chunks (wanserve/engine/serving/frame_transfer.py).

The transfer check runs as this file under torchrun (two processes, gloo); rank 0 prints the
result.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CHUNK_BYTES = 256  # a 6x10 RGB uint8 frame is 180 bytes: chunks end inside frames
UINT8_VIDEO = (7, 6, 10, 3)  # 1260 bytes: 5 chunks, the last one short
FLOAT_VIDEO = (3, 4, 6, 3)  # float32, 864 bytes: 4 chunks


def test_uint8_frames_are_the_encoders_rounding_of_the_float_frames():
    """Every value the decoder can give, the clamp's edges and the values that land on .5 after
    scaling among them: the uint8 chunk is wanserve/api/video.py `_to_uint8` of the float chunk,
    so the MP4's bytes are those encoding the float frames gives.
    checked with: `+ 0.5` dropped from the device rounding (wanserve/engine/serving/frames.py
    `_as_frames`): the float32 chunk's uint8 frames differ."""
    from diffusers.video_processor import VideoProcessor

    from wanserve.api.video import _to_uint8
    from wanserve.engine.serving.frames import chunk_frames

    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(patch_size=None)),
                           video_processor=VideoProcessor(vae_scale_factor=8))
    edges = torch.tensor([-2.0, -1.0, 1.0, 2.0]) + torch.linspace(-1e-6, 1e-6, 9)[:, None]
    halves = (torch.arange(256) - 0.5) / 255 * 2 - 1  # (v - 0.5) / 255 back to [-1, 1]
    values = torch.cat([torch.linspace(-1.1, 1.1, 200_000), edges.flatten(), halves,
                        torch.nextafter(halves, torch.tensor(2.0))])
    values = values[: values.numel() // 12 * 12]
    for dtype in (torch.float32, torch.bfloat16):
        decoded = values.to(dtype).view(1, 3, 1, 2, -1)
        as_float = chunk_frames(pipe, decoded)
        as_uint8 = chunk_frames(pipe, decoded, as_uint8=True)
        assert as_float.dtype == np.float32 and as_uint8.dtype == np.uint8
        assert np.array_equal(as_uint8, _to_uint8(as_float)), dtype


def test_a_replicas_frames_arrive_complete_and_in_order_in_small_chunks(monkeypatch):
    """The leader's side sends a uint8 and a float32 video with the chunk size forced to 256
    bytes (the test-only variable the server reads): every send is at most that, there are as
    many as the header says, rank 0's arrays are the sent ones, and its sink got every frame in
    order, as soon as each frame had arrived whole.
    checked with: `receive_frames` receiving every chunk into the array's first bytes
    (`flat[:end - start]`, wanserve/engine/serving/frame_transfer.py): the frames differ."""
    from conftest import torchrun_script

    monkeypatch.setenv("WANSERVE_TEST_FRAME_CHUNK_BYTES", str(CHUNK_BYTES))
    result = torchrun_script(__file__, 2, timeout=120)
    assert result["uint8"] == {"same": True, "dtype": "uint8", "chunks": 5,
                               "sent": [256, 256, 256, 256, 236],
                               # frames whole after 256, 512, 768, 1024, 1260 bytes
                               "sink_runs": [[0, 1], [1, 2], [2, 4], [4, 5], [5, 7]]}
    assert result["float32"] == {"same": True, "dtype": "float32", "chunks": 4,
                                 "sent": [256, 256, 256, 96],
                                 "sink_runs": [[0, 1], [1, 2], [2, 3]]}


def _video(shape: tuple[int, ...], dtype) -> np.ndarray:
    rng = np.random.default_rng(sum(shape))
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def _transfer() -> dict:
    import torch.distributed as dist

    from wanserve.engine.serving import frame_transfer

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    sent: list[int] = []
    send = frame_transfer.dist.send

    def counted_send(tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return send(tensor, *args, **kwargs)

    frame_transfer.dist.send = counted_send
    try:
        for shape, dtype in ((UINT8_VIDEO, np.uint8), (FLOAT_VIDEO, np.float32)):
            video = _video(shape, dtype)
            if rank == 1:
                header = frame_transfer.frames_header(video)
                dist.send_object_list([header], dst=0)
                sent.clear()
                frame_transfer.send_frames(video, header, dst=0, group=None)
                dist.send_object_list([sent], dst=0)
                continue
            box = [None]
            dist.recv_object_list(box, src=1)
            header = box[0]
            puts: list[np.ndarray] = []
            frames = frame_transfer.receive_frames(header, 1, None,
                                                   SimpleNamespace(put=puts.append))
            dist.recv_object_list(box, src=1)
            runs, start = [], 0
            for run in puts:
                runs.append([start, start + len(run)])
                start += len(run)
            out[np.dtype(dtype).name] = {
                "same": bool(np.array_equal(frames, video)
                             and np.array_equal(np.concatenate(puts), video)),
                "dtype": frames.dtype.name, "chunks": header.chunks, "sent": box[0],
                "sink_runs": runs}
    finally:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    result = _transfer()
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result), flush=True)
