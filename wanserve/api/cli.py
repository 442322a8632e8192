"""`wanserve`: a command-line client of a wanserve server (standard library only, no torch).

    wanserve generate first_frame.png "a lighthouse in a storm" -o out.mp4 --steps 8
    wanserve list
    wanserve get VIDEO_ID
    wanserve delete VIDEO_ID

`--server` (or $WANSERVE_SERVER) and `--api-key` (or $WANSERVE_API_KEY) apply to every command.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = ("completed", "failed", "cancelled")


class CLIError(Exception):
    """Ends the command with this message and exit status 1."""


class Client:
    def __init__(self, server: str, api_key: str | None, timeout: float = 60.0):
        self.server = server.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float | None = None):
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.server + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise CLIError(f"HTTP {exc.code}: {_error_message(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise CLIError(f"cannot reach {self.server}: {exc.reason}") from None

    def json(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> dict:
        with self._open(method, path, body, headers) as resp:
            return json.loads(resp.read())

    def download(self, path: str, target: Path) -> int:
        with self._open("GET", path) as resp:
            data = resp.read()
        target.write_bytes(data)
        return len(data)

    def events(self, video_id: str):
        """The job's events (GET /v1/videos/{id}/events) as dicts, until the stream ends."""
        with self._open("GET", f"/v1/videos/{video_id}/events",
                        headers={"Accept": "text/event-stream"}, timeout=300) as resp:
            for line in resp:
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace") or "no message"


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = "wanserve-" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for file_field, file_path in files.items():
        ctype = mimetypes.guess_type(file_path.name)[0] or "application/octet-stream"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                     f'filename="{file_path.name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
                     + file_path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def progress_bar(event: dict, width: int = 30) -> str:
    done, total = event.get("step") or 0, event.get("total_steps") or 0
    filled = width * done // total if total else 0
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] step {done}/{total} "
            f"{event.get('progress', 0):3d}% {event['status']:<11}")


def follow_job(client: Client, video_id: str, out) -> dict:
    """Draw the progress bar until the job ends; returns the final job. Falls back to polling
    when the event stream breaks off."""
    last = None
    try:
        for last in client.events(video_id):
            out.write(progress_bar(last))
            out.flush()
            if last["status"] in TERMINAL:
                break
    except (CLIError, OSError, ValueError):
        pass
    while True:
        job = client.json("GET", f"/v1/videos/{video_id}")
        if job["status"] in TERMINAL:
            if last is None or last["status"] not in TERMINAL:
                steps = job.get("num_inference_steps")
                out.write(progress_bar({**job, "total_steps": steps,
                                        "step": steps if job["status"] == "completed" else 0}))
            out.write("\n")
            return job
        out.write(progress_bar({**job, "step": 0, "total_steps": 0}))
        out.flush()
        time.sleep(0.5)


def cmd_generate(client: Client, args) -> int:
    files = {"input_reference": Path(args.image)}
    if args.last_frame:
        files["last_frame"] = Path(args.last_frame)
    for path in files.values():
        if not path.is_file():
            raise CLIError(f"no such image: {path}")
    fields = {"prompt": args.prompt}
    for name, value in (("size", args.size), ("num_frames", args.num_frames),
                        ("num_inference_steps", args.steps), ("seed", args.seed),
                        ("negative_prompt", args.negative_prompt), ("fps", args.fps),
                        ("quality", args.quality), ("model", args.model),
                        ("cache", args.cache)):
        if value is not None:
            fields[name] = str(value)
    body, ctype = multipart(fields, files)
    job = client.json("POST", "/v1/videos", body,
                      {"Content-Type": ctype, "Prefer": "respond-async"})
    video_id = job["id"]
    print(f"{video_id}: {job['size']}, {job.get('num_frames')} frames, seed {job.get('seed')}",
          file=sys.stderr)
    try:
        job = follow_job(client, video_id, sys.stderr)
    except KeyboardInterrupt:
        client.json("DELETE", f"/v1/videos/{video_id}")
        print(f"\ncancelled {video_id}", file=sys.stderr)
        return 130
    if job["status"] != "completed":
        error = job.get("error") or {}
        raise CLIError(f"video {video_id} {job['status']}: {error.get('message', 'no reason')}")
    out = Path(args.output or f"{video_id}.mp4")
    size = client.download(f"/v1/videos/{video_id}/content", out)
    print(f"{out}: {size} bytes, {video_id}, seed {job['seed']}, "
          f"{job.get('inference_time_s') or 0:.1f}s")
    cache = job.get("cache")
    if cache and cache.get("preset") != "off":
        counts = {kind: ", ".join(f"{expert} {n}" for expert, n in cache[kind].items())
                  for kind in ("computed", "cached")}
        print(f"step cache {cache['preset']}: computed {counts['computed']}; cached "
              f"{counts['cached']}", file=sys.stderr)
    return 0


def cmd_list(client: Client, args) -> int:
    page = client.json("GET", f"/v1/videos?limit={args.limit}&order={args.order}")
    for job in page["data"]:
        print(f"{job['id']}  {job['status']:<11} {job['progress']:3d}%  {job['size']:>9}  "
              f"{job['seconds']:>6}s  {job['prompt'][:40]}")
    return 0


def cmd_get(client: Client, args) -> int:
    print(json.dumps(client.json("GET", f"/v1/videos/{args.video_id}"), indent=2))
    return 0


def cmd_delete(client: Client, args) -> int:
    client.json("DELETE", f"/v1/videos/{args.video_id}")
    print(f"deleted {args.video_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanserve", description="A client of a wanserve server.")
    parser.add_argument("--server", default=os.environ.get("WANSERVE_SERVER", DEFAULT_SERVER),
                        help=f"default: $WANSERVE_SERVER or {DEFAULT_SERVER}")
    parser.add_argument("--api-key", default=os.environ.get("WANSERVE_API_KEY"),
                        help="default: $WANSERVE_API_KEY")
    # the same two options after the command; SUPPRESS keeps the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=argparse.SUPPRESS)
    common.add_argument("--api-key", default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", parents=[common],
                              help="make a video from a first frame and a prompt")
    gen.add_argument("image")
    gen.add_argument("prompt")
    gen.add_argument("--last-frame", metavar="IMAGE",
                     help="the video's last frame too (first+last frame; models that take one)")
    gen.add_argument("-o", "--output", help="the MP4 to write (default: VIDEO_ID.mp4)")
    gen.add_argument("--size", help="WxH")
    gen.add_argument("--num-frames", type=int)
    gen.add_argument("--steps", type=int, help="denoising steps")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--fps", type=int)
    gen.add_argument("--quality", choices=["high", "lossless"])
    gen.add_argument("--cache", metavar="PRESET", help="the step cache: off, a preset of the "
                     "server (the presets shipped: fast, balanced, quality; /health lists them) "
                     "or a JSON object (README, 'The step cache'); default: the server's")
    gen.add_argument("--model")
    gen.set_defaults(run=cmd_generate)
    ls = commands.add_parser("list", parents=[common], help="the most recent videos")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--order", choices=["asc", "desc"], default="desc")
    ls.set_defaults(run=cmd_list)
    for name, run, text in (("get", cmd_get, "one video as JSON"),
                            ("delete", cmd_delete, "cancel and delete a video")):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("video_id")
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(Client(args.server, args.api_key), args)
    except CLIError as exc:
        print(f"wanserve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
