#!/usr/bin/env bash
# Asynchronous: submit with `Prefer: respond-async` (202 and the queued job at once), poll
# GET /v1/videos/{id} until the job ends, then download GET /v1/videos/{id}/content into $OUT.
# Needs only curl and python3.
#
#   ./curl_async.sh
#   SERVER=http://gpu-box:8000 IMAGE=me.png PROMPT="a cat yawning" SIZE=832x480 NUM_FRAMES=81 STEPS=40 ./curl_async.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVER="${SERVER:-http://127.0.0.1:8000}"
IMAGE="${IMAGE:-$here/first_frame.png}"
PROMPT="${PROMPT:-a lighthouse in a storm, waves crashing}"
SIZE="${SIZE:-256x144}"          # the tiny model's range; e.g. 832x480 with the A14B 480p preset
NUM_FRAMES="${NUM_FRAMES:-9}"    # 4k+1
STEPS="${STEPS:-4}"
SEED="${SEED:-}"                 # empty: the server picks one and reports it
OUT="${OUT:-out_async.mp4}"
POLL_S="${POLL_S:-0.5}"

fields=(--form-string "prompt=$PROMPT" -F "input_reference=@$IMAGE" -F "size=$SIZE"
        -F "num_frames=$NUM_FRAMES" -F "num_inference_steps=$STEPS")
if [ -n "$SEED" ]; then fields+=(-F "seed=$SEED"); fi

body="$(mktemp)"
trap 'rm -f "$body" "$body.mp4"' EXIT

# job_fields FILE HTTP_CODE EXPECTED_CODE: prints "id status progress" of the job in FILE, or
# exits non-zero with the server's error message.
job_fields() {
  python3 - "$@" <<'PY'
import json, sys

path, code, expected = sys.argv[1:4]
raw = open(path, "rb").read()
try:
    job = json.loads(raw)
except ValueError:
    sys.exit(f"curl_async.sh: HTTP {code}, not JSON: {raw[:300]!r}")
if code != expected or "status" not in job:
    sys.exit(f"curl_async.sh: HTTP {code}: {(job.get('error') or {}).get('message', raw[:300])}")
if job["status"] in ("failed", "cancelled"):
    error = job.get("error") or {}
    sys.exit(f"curl_async.sh: video {job['id']} {job['status']}: {error.get('message', 'no reason given')}")
print(job["id"], job["status"], job["progress"])
PY
}

code="$(curl -sS -o "$body" -w '%{http_code}' -H 'Prefer: respond-async' "$SERVER/v1/videos" "${fields[@]}")"
job="$(job_fields "$body" "$code" 202)"
read -r id status progress <<<"$job"
echo "submitted $id: $status"

while [ "$status" != completed ]; do
  sleep "$POLL_S"
  code="$(curl -sS -o "$body" -w '%{http_code}' "$SERVER/v1/videos/$id")"
  job="$(job_fields "$body" "$code" 200)"
  read -r id status progress <<<"$job"
  echo "$id: $status $progress%"
done

code="$(curl -sS -o "$body.mp4" -w '%{http_code}' "$SERVER/v1/videos/$id/content")"
if [ "$code" != 200 ]; then job_fields "$body.mp4" "$code" 200; exit 1; fi
mv "$body.mp4" "$OUT"
echo "$OUT: $id"
