# Source on the device machine (bash), from the repository root: unpacks the sm_90 build that perf/device/pack.sh
# made (.carry/kmoe-gpu-build.tgz -> build-gpu/) and recreates the absolute paths the binaries were built with
# (/work/main, /work/gpu-src or the src that BUILD_INFO names, e.g. a worktree staged by stage_carry.sh,
# /work/shared/testdata) as links when they are free.
tar xzf .carry/kmoe-gpu-build.tgz -C "$PWD"
mkdir -p /work
built_src=$(sed -n 's/^src: \([^ ]*\).*/\1/p' .carry/BUILD_INFO 2>/dev/null)
for p in /work/main /work/gpu-src $built_src; do [ -e "$p" ] || ln -s "$PWD" "$p"; done
[ -e /work/shared ] || ln -s "$PWD/.carry/shared" /work/shared
# A source path linked above resolves "SRC/../shared" (the tests' testdata) through the link to this copy's parent.
[ -e "$(dirname "$PWD")/shared" ] || ln -s "$PWD/.carry/shared" "$(dirname "$PWD")/shared"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$PWD/build-gpu/carry-lib:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
