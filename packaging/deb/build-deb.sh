#!/usr/bin/env bash
# Builds relay_<version>_amd64.deb with dpkg-deb from the release binary:
#   /usr/bin/relay                       the static NativeAOT binary (packaging/build-release.sh)
#   /lib/systemd/system/relay.service    packaging/systemd/relay.service
#   /etc/relay/relay.json                default configuration (a conffile)
#
#   packaging/deb/build-deb.sh                      # -> artifacts/relay_<version>_amd64.deb
#   RELAY=/path/to/relay OUT=/tmp packaging/deb/build-deb.sh
#
# RELAY defaults to artifacts/relay and is built with build-release.sh when missing. The version
# comes from $VERSION or packaging/VERSION.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$ROOT/artifacts}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RELAY=${RELAY:-$OUT/relay}
VERSION=${VERSION:-$(tr -d ' \n' < "$ROOT/packaging/VERSION")}
ARCH=amd64

if [ ! -x "$RELAY" ]; then
    OUT=$(dirname "$RELAY") "$ROOT/packaging/build-release.sh"
fi
command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/relay
install -D -m 0755 "$RELAY" "$PKG/usr/bin/relay"
install -D -m 0644 "$ROOT/packaging/systemd/relay.service" "$PKG/lib/systemd/system/relay.service"
install -D -m 0644 "$HERE/relay.json" "$PKG/etc/relay/relay.json"
install -D -m 0644 /dev/null "$PKG/usr/share/doc/relay/README.Debian"
cat > "$PKG/usr/share/doc/relay/README.Debian" <<'DOC'
relay for Debian
================

The package installs /usr/bin/relay, the systemd unit relay.service and the default
configuration /etc/relay/relay.json (relay serve --help lists every key).

  systemctl status relay                         # started and enabled on installation
  journalctl -u relay | grep 'Relay ready'       # the relay address (identity fingerprint)
  relay address --data /var/lib/relay --host relay.example.com   # as root: the public address

The service runs with a dynamic user; its state (identity and queue store) lives in
/var/lib/private/relay, reached through /var/lib/relay. Purging the package keeps it:
the identity is the relay's address. Remove /var/lib/private/relay by hand to start anew.
DOC

# The highest glibc symbol version the binary needs; libssl is loaded at run time for TLS.
GLIBC=$(objdump -T "$RELAY" | grep -Eo 'GLIBC_[0-9.]+' | sed 's/GLIBC_//' | sort -Vu | tail -1)
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)

mkdir -p "$PKG/DEBIAN"
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: relay
Version: $VERSION
Architecture: $ARCH
Maintainer: Relay maintainers <relay@localhost>
Section: net
Priority: optional
Installed-Size: $SIZE
Depends: libc6 (>= $GLIBC), libssl3 | libssl1.1
Homepage: https://github.com/relay/relay
Description: store-and-forward relay for end-to-end-encrypted messages
 Relay keeps only ciphertext, in one-way queues with random ids, in an embedded
 RocksDB: no keys that decrypt anything, no accounts, no contact graph, no IP
 addresses. One native binary with RocksDB linked in; every message it
 acknowledges is fsynced before the sender hears OK.
CONTROL

echo /etc/relay/relay.json > "$PKG/DEBIAN/conffiles"

cat > "$PKG/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # relay.service uses DynamicUser=yes and StateDirectory=relay: systemd keeps the state in
    # /var/lib/private/relay (owned by the dynamic user, chowned at start) and links
    # /var/lib/relay to it. /var/lib/private must not be reachable by other users.
    install -d -m 0700 /var/lib/private
    [ -e /var/lib/relay ] || install -d -m 0700 /var/lib/private/relay
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        systemctl enable relay.service >/dev/null 2>&1 || true
        if [ -n "$2" ]; then
            systemctl try-restart relay.service || echo "relay: restart failed; see journalctl -u relay" >&2
        else
            systemctl start relay.service || echo "relay: start failed; see journalctl -u relay" >&2
        fi
    fi
fi
exit 0
SCRIPT

cat > "$PKG/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    case "$1" in
        remove|deconfigure) systemctl disable --now relay.service >/dev/null 2>&1 || true ;;
        upgrade) ;;   # postinst of the new version restarts it
    esac
fi
exit 0
SCRIPT

cat > "$PKG/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
case "$1" in
    remove|purge)
        if [ -d /run/systemd/system ]; then
            systemctl stop relay.service >/dev/null 2>&1 || true
            systemctl daemon-reload || true
        fi
        ;;
esac
# purge keeps /var/lib/private/relay: the identity in it is the relay's address.
exit 0
SCRIPT
chmod 0755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/prerm" "$PKG/DEBIAN/postrm"

(cd "$PKG" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$PKG/DEBIAN/md5sums"

DEB=$OUT/relay_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$DEB" >/dev/null
echo "build-deb: $DEB ($(stat -c %s "$DEB") bytes)"
