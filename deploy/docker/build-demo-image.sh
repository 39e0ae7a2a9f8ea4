#!/usr/bin/env bash
# Builds the demo images serin's docker tests and `serin demo` deploy: `serin-demo:TAG`, one per
# TAG, from a dynamically linked `serin` binary, with no registry and no base image.
#
#   deploy/docker/build-demo-image.sh target/debug/serin v1 v2 v3:--unhealthy v4:--error-rate=0.5
#
# The image is FROM scratch: the binary, the shared libraries `ldd` lists and the dynamic loader
# at their paths, ENTRYPOINT ["/serin", "demo-app"]; the deploy spec's args (`--host 0.0.0.0
# --port 8080 --version {version}`) complete the command. A TAG:FLAGS argument bakes extra
# demo-app flags (comma-separated) into that tag's entrypoint: a "bad release" to roll out.
#
# Idempotent and fast: the base is rebuilt only when the binary changed (its hash is a label), and
# each tag is a one-line image on top of it.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 SERIN_BINARY TAG[:FLAG,FLAG...]..." >&2
    exit 2
fi
bin=$1
shift
if [ ! -x "$bin" ]; then
    echo "$0: $bin is not an executable serin binary" >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "$0: the Docker Engine does not answer (docker info failed); start it first" >&2
    exit 1
fi

# Runs a docker command, printing its output only when it fails (the legacy builder's
# deprecation notice on every build is noise).
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

hash=$(sha256sum "$bin" | cut -c1-16)
ctx_tag=$(mktemp -d)/Dockerfile
ctx=""
trap 'rm -rf "$(dirname "$ctx_tag")" ${ctx:+"$ctx"}' EXIT
base=serin-demo-base:latest
if [ "$(docker image inspect -f '{{ index .Config.Labels "serin.binary" }}' "$base" 2>/dev/null || true)" != "$hash" ]; then
    ctx=$(mktemp -d)
    mkdir -p "$ctx/root"
    cp "$bin" "$ctx/root/serin"
    # Every library the binary loads, and the loader itself, at the path ldd names.
    ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
        mkdir -p "$ctx/root$(dirname "$lib")"
        cp -L "$lib" "$ctx/root$lib"
    done
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY root/ /
LABEL serin.binary="$hash"
ENTRYPOINT ["/serin", "demo-app"]
DOCKERFILE
    quiet docker build -q -t "$base" "$ctx"
fi

for spec in "$@"; do
    tag=${spec%%:*}
    flags=""
    if [ "$spec" != "$tag" ]; then
        flags=${spec#*:}
    fi
    entry='"/serin", "demo-app"'
    if [ -n "$flags" ]; then
        IFS=',' read -r -a extra <<<"$flags"
        for f in "${extra[@]}"; do
            entry="$entry, \"$f\""
        done
    fi
    want="$hash|$flags"
    if [ "$(docker image inspect -f '{{ index .Config.Labels "serin.demo" }}' "serin-demo:$tag" 2>/dev/null || true)" = "$want" ]; then
        continue
    fi
    printf 'FROM %s\nLABEL serin.demo="%s"\nENTRYPOINT [%s]\n' "$base" "$want" "$entry" >"$ctx_tag"
    quiet docker build -q -t "serin-demo:$tag" -f "$ctx_tag" "$(dirname "$ctx_tag")"
    echo "built serin-demo:$tag${flags:+ (demo-app $flags)}"
done
