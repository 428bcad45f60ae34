// Starts a private `integrations serve` for the tests through scripts/serve.sh
// (the same start as scripts/generate.sh): embedded PostgreSQL in a temporary
// directory, the `github` provider pointed at the stand-in token endpoint
// scripts/schemathesis.d/fake_provider.py, and an API key with every scope.
// The shell waits on its stdin; closing it (stop(), or this process dying)
// stops the server and the provider and removes the directory.
import { execFile, spawn } from "node:child_process";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import path from "node:path";

const run = promisify(execFile);

export const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

export function startServer() {
  const script = `
    . scripts/serve.sh
    trap stop_serve EXIT
    trap 'exit 0' TERM INT
    printf 'READY %s %s %s %s %s\\n' "$base" "$key" "$provider_port" "$bin" "$work/data"
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
      const [, baseUrl, apiKey, providerPort, bin, dataDir] = line.trim().split(" ");
      resolve({
        baseUrl,
        apiKey,
        providerPort: Number(providerPort),
        /** Another API key with these scopes (comma-separated), from `integrations api-key create`. */
        createKey: async (name, scopes) => {
          const { DATABASE_URL, DIRECT_URL, DATABASE_PROFILE, ...env } = process.env;
          const { stdout } = await run(bin, ["api-key", "create", "--data-dir", dataDir, "--name", name, "--scopes", scopes], { env });
          return stdout.trim().split("\n").at(-1);
        },
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
