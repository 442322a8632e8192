#!/usr/bin/env bash
# One synchronous POST /v1/videos: the call waits until the video is made and answers it as
# base64 JSON, which is decoded into $OUT. Needs only curl and python3.
#
#   ./curl_sync.sh
#   SERVER=http://gpu-box:8000 IMAGE=me.png PROMPT="a cat yawning" SIZE=832x480 NUM_FRAMES=81 STEPS=40 ./curl_sync.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/request.sh"
OUT="${OUT:-out_sync.mp4}"

body="$(mktemp)"
trap 'rm -f "$body"' EXIT
echo "POST $SERVER/v1/videos (waits for the video)..."
code="$(curl -sS -o "$body" -w '%{http_code}' "$SERVER/v1/videos" "${fields[@]}")"

python3 - "$body" "$code" "$OUT" <<'PY'
import base64, json, sys

path, code, out = sys.argv[1], sys.argv[2], sys.argv[3]
raw = open(path, "rb").read()
try:
    answer = json.loads(raw)
except ValueError:
    sys.exit(f"curl_sync.sh: HTTP {code}, not JSON: {raw[:300]!r}")
if code != "200" or "data" not in answer:
    error = answer.get("error") or {}
    sys.exit(f"curl_sync.sh: HTTP {code}: {error.get('message', raw[:300])}")
with open(out, "wb") as f:
    f.write(base64.b64decode(answer["data"][0]["b64_json"]))
print(f"{out}: {answer['id']} {answer['size']} {answer['num_frames']} frames, seed {answer['seed']}, "
      f"timings {answer['timings']}")
PY
