"""Continue a video from its last frame with the official `openai` SDK: `videos.extend`
answered at once (`Prefer: respond-async`), polled until the job ends, the MP4 downloaded.

    python extend_sdk.py --video out_sdk.mp4          # an MP4 file, uploaded
    python extend_sdk.py --video video_0123...        # a completed video's id
    SERVER=http://gpu-box:8000 VIDEO=video_0123... NUM_FRAMES=81 STEPS=40 python extend_sdk.py

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

# The SDK warns that OpenAI's hosted video API is being retired; that is not this server.
warnings.filterwarnings("ignore", message="The Sora API", category=DeprecationWarning)


def main() -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=env("SERVER", "http://127.0.0.1:8000"))
    parser.add_argument("--video", default=env("VIDEO"), required=not env("VIDEO"),
                        help="a completed video's id (video_...) or an MP4 file")
    parser.add_argument("--prompt", default=env("PROMPT", "the storm clears, sun on the waves"))
    parser.add_argument("--num-frames", type=int, default=int(env("NUM_FRAMES", "9")))
    parser.add_argument("--steps", type=int, default=int(env("STEPS", "4")))
    parser.add_argument("--seed", type=int, default=int(env("SEED")) if env("SEED") else None)
    parser.add_argument("--out", default=env("OUT", "out_extended_sdk.mp4"))
    args = parser.parse_args()

    client = OpenAI(base_url=args.server.rstrip("/") + "/v1",
                    api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    # `seconds` is typed as Sora's values; wanserve's own fields go in extra_body
    extra = {"num_frames": args.num_frames, "num_inference_steps": args.steps}
    if args.seed is not None:
        extra["seed"] = args.seed
    if Path(args.video).is_file():
        source = Path(args.video)
    else:  # the SDK (3.63) refuses video={"id": ...} itself: the same form field, via extra_body
        source, extra["video"] = openai.omit, {"id": args.video}
    try:
        video = client.videos.extend(prompt=args.prompt, seconds=openai.omit, video=source,
                                     extra_body=extra, extra_headers={"Prefer": "respond-async"})
        video = client.videos.poll(video.id, poll_interval_ms=500)
        if video.status != "completed":
            reason = video.error.message if video.error else "no reason given"
            print(f"extend_sdk.py: video {video.id} {video.status}: {reason}", file=sys.stderr)
            return 1
        client.videos.download_content(video.id).write_to_file(args.out)
    except openai.APIStatusError as exc:
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        print(f"extend_sdk.py: HTTP {exc.status_code}: {message or exc.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"extend_sdk.py: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {video.id} {video.size}, {video.seconds} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
