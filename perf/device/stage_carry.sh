#!/usr/bin/env bash
# Lets a second checkout (a helper's git worktree) run on the device: the device tool only sends the session's own
# checkout (/work/main) plus the ignored folders named in `carry`. This copies this checkout's files (tracked and
# untracked-not-ignored, as they are on disk) and its .carry/ (made by pack.sh) into MAIN/.carry-NAME/, which
# .gitignore ignores. Then, on the device:
#   run(command="cd .carry-NAME && bash perf/device/run.sh quick", carry=[".carry-NAME"])
# unpack.sh links the source path recorded in .carry/BUILD_INFO to the copy, so the build's absolute paths resolve.
#
#   perf/device/stage_carry.sh NAME [MAIN]    MAIN defaults to /work/main
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
name=${1:?usage: perf/device/stage_carry.sh NAME [MAIN]}
main=${2:-/work/main}
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "stage_carry.sh: NAME '$name' must be letters, digits, _ or -" >&2; exit 2; }
[ -f "$repo/.carry/kmoe-gpu-build.tgz" ] || { echo "stage_carry.sh: $repo/.carry/kmoe-gpu-build.tgz missing: run perf/device/pack.sh first" >&2; exit 1; }
dest=$main/.carry-$name
rm -rf "$dest"
mkdir -p "$dest"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) |
  tar -xf - -C "$dest"
cp -a "$repo/.carry" "$dest/.carry"
du -sh "$dest" >&2
