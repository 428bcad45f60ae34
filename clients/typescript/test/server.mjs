// Starts a private `integrations serve` for the tests through scripts/serve.sh
// (the same start as scripts/generate.sh): embedded PostgreSQL in a temporary
// directory, the `github` provider pointed at the stand-in token endpoint
// scripts/schemathesis.d/fake_provider.py, and an API key with every scope.
// The shell waits on its stdin; closing it (stop(), or this process dying)
// stops the server and the provider and removes the directory.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

export const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

export function startServer() {
  const script = `
    . scripts/serve.sh
    trap stop_serve EXIT
    trap 'exit 0' TERM INT
    printf 'READY %s %s %s\\n' "$base" "$key" "$provider_port"
    read -r _ || true
  `;
  const child = spawn("bash", ["-c", script], {
    cwd: packageDir,
    stdio: ["pipe", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    let out = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const line = out.split("\n").find((l) => l.startsWith("READY "));
      if (!line) return;
      const [, baseUrl, apiKey, providerPort] = line.trim().split(" ");
      resolve({
        baseUrl,
        apiKey,
        providerPort: Number(providerPort),
        stop: () =>
          new Promise((done) => {
            if (child.exitCode !== null) return done();
            child.once("exit", () => done());
            child.stdin.end();
          }),
      });
    });
    child.once("exit", (code) => reject(new Error(`integrations serve did not start (exit ${code})`)));
  });
}
