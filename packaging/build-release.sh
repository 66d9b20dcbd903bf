#!/usr/bin/env bash
# Builds the release binary: one NativeAOT executable with RocksDB (Debian 12's 7.8.3, built from
# its source as a release build by packaging/rocksdb/build-rocksdb.sh), Debian's compression
# libraries, libstdc++ and libgcc linked in statically, so that it needs nothing but glibc. Writes
# $OUT/relay (default: artifacts/relay in the repository).
#
#   packaging/build-release.sh            # -> artifacts/relay
#   OUT=/tmp/dist packaging/build-release.sh
#
# Installs the build dependencies with apt-get when they are missing (as root, or through sudo).
# Fails on any build warning. Used by .ci/run, the Dockerfile and packaging/deb/build-deb.sh. The
# RocksDB build (about eight minutes on two cores) is kept in obj/release/rocksdb and reused;
# ROCKSDB_LIB=/path/librocksdb.a links another one instead (Debian's librocksdb-dev works, at the
# cost docs/PERFORMANCE.md gives in its seventeenth round).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/artifacts}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RID=linux-x64
LIBDIR=/usr/lib/x86_64-linux-gnu
# The build tree is kept apart from the ordinary bin/ and obj/ (obj/ is git-ignored), so that this
# build never reuses a native link of a plain `dotnet publish` and does not race with `dotnet test`.
BUILD=${BUILD_DIR:-$ROOT/obj/release}

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

# clang and lld link; cmake, make and clang build RocksDB; the -dev packages provide the static
# archives linked into the binary (librocksdb.a references snappy, lz4, zstd, bz2 and zlib; `nm -u`
# lists nothing else outside glibc and libstdc++). clang depends on libstdc++-dev, which provides
# libstdc++.a.
DEPS=(clang lld cmake make curl ca-certificates zlib1g-dev libsnappy-dev liblz4-dev libzstd-dev libbz2-dev)
missing=()
for p in "${DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-release: installing ${missing[*]}"
    SUDO=
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for lib in libsnappy liblz4 libzstd libbz2 libz; do
    [ -f "$LIBDIR/$lib.a" ] || { echo "build-release: $LIBDIR/$lib.a is missing" >&2; exit 1; }
done
LIBSTDCXX=$(clang++ -print-file-name=libstdc++.a)
[ -f "$LIBSTDCXX" ] || { echo "build-release: libstdc++.a not found (install libstdc++-dev)" >&2; exit 1; }

mkdir -p "$BUILD"
ROCKSDB_LIB=${ROCKSDB_LIB:-$("$ROOT/packaging/rocksdb/build-rocksdb.sh" "$BUILD/rocksdb")}
[ -f "$ROCKSDB_LIB" ] || { echo "build-release: $ROCKSDB_LIB is missing" >&2; exit 1; }

# arc4random() for libstdc++.a, so that the binary needs glibc 2.35 rather than 2.36.
COMPAT=$BUILD/arc4random.o
clang -O2 -fPIC -Wall -Werror -c "$ROOT/packaging/glibc-compat/arc4random.c" -o "$COMPAT"

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
echo "build-release: dotnet publish (NativeAOT, static RocksDB: $ROCKSDB_LIB)"
rc=0
dotnet publish "$ROOT/src/Relay/Relay.csproj" -c Release -r "$RID" \
    --artifacts-path "$BUILD" -o "$BUILD/publish" \
    -p:StaticRocksDb=true -p:StaticLibDir="$LIBDIR" -p:StaticRocksDbLib="$ROCKSDB_LIB" -p:StaticLibStdCxx="$LIBSTDCXX" -p:GlibcCompatObject="$COMPAT" \
    >"$LOG" 2>&1 || rc=$?
# NU1603 is a restore notice about the package mirror, not a build warning (see Directory.Build.props).
warnings=$(grep -E '(warning|error) [A-Z]+[0-9]+' "$LOG" | grep -v NU1603 | sort -u || true)
if [ "$rc" -ne 0 ] || [ -n "$warnings" ]; then
    cat "$LOG" >&2
    echo "build-release: publish failed (exit $rc) or warned:" >&2
    [ -z "$warnings" ] || printf '%s\n' "$warnings" >&2
    exit 1
fi

BIN=$BUILD/publish/relay
# Everything beyond glibc must be inside the binary.
needed=$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
    case "$lib" in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
        *) echo "build-release: $BIN needs $lib; only glibc may be linked dynamically" >&2; exit 1 ;;
    esac
done

install -m 0755 "$BIN" "$OUT/relay"
glibc=$(objdump -T "$OUT/relay" | grep -Eo 'GLIBC_[0-9.]+' | sort -Vu | tail -1)
echo "build-release: $OUT/relay ($(stat -c %s "$OUT/relay") bytes; needs $(echo $needed); $glibc)"
