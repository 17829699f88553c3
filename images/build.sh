#!/usr/bin/env bash
# Build the container images from images/ on this machine, where no registry can be reached:
#
#   images/build.sh [IMAGE ...]     default: operator runtime-cpu (`make images`);
#                                   runtime-cuda on request (`make image-cuda`)
#
# 1. Names: images/tags.py gives each image's reference (kubeforge/IMAGE:VERSION-HASH, the names
#    the repository uses) and its cache key (the tag plus every file the Dockerfile copies in).
#    When $CACHE/tars/IMAGE_TAG.tar exists with that key beside it, the image is up to date and
#    nothing below runs for it: no daemon, no build.
# 2. A dockerd of its own (unless KUBEFORGE_DOCKER_HOST names one): data in $CACHE/docker, state,
#    pidfile and socket in /run/kubeforge-images (another cache: -HASH). No bridge, no iptables
#    rules (builds run with --network host), so nothing else on the machine is touched. Stopped
#    by its pid when the build ends; KUBEFORGE_IMAGES_KEEP=1 leaves it running (and the built
#    images in it, for layer reuse on the next code change; stop it with
#    `kill $(cat /run/kubeforge-images/dockerd.pid)`).
# 3. Bases: images/base.sh (debootstrap of Debian 12), imported as kubeforge/base-FLAVOUR:bookworm-HASH
#    and kept in the daemon's data-root, so a second run reuses them.
# 4. A wheelhouse: the host's pip (its own settings: index, certificate) downloads or builds every
#    wheel an image installs into $CACHE/wheelhouse, once per requirement set; a PEP 503 index of
#    it is served on 127.0.0.1 for the build only, and handed in as PIP_INDEX_URL. The Dockerfiles
#    default to PyPI; nothing of this machine is baked into them.
# 5. docker build (the legacy builder: BuildKit's frontend image cannot be pulled here), then
#    docker save to $CACHE/tars/IMAGE_TAG.tar. Unless KUBEFORGE_IMAGES_KEEP=1 the image is then
#    removed from the daemon: the tarball is the one copy (the runtime images are GBs). Not in a
#    daemon named by KUBEFORGE_DOCKER_HOST: its images are its owner's.
#
# Progress goes to stderr with elapsed seconds; the LAST lines on stdout are `REF TARBALL`, one per
# image, for `ctr -n k8s.io images import TARBALL` (testbed) or `docker load -i TARBALL`.
# A failure names its step and image, and exits non-zero.
#
# Environment: KUBEFORGE_IMAGES_CACHE (default ~/.cache/kubeforge-images), KUBEFORGE_PYTHON
# (a Python 3.11 with pip for the wheelhouse; default .venv/bin/python, else python3),
# KUBEFORGE_DOCKER_HOST, KUBEFORGE_IMAGES_KEEP.
set -euo pipefail
# The whole script is one block, read before it runs: editing this file during a build is safe.
{
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cache="${KUBEFORGE_IMAGES_CACHE:-$HOME/.cache/kubeforge-images}"
export KUBEFORGE_IMAGES_CACHE="$cache"
# The daemon's socket, pidfile and state; another cache dir gets a daemon of its own.
run=/run/kubeforge-images
[[ "$cache" == "$HOME/.cache/kubeforge-images" ]] || run="$run-$(printf %s "$cache" | sha256sum | cut -c1-8)"
keep="${KUBEFORGE_IMAGES_KEEP:-0}"
if [[ -n "${KUBEFORGE_PYTHON:-}" ]]; then pip_python="$KUBEFORGE_PYTHON"
elif [[ -x .venv/bin/python ]]; then pip_python=.venv/bin/python
else pip_python=python3; fi

images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=(operator runtime-cpu)

t0=$(date +%s)
export KUBEFORGE_IMAGES_T0=$t0
step="start"
log() { printf '[images %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
die() { printf '[images %4ss] ERROR in step "%s": %s\n' "$(( $(date +%s) - t0 ))" "$step" "$*" >&2; exit 1; }
trap 'rc=$?; [[ $rc == 0 ]] || printf "[images] ERROR: step \"%s\" failed (exit %s)\n" "$step" "$rc" >&2' EXIT
trap 'exit 143' TERM INT

mkdir -p "$cache/tars" "$cache/wheelhouse" "$cache/logs" "$cache/tmp"
exec 9> "$cache/.lock"
flock -n 9 || { log "another images/build.sh holds $cache/.lock; waiting"; flock 9; }

# -- 1. names, keys, what is up to date -----------------------------------------------------------
step="names"
declare -A ref key tarball
todo=()
for image in "${images[@]}"; do
  ref[$image]="$(python3 images/tags.py ref "$image")" || die "images/tags.py ref $image"
  key[$image]="$(python3 images/tags.py key "$image")" || die "images/tags.py key $image"
  tag="${ref[$image]##*:}"
  tarball[$image]="$cache/tars/${image}_${tag}.tar"
  if [[ -f "${tarball[$image]}" && "$(cat "${tarball[$image]}.key" 2>/dev/null)" == "${key[$image]}" ]]; then
    log "$image: up to date (${ref[$image]}, key ${key[$image]})"
  else
    todo+=("$image")
  fi
done

pids_to_stop=()
cleanup() {
  local pid
  for pid in "${pids_to_stop[@]}"; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  # dockerd can leave its network namespace and its data-root bind-mounted behind it.
  if [[ -n "${dockerd_pid:-}" && "$keep" != 1 ]] && ! kill -0 "$dockerd_pid" 2>/dev/null; then
    umount "$run/exec/netns/default" 2>/dev/null || true
    if mountpoint -q "$cache/docker"; then umount "$cache/docker" 2>/dev/null || true; fi
  fi
}

if [[ ${#todo[@]} -gt 0 ]]; then
  trap 'rc=$?; cleanup; [[ $rc == 0 ]] || printf "[images] ERROR: step \"%s\" failed (exit %s)\n" "$step" "$rc" >&2' EXIT

  # -- 2. a docker daemon ------------------------------------------------------------------------
  step="dockerd"
  if [[ -n "${KUBEFORGE_DOCKER_HOST:-}" ]]; then
    export DOCKER_HOST="$KUBEFORGE_DOCKER_HOST"
    docker version > /dev/null 2>&1 || die "no docker daemon answers at KUBEFORGE_DOCKER_HOST=$DOCKER_HOST"
  else
    export DOCKER_HOST="unix://$run/docker.sock"
    if docker version > /dev/null 2>&1; then
      log "dockerd: using the one already running at $DOCKER_HOST (pid $(cat "$run/dockerd.pid" 2>/dev/null))"
    else
      # Debian's Docker Engine and debootstrap (images/base.sh), installed on first use.
      "$repo/testbed/apt-install.sh" images docker.io debootstrap || die "cannot install docker.io and debootstrap"
      command -v dockerd > /dev/null || die "dockerd not found (apt-get install docker.io)"
      mkdir -p "$run" "$cache/docker"
      echo '{}' > "$cache/daemon.json"
      log "dockerd: starting (data-root $cache/docker, socket $DOCKER_HOST)"
      dockerd --data-root "$cache/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
        --host "$DOCKER_HOST" --config-file "$cache/daemon.json" \
        --bridge none --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false \
        > "$cache/logs/dockerd.log" 2>&1 9>&- &
      dockerd_pid=$!
      [[ "$keep" == 1 ]] || pids_to_stop+=("$dockerd_pid")
      for _ in $(seq 120); do
        docker version > /dev/null 2>&1 && break
        kill -0 "$dockerd_pid" 2>/dev/null || { tail -5 "$cache/logs/dockerd.log" >&2; die "dockerd exited"; }
        sleep 0.5
      done
      docker version > /dev/null 2>&1 || die "dockerd did not answer in 60 s ($cache/logs/dockerd.log)"
      log "dockerd: up, pid $dockerd_pid$([[ "$keep" == 1 ]] && echo ', left running (KUBEFORGE_IMAGES_KEEP=1)')"
    fi
  fi

  # -- 3. base images ----------------------------------------------------------------------------
  declare -A base
  for image in "${todo[@]}"; do
    case "$image" in operator) flavour=python ;; *) flavour=runtime ;; esac
    step="base $flavour"
    base[$image]="$(python3 images/tags.py base "$flavour")"
    if docker image inspect "${base[$image]}" > /dev/null 2>&1; then
      log "base $flavour: cached (${base[$image]})"
    else
      images/base.sh "$flavour" "${base[$image]}" || die "images/base.sh $flavour failed"
    fi
  done

  # -- 4. the wheelhouse -------------------------------------------------------------------------
  wheels="$cache/wheelhouse"
  pip() { "$pip_python" -m pip --disable-pip-version-check "$@"; }
  for image in "${todo[@]}"; do
    step="wheelhouse $image"
    requirements="$cache/tmp/requirements-$image.txt"
    # What the Dockerfile installs, asked the same way (images/pins.py), plus the build backend.
    case "$image" in
      operator) python3 images/pins.py deps operator > "$requirements" ;;
      runtime-*)
        build="${image#runtime-}"
        vllm="$(python3 images/pins.py vllm "$build")"
        pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "$vllm" \
          || die "pip download $vllm"
        wheel="$(ls "$wheels"/"$(echo "${vllm%%==*}" | tr - _)"-"${vllm##*==}"-*.whl | head -1)"
        { python3 images/pins.py deps runtime; python3 images/pins.py requires "$wheel"; } > "$requirements"
        ;;
    esac
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
      >> "$requirements"
    stamp="$wheels/.done-$(sha256sum "$requirements" | cut -c1-16)"
    if [[ -f "$stamp" ]]; then
      log "wheelhouse $image: cached ($(wc -l < "$requirements") requirements)"
    else
      log "wheelhouse $image: pip wheel $(wc -l < "$requirements") requirements into $wheels"
      pip wheel --quiet --no-cache-dir --wheel-dir "$wheels" -r "$requirements" \
        > "$cache/logs/wheelhouse-$image.log" 2>&1 \
        || { tail -20 "$cache/logs/wheelhouse-$image.log" >&2; die "pip wheel failed"; }
      touch "$stamp"
      log "wheelhouse $image: done ($(du -sh "$wheels" | cut -f1) in all)"
    fi
  done
  step="wheelhouse index"
  python3 - "$wheels" <<'EOF' || die "writing the wheelhouse index"
"""A PEP 503 simple index of a folder of wheels: simple/<name>/index.html links ../../<file>."""
import html, re, shutil, sys
from pathlib import Path
wheels = Path(sys.argv[1])
shutil.rmtree(wheels / "simple", ignore_errors=True)
names: dict[str, list[str]] = {}
for f in sorted(wheels.glob("*.whl")):
    names.setdefault(re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower(), []).append(f.name)
for name, files in names.items():
    (wheels / "simple" / name).mkdir(parents=True)
    links = "".join(f'<a href="../../{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
    (wheels / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
(wheels / "simple" / "index.html").write_text(
    "<!DOCTYPE html><html><body>\n" + "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(names)) + "</body></html>\n")
EOF
  # A fixed port keeps PIP_INDEX_URL, part of the RUN steps' cache key, the same from run to run.
  step="wheelhouse server"
  port="${KUBEFORGE_WHEELHOUSE_PORT:-38471}"
  python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" > "$cache/logs/wheelhouse-http.log" 2>&1 9>&- &
  server_pid=$!
  pids_to_stop+=("$server_pid")
  for _ in $(seq 40); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/simple/', timeout=1)" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || die "the wheelhouse server did not start on 127.0.0.1:$port (port taken? set KUBEFORGE_WHEELHOUSE_PORT)"
    sleep 0.25
  done
  index="http://127.0.0.1:$port/simple"

  # -- 5. build and save -------------------------------------------------------------------------
  version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
  revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  for image in "${todo[@]}"; do
    step="build $image"
    args=(--build-arg "PIP_INDEX_URL=$index" --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
    case "$image" in
      operator|runtime-cpu) args+=(--build-arg "PYTHON_IMAGE=${base[$image]}") ;;
      runtime-cuda) args+=(--build-arg "CUDA_IMAGE=${base[$image]}" --build-arg "PYTHON=python3.11") ;;
    esac
    [[ "$image" == runtime-cpu ]] && args+=(--build-arg "TORCH_INDEX_URL=$index")
    # The key again, as late as can be: the context docker build sends is the tree as it is now.
    key[$image]="$(python3 images/tags.py key "$image")" || die "images/tags.py key $image"
    started=$(date +%s)
    log "$image: docker build -t ${ref[$image]} (log: $cache/logs/build-$image.log)"
    # Each Dockerfile step is shown as it starts; the full output goes to the log.
    set +e
    DOCKER_BUILDKIT=0 docker build --network host --force-rm -f "images/$image/Dockerfile" "${args[@]}" \
      -t "${ref[$image]}" . 2>&1 | tee "$cache/logs/build-$image.log" | while IFS= read -r line; do
        [[ "$line" == Step\ * ]] && log "$image: ${line:0:110}"
      done
    rc=${PIPESTATUS[0]}
    set -e
    [[ $rc == 0 ]] || { tail -25 "$cache/logs/build-$image.log" >&2; die "docker build failed (log above)"; }
    size=$(docker image inspect -f '{{.Size}}' "${ref[$image]}")
    log "$image: built in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"

    step="save $image"
    started=$(date +%s)
    # Every older tarball of this image is stale now (another tag, or this tag with another key):
    # drop it before saving, so that the disk never holds two copies of a 7 GB image.
    for old in "$cache/tars/${image}"_*.tar; do rm -f "$old" "$old.key"; done
    docker save -o "${tarball[$image]}.partial" "${ref[$image]}" || die "docker save ${ref[$image]}"
    chmod 644 "${tarball[$image]}.partial"  # docker save writes 0600; other users' tools read it
    mv "${tarball[$image]}.partial" "${tarball[$image]}"
    echo "${key[$image]}" > "${tarball[$image]}.key"
    log "$image: saved in $(( $(date +%s) - started )) s, $(du -m "${tarball[$image]}" | cut -f1) MiB: ${tarball[$image]}"
    # Only in the daemon started for this build: another daemon's images are its owner's.
    if [[ "$keep" != 1 && -z "${KUBEFORGE_DOCKER_HOST:-}" ]]; then
      docker image rm "${ref[$image]}" > /dev/null
      docker image prune --force > /dev/null  # the untagged build stages
    fi
  done
  step="finish"
fi

step="report"
for image in "${images[@]}"; do
  printf '%s %s\n' "${ref[$image]}" "${tarball[$image]}"
done
exit 0
}
