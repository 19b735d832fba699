// The TypeScript SDK's SSEClientTransport through a stream cut mid-call.
//
// Usage: node reconnect.mjs <sse url> <in-flight call timeout, ms>
// Prints one JSON object a line, {"step": ..., ...}, for tests/test_outside_clients.py:
//   connected    the handshake is done (its protocol version, the POST endpoint)
//   before       a first call's result
//   inflight-sent  the "slow" call is sent; the test cuts the stream while the server runs it
//   reconnected  EventSource reconnected by itself and a new endpoint event arrived
//   after        the next call's result, on the new endpoint
//   inflight     what became of the call that was in flight during the cut
//   done         the client's onerror reports, then exit 0
// Any failure prints {"step": "failed", ...} and exits 1.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";

const report = (step, data = {}) => process.stdout.write(`${JSON.stringify({ step, ...data })}\n`);
const textOf = (result) => result.content?.[0]?.text;

async function main() {
  const [url, inflightTimeout] = [new URL(process.argv[2]), Number(process.argv[3])];
  const transport = new SSEClientTransport(url);
  const client = new Client({ name: "ts-sdk-reconnect-test", version: "1.0.0" });
  const errors = [];
  client.onerror = (error) => errors.push(String(error?.message ?? error));
  await client.connect(transport);
  report("connected", { protocol: transport._protocolVersion, endpoint: String(transport._endpoint) });

  // Endpoint events after the first: EventSource reconnected and the server opened a session.
  const reconnected = new Promise((resolve) => {
    transport._eventSource.addEventListener("endpoint", (event) => resolve(event.data), { once: true });
  });

  report("before", { text: textOf(await client.callTool({ name: "echo", arguments: { text: "before" } })) });

  const inflight = client.callTool({ name: "slow", arguments: {} }, undefined, { timeout: inflightTimeout }).then(
    (result) => ({ outcome: "result", text: textOf(result) }),
    (error) => ({ outcome: "error", name: error?.constructor?.name, code: error?.code, message: error?.message }),
  );
  report("inflight-sent");

  report("reconnected", { endpoint: await reconnected });
  report("after", { text: textOf(await client.callTool({ name: "echo", arguments: { text: "after" } })) });
  report("inflight", await inflight);
  report("done", { errors });
  await client.close();
}

main().then(
  () => process.exit(0),
  (error) => {
    report("failed", { name: error?.constructor?.name, code: error?.code, message: String(error?.message ?? error) });
    process.exit(1);
  },
);
