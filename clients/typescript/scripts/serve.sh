# Sourced by generate.sh and by the tests' server helper (test/server.mjs runs
# it through `bash -c`): starts a private `integrations serve` (embedded
# PostgreSQL in a temporary directory) with one provider, `github`, pointed at
# the local stand-in token endpoint scripts/schemathesis.d/fake_provider.py,
# and an API key with every scope, the way scripts/schemathesis does.
#
# In:  INTEGRATIONS_BIN (default: $CARGO_TARGET_DIR or <repo>/target, debug)
# Out: base (http://127.0.0.1:PORT), key (the API key), work (the temp dir),
#      provider_port, server_pid, provider_pid; stop_serve removes it all.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
bin=${INTEGRATIONS_BIN:-${CARGO_TARGET_DIR:-$repo_root/target}/debug/integrations}
if [ ! -x "$bin" ]; then
    echo "no integrations binary at $bin: run cargo build -p integrations --bin integrations" >&2
    exit 1
fi

work=$(mktemp -d)
# Running as root, the embedded PostgreSQL runs as `postgres`, which must
# reach its data directory.
chmod 755 "$work"
server_pid=""
provider_pid=""
stop_serve() {
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
    [ -z "$provider_pid" ] || kill "$provider_pid" 2>/dev/null || true
    [ -z "$server_pid" ] || wait "$server_pid" 2>/dev/null || true
    rm -rf "$work"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
provider_port=$(free_port)
base=http://127.0.0.1:$port

python3 "$repo_root/scripts/schemathesis.d/fake_provider.py" "$provider_port" &
provider_pid=$!

cat >"$work/providers.toml" <<TOML
[github]
authorize_url = "http://127.0.0.1:$provider_port/authorize"
token_url = "http://127.0.0.1:$provider_port/token"
revoke_url = "http://127.0.0.1:$provider_port/revoke"
userinfo_url = "http://127.0.0.1:$provider_port/userinfo"
client_id = "ts-client"
client_secret_env = "TS_CLIENT_GITHUB_SECRET"
client_auth = "post"
scopes = ["read"]
account_id = { from = "userinfo", pointer = "/id" }
TOML

export INTEGRATIONS_PROVIDERS=$work/providers.toml
export TS_CLIENT_GITHUB_SECRET=ts-client-secret
export INTEGRATIONS_CALLBACK_URL=$base/v1/oauth/callback
export INTEGRATIONS_REDIRECT_ORIGINS=https://app.example.com
export INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE=true
export INTEGRATIONS_ENCRYPTION_KEYS="k1:$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
unset DATABASE_URL DIRECT_URL DATABASE_PROFILE
export RUST_LOG=${RUST_LOG:-warn}

"$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --no-refresher \
    >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
    if curl -fsS "$base/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        cat "$work/server.log" >&2
        echo "integrations serve exited before it was ready" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS "$base/readyz" >/dev/null

key=$("$bin" api-key create --data-dir "$work/data" --name ts-client \
    --scopes read,write,credentials,admin 2>/dev/null | tail -n 1)
