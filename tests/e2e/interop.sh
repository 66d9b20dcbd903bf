#!/usr/bin/env bash
# Interoperability with a client written in another language from docs/PROTOCOL.md alone.
exec bash "$(dirname "$0")/../interop/run.sh" "$@"
