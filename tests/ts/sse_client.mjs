// The TypeScript SDK's SSEClientTransport against an MCP server with the example's tools
// (echo, countdown, fail), for tests/test_frameworks.py.
//
// Usage: node sse_client.mjs <sse url>
// Prints one JSON object on stdout and exits 0:
//   {"tools": [names], "echo": text, "progress": [numbers], "countdown": text,
//    "fail": {"isError": bool, "text": text}}
// Any failure, or anything the SDK reports to client.onerror, goes to stderr, exit 1.
//
// The client is the SDK's own, unmodified. countdown reports its steps 50 ms apart: the SDK 1.x
// handles a response at once but a notification a microtask later, so progress that arrives in
// the same chunk as its call's response finds its handler retired (onprogress never runs; onerror
// gets "unknown token": https://github.com/modelcontextprotocol/typescript-sdk/issues/2580). The
// README's client table says so.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";

const textOf = (result) => result.content?.[0]?.text;

async function main() {
  const url = process.argv[2];
  if (!url) throw new Error("usage: node sse_client.mjs <sse url>");
  const client = new Client({ name: "mcp-sse-transport-ts-sse-client", version: "1.0.0" });
  const errors = [];
  client.onerror = (error) => errors.push(String(error?.message ?? error));
  const transport = new SSEClientTransport(new URL(url));
  await client.connect(transport);
  try {
    const { tools } = await client.listTools();
    const echo = await client.callTool({ name: "echo", arguments: { text: "hi" } });
    const progress = [];
    const countdown = await client.callTool({ name: "countdown", arguments: { steps: 3, interval: 0.05 } }, undefined, {
      onprogress: ({ progress: value }) => progress.push(value),
    });
    const fail = await client.callTool({ name: "fail", arguments: { reason: "boom" } });
    if (errors.length) throw new Error(`client.onerror: ${errors.join("; ")}`);
    const report = {
      tools: tools.map((tool) => tool.name),
      echo: textOf(echo),
      progress,
      countdown: textOf(countdown),
      fail: { isError: fail.isError === true, text: textOf(fail) },
    };
    await new Promise((resolve) => process.stdout.write(`${JSON.stringify(report)}\n`, resolve));
  } finally {
    await client.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stderr.write(`${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
