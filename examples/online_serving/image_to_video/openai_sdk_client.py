"""Image to video with the official `openai` SDK: submit asynchronously, poll until the job
ends, download the MP4.

    python openai_sdk_client.py
    SERVER=http://gpu-box:8000 IMAGE=me.png SIZE=832x480 NUM_FRAMES=81 STEPS=40 python openai_sdk_client.py

Every option also reads the environment variable of the same name in capitals (as the curl
examples do); OPENAI_API_KEY is sent as the bearer token when the server has --api-key.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import openai
from openai import OpenAI

HERE = Path(__file__).resolve().parent
# The SDK warns that OpenAI's hosted video API is being retired; that is not this server.
warnings.filterwarnings("ignore", message="The Sora API", category=DeprecationWarning)


def main() -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=env("SERVER", "http://127.0.0.1:8000"))
    parser.add_argument("--image", default=env("IMAGE", str(HERE / "first_frame.png")))
    parser.add_argument("--prompt", default=env("PROMPT", "a lighthouse in a storm, waves crashing"))
    parser.add_argument("--size", default=env("SIZE", "256x144"))
    parser.add_argument("--num-frames", type=int, default=int(env("NUM_FRAMES", "9")))
    parser.add_argument("--steps", type=int, default=int(env("STEPS", "4")))
    parser.add_argument("--seed", type=int, default=int(env("SEED")) if env("SEED") else None)
    parser.add_argument("--out", default=env("OUT", "out_sdk.mp4"))
    args = parser.parse_args()

    client = OpenAI(base_url=args.server.rstrip("/") + "/v1",
                    api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    # The SDK types `size` and `seconds` as Sora's values, so wanserve's own fields go in
    # extra_body; the server reads them from the same multipart form.
    extra = {"size": args.size, "num_frames": args.num_frames, "num_inference_steps": args.steps}
    if args.seed is not None:
        extra["seed"] = args.seed
    try:
        with open(args.image, "rb") as image:
            video = client.videos.create_and_poll(
                prompt=args.prompt, input_reference=image, extra_body=extra,
                extra_headers={"Prefer": "respond-async"},  # answer at once, then poll
                poll_interval_ms=500)
        if video.status != "completed":
            reason = video.error.message if video.error else "no reason given"
            print(f"openai_sdk_client.py: video {video.id} {video.status}: {reason}", file=sys.stderr)
            return 1
        client.videos.download_content(video.id).write_to_file(args.out)
    except openai.APIStatusError as exc:
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        print(f"openai_sdk_client.py: HTTP {exc.status_code}: {message or exc.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"openai_sdk_client.py: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {video.id} {video.size}, {video.seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
