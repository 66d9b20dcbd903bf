# syntax=docker/dockerfile:1
# Relay container: the release binary built by packaging/build-release.sh (the same steps CI runs)
# on Debian 12, run on debian:bookworm-slim as a non-root user. The identity is created on first
# start in the /data volume and kept there: keep the volume and the relay keeps its address.
#
#   docker build -t relay .
#   docker run -d --name relay -p 5223:5223 -p 127.0.0.1:5280:5280 -v relay-data:/data relay
#   docker logs relay | grep 'Relay ready'      # the relay's identity, printed at every start
#   docker exec relay relay address --data /data --host relay.example.com   # the public address
#
# Build stage. Microsoft ships no Debian image of the .NET 10 SDK (its 10.0 tags are Ubuntu), and
# the binary must be linked against Debian 12's RocksDB 7.8.3 and glibc 2.36 to run on the
# bookworm runtime below, so the SDK (the version global.json names) is installed on Debian 12.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl libicu72 binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY global.json ./
RUN curl -fsSL https://dot.net/v1/dotnet-install.sh -o /tmp/dotnet-install.sh \
 && bash /tmp/dotnet-install.sh --jsonfile global.json --install-dir /usr/share/dotnet \
 && ln -s /usr/share/dotnet/dotnet /usr/bin/dotnet \
 && rm /tmp/dotnet-install.sh
ENV DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
COPY . .
# build-release.sh installs clang, lld and the static libraries it links with apt-get.
# (Build output copied from a developer's checkout is dropped first; a .dockerignore would save the copy.)
RUN rm -rf artifacts obj src/*/bin src/*/obj tests/*/bin tests/*/obj \
 && OUT=/out packaging/build-release.sh

# Runtime stage: glibc, OpenSSL (loaded at run time for TLS) and the one binary.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /data --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0700 /data
COPY --from=build /out/relay /usr/bin/relay
USER relay:relay
WORKDIR /data
VOLUME /data
EXPOSE 5223 5280
# /healthz on the admin listener; the image has no curl, so bash speaks HTTP/1.0 over /dev/tcp.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5280 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# serve creates the identity in /data on first start and logs "Relay ready at relay://...".
# The admin listener binds 0.0.0.0 inside the container for the health check and Prometheus;
# publish it only on the host's loopback (-p 127.0.0.1:5280:5280).
ENTRYPOINT ["/usr/bin/relay", "serve", "--data", "/data", "--listen", "0.0.0.0:5223", "--admin", "0.0.0.0:5280"]
