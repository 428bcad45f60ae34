#!/usr/bin/env bash
# Regenerates src/schema.d.ts from the /openapi.json of a private
# `integrations serve` (see serve.sh; the binary must be built:
# cargo build -p integrations --bin integrations).
#
#   generate.sh           write src/schema.d.ts
#   generate.sh --check   write nothing; fail (exit 1, with a diff) when the
#                         committed src/schema.d.ts differs from what the
#                         current document generates
#   SCHEMA_TS=FILE        with --check: compare FILE instead of src/schema.d.ts
#   OPENAPI_URL=http://.../openapi.json   use that server's document instead
#                         of starting one
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=$PWD
check=false
[ "${1:-}" != "--check" ] || check=true

if [ -n "${OPENAPI_URL:-}" ]; then
    # A server already running (the tests pass theirs).
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    curl -fsS "$OPENAPI_URL" -o "$work/openapi.json"
else
    # shellcheck source=serve.sh
    . scripts/serve.sh
    trap stop_serve EXIT
    curl -fsS "$base/openapi.json" -o "$work/openapi.json"
fi
npx --no-install openapi-typescript "$work/openapi.json" --empty-objects-unknown -o "$work/schema.d.ts" >/dev/null

if $check; then
    if ! diff -u "${SCHEMA_TS:-src/schema.d.ts}" "$work/schema.d.ts"; then
        echo "src/schema.d.ts is stale: run clients/typescript/scripts/generate.sh and commit it" >&2
        exit 1
    fi
    echo "src/schema.d.ts matches the current /openapi.json"
else
    cp "$work/schema.d.ts" "$pkg/src/schema.d.ts"
    echo "wrote src/schema.d.ts"
fi
