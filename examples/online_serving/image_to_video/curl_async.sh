#!/usr/bin/env bash
# Asynchronous: submit with `Prefer: respond-async` (202 and the queued job at once), poll
# GET /v1/videos/{id} until the job ends, then download GET /v1/videos/{id}/content into $OUT.
# Needs only curl and python3.
#
#   ./curl_async.sh
#   SERVER=http://gpu-box:8000 IMAGE=me.png PROMPT="a cat yawning" SIZE=832x480 NUM_FRAMES=81 STEPS=40 ./curl_async.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/request.sh"
OUT="${OUT:-out_async.mp4}"
POLL_S="${POLL_S:-0.5}"

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
