# Sourced by curl_sync.sh and curl_async.sh: the request both send, from the environment.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVER="${SERVER:-http://127.0.0.1:8000}"
IMAGE="${IMAGE:-$here/first_frame.png}"
PROMPT="${PROMPT:-a lighthouse in a storm, waves crashing}"
SIZE="${SIZE:-256x144}"          # the tiny model's range; e.g. 832x480 with the A14B 480p preset
NUM_FRAMES="${NUM_FRAMES:-9}"    # 4k+1
STEPS="${STEPS:-4}"
SEED="${SEED:-}"                 # empty: the server picks one and reports it

fields=(--form-string "prompt=$PROMPT" -F "input_reference=@$IMAGE" -F "size=$SIZE"
        -F "num_frames=$NUM_FRAMES" -F "num_inference_steps=$STEPS")
if [ -n "$SEED" ]; then fields+=(-F "seed=$SEED"); fi
