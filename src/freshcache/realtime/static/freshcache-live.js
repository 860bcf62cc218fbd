/**
 * freshcache-live.js: live fields over cached records, in the browser (an ES module).
 *
 * The seed's hybrid layer: a product's base record comes from the (cached) HTTP API,
 * its live fields (stock) from Socket.IO, and both merge into one view. A live field
 * always wins over the cached record, whatever arrives first. After a reconnect every
 * room is subscribed again with the last offset seen, so the page gets exactly the
 * updates it missed, or a fresh snapshot when the server's history no longer reaches
 * back: it never keeps showing a stale figure.
 *
 *   import { io } from "https://your.cdn/socket.io-client@4/socket.io.esm.min.js";
 *   import { connectLive, watchProduct } from "/static/freshcache-live.js";
 *
 *   const live = connectLive({ io, token });
 *   const product = await watchProduct(live, {
 *     productId: 42,
 *     url: "/api/products/42",
 *     onChange: (view) => render(view),   // view = {...cached record, stock}
 *   });
 *
 * The server acknowledges a subscription with {ok, recovered, offset, snapshot?}; room
 * events arrive as (payload, {room, offset}); "resync" (snapshot, {room, offset})
 * replaces a room's state. A product room's snapshot has the stockUpdate shape
 * ({productId, newStock, timestamp}).
 */

/**
 * Connect to the real-time server and keep subscriptions across reconnects.
 * @param {object} options
 * @param {Function} options.io socket.io-client v4's io()
 * @param {string} [options.url] server URL (default: the page's origin)
 * @param {string} options.token sent as the handshake's auth.token
 * @param {object} [options.socketOptions] more socket.io-client options
 */
export function connectLive({ io, url, token, socketOptions = {} }) {
  const options = { ...socketOptions, auth: { token } };
  const socket = url === undefined ? io(options) : io(url, options);
  const rooms = new Map();

  function request(room, entry) {
    const message = entry.offset === null ? { room } : { room, offset: entry.offset };
    socket.emit("subscribe", message, (ack) => {
      if (rooms.get(room) !== entry) return;
      if (!ack || !ack.ok) {
        if (entry.handlers.onError) entry.handlers.onError(ack ? ack.error : "no answer");
        return;
      }
      if (ack.offset) entry.offset = ack.offset;
      if (!ack.recovered && entry.handlers.onSnapshot) entry.handlers.onSnapshot(ack.snapshot, ack);
      if (entry.handlers.onSubscribed) entry.handlers.onSubscribed(ack);
    });
  }

  socket.on("connect", () => {
    for (const [room, entry] of rooms) request(room, entry);
  });

  socket.onAny((event, data, meta) => {
    if (!meta || typeof meta.room !== "string") return;
    const entry = rooms.get(meta.room);
    if (!entry) return;
    if (meta.offset) entry.offset = meta.offset;
    if (event === "resync") {
      if (entry.handlers.onSnapshot) entry.handlers.onSnapshot(data, meta);
    } else if (entry.handlers.onEvent) {
      entry.handlers.onEvent(event, data, meta);
    }
  });

  return {
    socket,
    /** Subscribe to `room` ("product:42"); handlers: onSnapshot, onEvent, onSubscribed, onError. */
    subscribe(room, handlers) {
      const entry = { offset: null, handlers };
      rooms.set(room, entry);
      if (socket.connected) request(room, entry);
      return () => {
        if (rooms.get(room) !== entry) return;
        rooms.delete(room);
        if (socket.connected) socket.emit("unsubscribe", { room });
      };
    },
    /** The last offset seen in `room` (what a reconnect resumes from). */
    offset(room) {
      const entry = rooms.get(room);
      return entry ? entry.offset : null;
    },
    close() {
      rooms.clear();
      socket.close();
    },
  };
}

/**
 * Load a cached record and keep its live fields current.
 * @param live what connectLive returned
 * @param {object} options
 * @param {string} options.room the live room ("order:7")
 * @param {string} options.url where the cached record is (JSON)
 * @param {Function} options.liveFields (event, data) -> fields to merge, or null to ignore
 * @param {Function} [options.snapshotFields] snapshot -> fields (default: liveFields)
 * @param {Function} [options.onChange] called with every new view
 * @param {Function} [options.fetch] fetch implementation; [options.init] its options
 */
export async function watchRecord(live, options) {
  const { room, url, liveFields, onChange = () => {}, init = {} } = options;
  const snapshotFields = options.snapshotFields || ((snapshot) => liveFields(null, snapshot));
  const fetchRecord = options.fetch || globalThis.fetch.bind(globalThis);
  let base = {};
  let current = {};
  const state = { view: {} };
  const update = (fields) => {
    if (!fields) return;
    current = { ...current, ...fields };
    state.view = { ...base, ...current };
    onChange(state.view);
  };
  const stop = live.subscribe(room, {
    onSnapshot: (snapshot) => update(snapshot ? snapshotFields(snapshot) : null),
    onEvent: (event, data) => update(liveFields(event, data)),
  });
  const response = await fetchRecord(url, init);
  if (!response.ok) {
    stop();
    throw new Error(`${url}: HTTP ${response.status}`);
  }
  base = await response.json();
  state.view = { ...base, ...current };
  onChange(state.view);
  return {
    get view() {
      return state.view;
    },
    stop,
  };
}

/** A product's cached record with its live stock (`stock`, from stockUpdate.newStock). */
export function watchProduct(live, { productId, url, onChange, fetch, init, field = "stock" }) {
  return watchRecord(live, {
    room: `product:${productId}`,
    url,
    onChange,
    fetch,
    init,
    liveFields: (event, data) =>
      (event === null || event === "stockUpdate") && data && "newStock" in data
        ? { [field]: data.newStock }
        : null,
  });
}

/** An order's cached record with its live status, tracking number and delivery date. */
export function watchOrder(live, { orderId, url, onChange, fetch, init }) {
  return watchRecord(live, {
    room: `order:${orderId}`,
    url,
    onChange,
    fetch,
    init,
    liveFields: (event, data) =>
      (event === null || event === "statusUpdate") && data && "status" in data
        ? {
            status: data.status,
            trackingNumber: data.trackingNumber,
            estimatedDelivery: data.estimatedDelivery,
          }
        : null,
  });
}
