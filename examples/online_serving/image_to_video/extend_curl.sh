#!/usr/bin/env bash
# Continue a video from its last frame: one synchronous POST /v1/videos/extensions. $VIDEO is a
# completed video's id (sent as the form field `video[id]`) or an MP4 file (uploaded); the
# answer, the source's frames then the new ones, is decoded into $OUT. Needs only curl and
# python3.
#
#   VIDEO=out_sync.mp4 ./extend_curl.sh
#   VIDEO=video_0123... PROMPT="the storm clears" NUM_FRAMES=81 STEPS=40 SERVER=http://gpu-box:8000 ./extend_curl.sh
set -euo pipefail
SERVER="${SERVER:-http://127.0.0.1:8000}"
VIDEO="${VIDEO:?VIDEO: a completed video id (video_...) or an MP4 file}"
PROMPT="${PROMPT:-the storm clears, sun on the waves}"
NUM_FRAMES="${NUM_FRAMES:-9}"    # the new part's, 4k+1; size and fps are the source's
STEPS="${STEPS:-4}"
SEED="${SEED:-}"                 # empty: the server picks one and reports it
OUT="${OUT:-out_extended.mp4}"

if [ -f "$VIDEO" ]; then source_field=(-F "video=@$VIDEO;type=video/mp4")
else source_field=(--form-string "video[id]=$VIDEO"); fi
fields=("${source_field[@]}" --form-string "prompt=$PROMPT" -F "num_frames=$NUM_FRAMES"
        -F "num_inference_steps=$STEPS")
if [ -n "$SEED" ]; then fields+=(-F "seed=$SEED"); fi

body="$(mktemp)"
trap 'rm -f "$body"' EXIT
echo "POST $SERVER/v1/videos/extensions (waits for the video)..."
code="$(curl -sS -o "$body" -w '%{http_code}' "$SERVER/v1/videos/extensions" "${fields[@]}")"

python3 - "$body" "$code" "$OUT" <<'PY'
import base64, json, sys

path, code, out = sys.argv[1], sys.argv[2], sys.argv[3]
raw = open(path, "rb").read()
try:
    answer = json.loads(raw)
except ValueError:
    sys.exit(f"extend_curl.sh: HTTP {code}, not JSON: {raw[:300]!r}")
if code != "200" or "data" not in answer:
    error = answer.get("error") or {}
    sys.exit(f"extend_curl.sh: HTTP {code}: {error.get('message', raw[:300])}")
with open(out, "wb") as f:
    f.write(base64.b64decode(answer["data"][0]["b64_json"]))
print(f"{out}: {answer['id']} {answer['size']} {answer['num_frames']} frames "
      f"({answer['source_frames']} from {answer['extended_from'] or 'the upload'}), "
      f"{answer['seconds']} s, seed {answer['seed']}")
PY
