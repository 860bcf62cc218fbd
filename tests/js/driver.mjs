// A socket.io-client v4 remote-controlled by a test: one JSON command per stdin line,
// one JSON report per stdout line.
//
//   node driver.mjs <server url>
//
// Commands:
//   {"op": "connect", "token": "...", "options": {...}}   a raw socket.io-client socket
//   {"op": "emit", "event": "...", "data": ..., "id": n}  reports {"type": "ack", "id", "args"}
//   {"op": "drop"}            closes the transport as a network failure would (auto-reconnect)
//   {"op": "disconnect"}      socket.disconnect();  {"op": "reconnect"}: socket.connect()
//   {"op": "watch_product", "token", "productId", "url"}  freshcache-live.js's watchProduct
//   {"op": "exit"}
// Reports: connect, connect_error {message}, disconnect {reason}, event {event, args},
// view {view} (watch_product), error {message}.

import { copyFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { io } from "socket.io-client";

const serverUrl = process.argv[2];
let socket = null;

function report(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

function watch(target) {
  target.on("connect", () => report({ type: "connect", id: target.id }));
  target.on("connect_error", (error) => report({ type: "connect_error", message: error.message }));
  target.on("disconnect", (reason) => report({ type: "disconnect", reason }));
  target.onAny((event, ...args) => report({ type: "event", event, args }));
}

async function loadLiveModule() {
  // The shipped file is an ES module with a .js name: copy it as .mjs for node.
  const folder = mkdtempSync(join(tmpdir(), "freshcache-live-"));
  const copy = join(folder, "freshcache-live.mjs");
  copyFileSync(process.env.FRESHCACHE_LIVE_JS, copy);
  return import(pathToFileURL(copy).href);
}

async function run(command) {
  switch (command.op) {
    case "connect":
      socket = io(serverUrl, { ...(command.options || {}), auth: { token: command.token } });
      watch(socket);
      break;
    case "emit":
      socket.emit(command.event, command.data, (...args) =>
        report({ type: "ack", id: command.id, args }),
      );
      break;
    case "drop":
      socket.io.engine.close();
      break;
    case "disconnect":
      socket.disconnect();
      break;
    case "reconnect":
      socket.connect();
      break;
    case "watch_product": {
      const live = await loadLiveModule();
      const connection = live.connectLive({
        io,
        url: serverUrl,
        token: command.token,
        socketOptions: command.options || {},
      });
      socket = connection.socket;
      watch(socket);
      await live.watchProduct(connection, {
        productId: command.productId,
        url: command.url,
        onChange: (view) => report({ type: "view", view, offset: connection.offset(`product:${command.productId}`) }),
      });
      break;
    }
    case "exit":
      if (socket) socket.close();
      process.exit(0);
  }
}

createInterface({ input: process.stdin }).on("line", (line) => {
  run(JSON.parse(line)).catch((error) => report({ type: "error", message: String(error) }));
});
