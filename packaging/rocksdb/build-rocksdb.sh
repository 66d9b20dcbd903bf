#!/usr/bin/env bash
# Builds the RocksDB that the release binary links: Debian 12's RocksDB 7.8.3 (the source of its
# librocksdb-dev, checked against the SHA-256 Debian publishes) compiled as a release build.
# Debian's own librocksdb.a is built without NDEBUG and without SSE4.2: every assertion of RocksDB
# runs (the memtable's skip list compares keys again on each insert) and CRC32C is computed in
# software. Same version, same file formats; docs/PERFORMANCE.md (seventeenth round) has the cost.
#
#   packaging/rocksdb/build-rocksdb.sh DIR     # prints DIR/lib/librocksdb.a, built once and kept
#
# Needs cmake, make and clang (build-release.sh installs them) and the Debian archive over HTTP
# (DEBIAN_MIRROR, default http://deb.debian.org/debian). The result is kept in DIR and reused while
# its source and build flags are unchanged. All output but the library's path goes to stderr.
set -euo pipefail

VERSION=7.8.3
SHA256=b85408a374770897332bf15e51620a5f35720dd416a4749e3899057f9cfaf84d
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DIR=$1
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
LIB=$DIR/lib/librocksdb.a
# Release: -O3 and NDEBUG. PORTABLE: no -march=native, so that the binary runs on any x86-64 CPU
# with SSE4.2 (FORCE_SSE42: hardware CRC32C, as every x86-64 server since 2010 has). The codecs are
# those of Debian's build (the store writes uncompressed tables; the link line stays the same).
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DPORTABLE=ON -DFORCE_SSE42=ON
    -DWITH_TESTS=OFF -DWITH_TOOLS=OFF -DWITH_CORE_TOOLS=OFF -DWITH_BENCHMARK_TOOLS=OFF -DWITH_GFLAGS=OFF
    -DROCKSDB_BUILD_SHARED=OFF -DFAIL_ON_WARNINGS=OFF
    -DWITH_ZLIB=ON -DWITH_BZ2=ON -DWITH_LZ4=ON -DWITH_ZSTD=ON -DWITH_SNAPPY=ON)
# A library built from another source or with other flags is built again.
STAMP=$(echo "$VERSION $SHA256 clang ${CMAKE_FLAGS[*]}" | sha256sum | cut -c1-16)

if [ -f "$LIB" ] && [ "$(cat "$DIR/stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "$LIB"
    exit 0
fi

TARBALL=$DIR/rocksdb_$VERSION.orig.tar.gz
if ! echo "$SHA256  $TARBALL" | sha256sum -c --status 2>/dev/null; then
    echo "build-rocksdb: fetching rocksdb_$VERSION.orig.tar.gz from $MIRROR" >&2
    curl -fsSL --retry 3 -o "$TARBALL.part" "$MIRROR/pool/main/r/rocksdb/rocksdb_$VERSION.orig.tar.gz" || {
        echo "build-rocksdb: cannot fetch the RocksDB source from $MIRROR (set DEBIAN_MIRROR)" >&2; exit 1; }
    echo "$SHA256  $TARBALL.part" | sha256sum -c --status || {
        rm -f "$TARBALL.part"
        echo "build-rocksdb: rocksdb_$VERSION.orig.tar.gz from $MIRROR does not match Debian's SHA-256" >&2; exit 1; }
    mv "$TARBALL.part" "$TARBALL"
fi

rm -rf "$DIR/src" "$DIR/build" "$DIR/lib" "$DIR/stamp"
mkdir -p "$DIR/src" "$DIR/build" "$DIR/lib"
tar -xzf "$TARBALL" -C "$DIR/src" --strip-components=1
echo "build-rocksdb: building RocksDB $VERSION (release build, SSE4.2; about eight minutes on two cores)" >&2
(
    cd "$DIR/build"
    CC=clang CXX=clang++ cmake "$DIR/src" "${CMAKE_FLAGS[@]}" >cmake.log 2>&1 || { cat cmake.log >&2; exit 1; }
    make -j"$(nproc)" rocksdb >make.log 2>&1 || { tail -50 make.log >&2; exit 1; }
) || { echo "build-rocksdb: the RocksDB build failed" >&2; exit 1; }
cp "$DIR/build/librocksdb.a" "$LIB"
rm -rf "$DIR/src" "$DIR/build"
echo "$STAMP" > "$DIR/stamp"
echo "$LIB"
