/**
 * The live dashboard page (an ES module, no dependencies, nothing loaded from elsewhere).
 *
 * A tenant's API key opens the tenant's dashboard: the pre-computed figures of
 * GET /api/dashboard (and of the stream's "metrics" and "dashboard" events), with the
 * live events of /api/dashboard/live-stream laid over them: a "newOrder" after the
 * figures were computed adds to the orders and revenue, a "lowStock" to the stock alerts.
 * The admin token opens the operator's view: GET /api/monitoring/overview and the
 * operator stream ("metrics": the overview each interval; "alerts": the firing alerts).
 *
 * Every value from the server reaches the page as text (textContent), never as HTML.
 */

const TOKEN_KEY = "freshcache.dashboard.token";
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#4f46e5", "#0f9f8f", "#d97706", "#db2777", "#0284c7", "#65a30d", "#7c3aed"];
const MAX_FEED = 50;

const $ = (id) => document.getElementById(id);
// Prices carry no currency in the API: amounts are shown as plain numbers.
const money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const roundMoney = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const whole = new Intl.NumberFormat();
const percent = (value) => `${(value * 100).toFixed(value >= 0.995 || value === 0 ? 0 : 1)}%`;
const clock = (ms) =>
  new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const axisClock = (ms) =>
  new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const axisShortClock = (ms) =>
  new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
const axisMoney = (value) => (value >= 10 || value === 0 ? roundMoney.format(value) : money.format(value));

let session = null; // {token, role, source, view}

// -- start --------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    open($("token").value.trim());
  });
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("resize", () => session && session.view && session.view.render());
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) open(saved);
  else showLogin("");
}

function showLogin(message) {
  for (const id of ["tenant-view", "operator-view"]) $(id).hidden = true;
  $("login").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message;
  setStatus("idle", "not connected");
  $("token").focus();
}

function signOut() {
  if (session && session.source) session.source.close();
  session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  showLogin("");
}

async function open(token) {
  if (!token) return;
  $("login-error").textContent = "";
  let role;
  try {
    role = await roleOf(token);
  } catch (error) {
    showLogin(`The service cannot be reached (${error.message}).`);
    return;
  }
  if (role === null) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("This token was refused.");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("sign-out").hidden = false;
  session = { token, role, source: null, view: null };
  if (role.kind === "operator") startOperator(session, role.data);
  else startTenant(session, role.data);
}

/** "operator" if the token reads the alerts, "tenant" if it reads a dashboard, else null. */
async function roleOf(token) {
  const headers = { Authorization: `Bearer ${token}` };
  const alerts = await fetch("/api/monitoring/overview", { headers });
  if (alerts.ok) return { kind: "operator", data: await alerts.json() };
  const dashboard = await fetch("/api/dashboard", { headers });
  if (dashboard.ok) return { kind: "tenant", data: await dashboard.json() };
  return null;
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

/** An EventSource with the token in the URL (it cannot send headers), and status. */
function stream(current, path, handlers) {
  const source = new EventSource(`${path}?access_token=${encodeURIComponent(current.token)}`);
  current.source = source;
  setStatus("connecting", "connecting…");
  source.onerror = () => {
    // The browser reconnects by itself (with Last-Event-ID) unless the stream is closed.
    if (source.readyState === EventSource.CLOSED) {
      setStatus("offline", "offline");
      setTimeout(() => session === current && stream(current, path, handlers), 3000);
    } else {
      setStatus("connecting", "reconnecting…");
    }
  };
  for (const [event, handle] of Object.entries(handlers)) {
    source.addEventListener(event, (message) => {
      if (session !== current) return;
      setStatus("live", "live"); // data flows: the stream is subscribed
      handle(JSON.parse(message.data));
    });
  }
}

// -- the tenant's dashboard ---------------------------------------------------------

function startTenant(current, figures) {
  $("tenant-view").hidden = false;
  $("who").textContent = "tenant dashboard";
  const view = {
    base: null,
    baseAt: 0,
    orders: new Map(), // orderId -> {total, createdAt}
    alerts: new Map(), // productId -> {stock, threshold, at}
    names: new Map(), // productId -> name
    asked: new Set(),
    render: () => renderTenant(view, current),
  };
  current.view = view;
  const figuresArrived = (data) => {
    view.base = data;
    view.baseAt = Date.parse(data.generated_at) || Date.now();
    for (const item of [...(data.top_products || []), ...(data.low_stock_products || [])]) {
      view.names.set(item.product_id, item.name);
    }
    view.render();
  };
  figuresArrived(figures);
  stream(current, "/api/dashboard/live-stream", {
    metrics: figuresArrived,
    dashboard: figuresArrived,
    newOrder: (order) => {
      view.orders.set(order.orderId, { total: order.total, createdAt: Date.parse(order.createdAt), fresh: true });
      while (view.orders.size > MAX_FEED) view.orders.delete(view.orders.keys().next().value);
      view.render();
    },
    lowStock: (alert) => {
      view.alerts.set(alert.productId, { stock: alert.newStock, threshold: alert.threshold, at: alert.timestamp });
      view.render();
      nameProduct(view, current, alert.productId);
    },
  });
}

/** A product's name for a stock alert: the cached product record (one read per product). */
async function nameProduct(view, current, productId) {
  if (view.names.has(productId) || view.asked.has(productId)) return;
  view.asked.add(productId);
  const response = await fetch(`/api/products/${encodeURIComponent(productId)}`, {
    headers: { Authorization: `Bearer ${current.token}` },
  });
  if (response.ok && session === current) {
    view.names.set(productId, (await response.json()).name);
    view.render();
  }
}

function renderTenant(view, current) {
  const base = view.base;
  const now = Date.now();
  const today = new Date(now).toISOString().slice(0, 10);
  const late = [...view.orders.entries()]
    .filter(([id, order]) => isLate(base, view.baseAt, id, order.createdAt))
    .filter(([, order]) => new Date(order.createdAt).toISOString().slice(0, 10) === today)
    .map(([, order]) => order);
  const lateRevenue = late.reduce((sum, order) => sum + order.total, 0);

  $("kpi-orders").textContent = whole.format(base.orders_today + late.length);
  $("kpi-orders-live").textContent = late.length ? `+${late.length} live since ${clock(view.baseAt)}` : "";
  $("kpi-orders-live").className = late.length ? "delta up" : "delta";
  $("kpi-revenue").textContent = money.format(base.revenue_today + lateRevenue);
  $("kpi-revenue-live").textContent = late.length ? `+${money.format(lateRevenue)} live` : "";
  $("kpi-revenue-live").className = late.length ? "delta up" : "delta";
  $("kpi-pending").textContent = whole.format(base.pending_orders + late.length);
  $("kpi-products").textContent = whole.format(base.products);

  const stock = stockRows(view);
  const listed = new Set((base.low_stock_products || []).map((item) => item.product_id));
  const newlyLow = [...view.alerts.entries()].filter(
    ([id, alert]) => alert.at > view.baseAt && !listed.has(id),
  ).length;
  $("kpi-low").textContent = whole.format(base.low_stock + newlyLow);
  $("kpi-low-note").textContent = `at or below ${stockThreshold(view)} in stock`;
  $("stock-threshold").textContent = `threshold: ${stockThreshold(view)}`;
  renderStock(view, stock);
  renderFeed(view);

  const hours = base.revenue_by_hour ? [...base.revenue_by_hour] : null;
  const counts = base.orders_by_hour ? [...base.orders_by_hour] : null;
  for (const order of late) {
    const hour = new Date(order.createdAt).getUTCHours();
    if (hours) hours[hour] += order.total;
    if (counts) counts[hour] += 1;
  }
  const waiting = "Hourly figures arrive with the next background pre-computation.";
  const currentHour = new Date(now).getUTCHours();
  barChart($("chart-revenue"), hours, {
    highlight: currentHour, format: axisMoney, label: (v) => money.format(v), empty: waiting,
  });
  barChart($("chart-orders"), counts, {
    highlight: currentHour, format: (v) => whole.format(v), integer: true, empty: waiting,
  });
  hbarChart(
    $("chart-top"),
    (base.top_products || []).map((item) => ({ label: item.name, value: item.quantity })),
    "No order yet today.",
  );
  $("tenant-footnote").textContent =
    `Figures computed at ${clock(view.baseAt)} and cached (refreshed in the background); ` +
    "orders and stock alerts since then are added live.";
}

/** Whether the figures leave out this live order (created after what they count). */
function isLate(base, baseAt, orderId, createdAt) {
  // Figures computed by the route itself only tell when they were made.
  if (base.orders_through === undefined) return createdAt > baseAt;
  if (base.orders_through === null) return true; // they count no order today
  const through = Date.parse(base.orders_through);
  if (createdAt !== through) return createdAt > through;
  return !(base.orders_through_ids || []).includes(orderId);
}

function stockThreshold(view) {
  if (view.base.low_stock_threshold !== undefined) return view.base.low_stock_threshold;
  for (const alert of view.alerts.values()) return alert.threshold;
  return 5;
}

function stockRows(view) {
  const rows = new Map();
  for (const item of view.base.low_stock_products || []) {
    rows.set(item.product_id, { id: item.product_id, stock: item.stock, at: view.baseAt });
  }
  for (const [id, alert] of view.alerts) {
    const known = rows.get(id);
    if (!known || alert.at >= known.at) rows.set(id, { id, stock: alert.stock, at: alert.at, live: true });
  }
  return [...rows.values()].sort((a, b) => a.stock - b.stock || b.at - a.at);
}

function renderStock(view, rows) {
  const list = $("stock-alerts");
  list.replaceChildren();
  if (!rows.length) {
    list.append(item("empty", "No product is low on stock."));
    return;
  }
  for (const row of rows) {
    const entry = document.createElement("li");
    entry.dataset.productId = row.id;
    const detail = document.createElement("div");
    detail.className = "alert-detail";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = view.names.get(row.id) || `Product ${row.id.slice(0, 8)}…`;
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = row.live ? `live · ${clock(row.at)}` : "at the last computation";
    detail.append(name, sub);
    const pill = document.createElement("span");
    pill.className = `pill stock ${row.stock === 0 ? "out" : "low"}`;
    pill.textContent = row.stock === 0 ? "out of stock" : `${row.stock} left`;
    entry.append(detail, pill);
    list.append(entry);
  }
}

function renderFeed(view) {
  const feed = $("order-feed");
  const orders = [...view.orders.entries()].sort((a, b) => b[1].createdAt - a[1].createdAt);
  $("orders-count").textContent = orders.length ? `${orders.length} since the page opened` : "";
  feed.replaceChildren();
  if (!orders.length) {
    feed.append(item("empty", "New orders appear here as they are placed."));
    return;
  }
  for (const [id, order] of orders) {
    const entry = document.createElement("li");
    if (order.fresh) entry.className = "fresh";
    order.fresh = false;
    const label = document.createElement("span");
    label.textContent = `Order ${id.slice(0, 8)}`;
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = clock(order.createdAt);
    const amount = document.createElement("span");
    amount.className = "amount";
    amount.textContent = money.format(order.total);
    entry.append(label, when, amount);
    feed.append(entry);
  }
}

// -- the operator's view ------------------------------------------------------------

function startOperator(current, overview) {
  $("operator-view").hidden = false;
  $("who").textContent = "operator";
  const view = { overview, render: () => renderOperator(view) };
  current.view = view;
  view.render();
  stream(current, "/api/monitoring/live-stream", {
    metrics: (data) => {
      view.overview = data;
      view.render();
    },
    alerts: (data) => {
      view.overview = { ...view.overview, firing: data.firing, evaluated_at: data.at };
      view.render();
    },
  });
}

function renderOperator(view) {
  const overview = view.overview;
  const points = overview.points || [];
  const last = points[points.length - 1];

  $("kpi-hit").textContent = overview.hit_ratio === null ? "–" : percent(overview.hit_ratio);
  const recent = last ? overallRatio(last) : null;
  $("kpi-hit-note").textContent = recent === null ? "since start" : `since start · ${percent(recent)} last interval`;
  $("kpi-hit").parentElement.className = `kpi ${overview.hit_ratio !== null && overview.hit_ratio < 0.7 ? "bad" : "good"}`;
  $("kpi-inval").textContent = last ? formatRate(last.invalidations_per_minute) : "–";
  const latency = last ? last.latency_ms : {};
  $("kpi-latency").textContent = latency.hit === undefined ? "–" : `${formatMs(latency.hit)} ms`;
  $("kpi-latency-note").textContent =
    latency.miss === undefined ? "cached reads" : `cached · ${formatMs(latency.miss)} ms uncached`;
  const connections = last ? last.connections : {};
  const open = Object.values(connections).reduce((sum, value) => sum + value, 0);
  $("kpi-connections").textContent = last ? whole.format(open) : "–";
  $("kpi-connections-note").textContent = Object.entries(connections)
    .map(([transport, count]) => `${transport} ${whole.format(count)}`)
    .join(" · ");
  const firing = overview.firing || [];
  $("kpi-alerts").textContent = whole.format(firing.length);
  $("kpi-alerts-note").textContent = firing.length ? firing.map((alert) => alert.name).join(", ") : "all clear";
  const critical = firing.some((alert) => alert.severity === "critical");
  $("kpi-alerts-card").className = `kpi ${firing.length ? (critical ? "bad" : "warn") : "good"}`;
  renderAlerts(firing, overview.evaluated_at);

  const endpoints = Object.entries(overview.endpoints || {})
    .sort((a, b) => b[1].hits + b[1].misses - (a[1].hits + a[1].misses))
    .slice(0, PALETTE.length)
    .map(([endpoint]) => endpoint);
  const waiting = `Collecting data: a point every ${overview.interval} s.`;
  const hitSeries = endpoints.map((endpoint, index) => ({
    name: endpoint,
    color: PALETTE[index],
    points: points.map((point) => [point.at * 1000, point.hit_ratio[endpoint] ?? null]),
  }));
  lineChart($("chart-hit"), hitSeries, { yMax: 1, format: percent, threshold: 0.7, empty: waiting });
  legend($("legend-hit"), hitSeries);
  lineChart(
    $("chart-inval"),
    [{ name: "invalidations", color: "#d97706", points: points.map((p) => [p.at * 1000, p.invalidations_per_minute]) }],
    { format: formatRate, area: true, empty: waiting },
  );
  const latencySeries = [
    { name: "cached", color: "#0f9f8f", points: points.map((p) => [p.at * 1000, p.latency_ms.hit ?? null]) },
    { name: "uncached", color: "#e11d48", points: points.map((p) => [p.at * 1000, p.latency_ms.miss ?? null]) },
  ];
  lineChart($("chart-latency"), latencySeries, { format: formatMs, empty: waiting });
  legend($("legend-latency"), latencySeries);
  const transports = [...new Set(points.flatMap((p) => Object.keys(p.connections)))].sort();
  const connectionSeries = transports.map((transport, index) => ({
    name: transport,
    color: PALETTE[index],
    points: points.map((p) => [p.at * 1000, p.connections[transport] ?? null]),
  }));
  lineChart($("chart-connections"), connectionSeries, {
    format: (v) => whole.format(v), integer: true, empty: waiting,
  });
  legend($("legend-connections"), connectionSeries);
  renderEndpointTable(overview.endpoints || {});
  $("operator-footnote").textContent = overview.evaluated_at
    ? `Alert rules evaluated every ${overview.interval} s on this instance, last at ${clock(overview.evaluated_at * 1000)}.`
    : "";
}

function overallRatio(point) {
  let reads = 0;
  let hits = 0;
  for (const [endpoint, count] of Object.entries(point.reads)) {
    reads += count;
    hits += count * point.hit_ratio[endpoint];
  }
  return reads ? hits / reads : null;
}

function renderAlerts(firing, evaluatedAt) {
  const list = $("alert-list");
  list.replaceChildren();
  $("alerts-evaluated").textContent = evaluatedAt ? `evaluated ${clock(evaluatedAt * 1000)}` : "";
  if (!firing.length) {
    list.append(item("empty ok", "No alert is firing."));
    return;
  }
  for (const alert of firing) {
    const entry = document.createElement("li");
    const detail = document.createElement("div");
    detail.className = "alert-detail";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = alert.name;
    const sub = document.createElement("span");
    sub.className = "sub";
    const labels = Object.entries(alert.labels).map(([key, value]) => `${key}=${value}`).join(", ");
    const value = alert.value === null ? "∞" : formatRate(alert.value);
    sub.textContent = `${labels ? `${labels} · ` : ""}value ${value} · since ${clock(alert.since * 1000)}`;
    detail.append(name, sub);
    const pill = document.createElement("span");
    pill.className = `pill ${alert.severity}`;
    pill.textContent = alert.severity;
    entry.append(detail, pill);
    list.append(entry);
  }
}

function renderEndpointTable(endpoints) {
  const body = $("endpoint-table").querySelector("tbody");
  body.replaceChildren();
  const rows = Object.entries(endpoints).sort((a, b) => b[1].hits + b[1].misses - (a[1].hits + a[1].misses));
  if (!rows.length) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 4;
    cell.className = "muted";
    cell.textContent = "No cached read yet.";
    return;
  }
  for (const [endpoint, figures] of rows) {
    const row = body.insertRow();
    row.dataset.endpoint = endpoint;
    row.insertCell().textContent = endpoint;
    for (const value of [figures.hits, figures.misses]) {
      const cell = row.insertCell();
      cell.className = "num";
      cell.textContent = whole.format(value);
    }
    const cell = row.insertCell();
    cell.className = "num";
    const bar = document.createElement("span");
    bar.className = "ratio-bar";
    const fill = document.createElement("i");
    fill.style.width = `${(figures.hit_ratio ?? 0) * 100}%`;
    if ((figures.hit_ratio ?? 0) < 0.7) fill.className = "low";
    bar.append(fill);
    const text = document.createElement("span");
    text.textContent = figures.hit_ratio === null ? "–" : percent(figures.hit_ratio);
    cell.append(bar, text);
  }
}

// -- charts (hand-drawn SVG) --------------------------------------------------------

function node(tag, attributes = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function item(className, text) {
  const entry = document.createElement("li");
  entry.className = className;
  entry.textContent = text;
  return entry;
}

function placeholder(container, text) {
  const box = document.createElement("div");
  box.className = "placeholder";
  box.textContent = text;
  container.replaceChildren(box);
}

function frame(container) {
  const width = Math.max(container.clientWidth, 240);
  const height = Math.max(container.clientHeight, 120);
  const svg = node("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  container.replaceChildren(svg);
  return { svg, width, height };
}

/** An axis from 0 over `value` in about `ticks` round steps: {maximum, step}. */
function niceScale(value, ticks, integer = false) {
  const raw = value > 0 ? value / ticks : 1 / ticks;
  const power = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((factor) => factor * power).find((candidate) => candidate >= raw);
  if (integer) step = Math.max(1, Math.ceil(step));
  return { maximum: Math.max(step, Math.ceil(value / step - 1e-9) * step), step };
}

function formatMs(value) {
  return value >= 100 ? whole.format(Math.round(value)) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function formatRate(value) {
  return value >= 100 ? whole.format(Math.round(value)) : value.toFixed(value >= 10 ? 0 : 1);
}

function yAxis(svg, { left, right, top, bottom, width, height }, { maximum, step }, format) {
  for (let value = 0; value <= maximum + step / 1000; value += step) {
    const y = height - bottom - ((height - top - bottom) * value) / maximum;
    svg.append(node("line", { x1: left, x2: width - right, y1: y, y2: y, class: "gridline" }));
    svg.append(node("text", { x: left - 8, y: y + 4, "text-anchor": "end" }, format(value)));
  }
}

/** Lines over time: series [{name, color, points: [[ms, value | null]]}]. */
function lineChart(container, series, { yMax, format, threshold, area = false, integer = false, empty }) {
  const values = series.flatMap((line) => line.points.filter((p) => p[1] !== null));
  if (values.length < 2) {
    placeholder(container, empty);
    return;
  }
  const { svg, width, height } = frame(container);
  const box = { left: 48, right: 14, top: 10, bottom: 24, width, height };
  const scale = yMax ? { maximum: yMax, step: yMax / 4 } : niceScale(Math.max(...values.map((p) => p[1])), 4, integer);
  const maximum = scale.maximum;
  const times = values.map((p) => p[0]);
  const first = Math.min(...times);
  const span = Math.max(Math.max(...times) - first, 1);
  const x = (time) => box.left + ((time - first) / span) * (width - box.left - box.right);
  const y = (value) => height - box.bottom - (Math.min(value, maximum) / maximum) * (height - box.top - box.bottom);
  yAxis(svg, box, scale, format);
  const timeLabel = span < 3_600_000 ? axisClock : axisShortClock;
  const labels = Math.max(1, Math.min(4, Math.floor((width - box.left - box.right) / 90)));
  for (let index = 0; index <= labels; index += 1) {
    const time = first + (span * index) / labels;
    const anchor = index === 0 ? "start" : index === labels ? "end" : "middle";
    svg.append(node("text", { x: x(time), y: height - 6, "text-anchor": anchor }, timeLabel(time)));
  }
  if (threshold !== undefined) {
    svg.append(node("line", { x1: box.left, x2: width - box.right, y1: y(threshold), y2: y(threshold), class: "threshold" }));
  }
  for (const line of series) {
    let path = "";
    let run = [];
    const runs = [];
    for (const [time, value] of line.points) {
      if (value === null) {
        if (run.length) runs.push(run);
        run = [];
      } else {
        run.push([x(time), y(value)]);
      }
    }
    if (run.length) runs.push(run);
    for (const segment of runs) {
      path += segment.map(([px, py], index) => `${index ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
      if (area && segment.length > 1) {
        const floor = height - box.bottom;
        const shape = `M${segment[0][0]},${floor}` + segment.map(([px, py]) => `L${px},${py}`).join("") +
          `L${segment[segment.length - 1][0]},${floor}Z`;
        svg.append(node("path", { d: shape, fill: line.color, "fill-opacity": 0.12, stroke: "none" }));
      }
      if (segment.length === 1) {
        svg.append(node("circle", { cx: segment[0][0], cy: segment[0][1], r: 2.5, fill: line.color }));
      }
    }
    svg.append(node("path", { d: path, fill: "none", stroke: line.color, "stroke-width": 2, "stroke-linejoin": "round", "stroke-linecap": "round" }));
    const last = runs.length ? runs[runs.length - 1].at(-1) : null;
    if (last) svg.append(node("circle", { cx: last[0], cy: last[1], r: 3.5, fill: "#fff", stroke: line.color, "stroke-width": 2 }));
  }
}

/** 24 hourly bars; the current hour highlighted, its value written above it. */
function barChart(container, values, { highlight, format, label = format, integer = false, empty }) {
  if (!values) {
    placeholder(container, empty);
    return;
  }
  const { svg, width, height } = frame(container);
  const box = { left: 56, right: 8, top: 18, bottom: 22, width, height };
  const scale = niceScale(Math.max(...values), 3, integer);
  const maximum = scale.maximum;
  yAxis(svg, box, scale, format);
  const slot = (width - box.left - box.right) / values.length;
  const barWidth = Math.max(2, slot * 0.68);
  values.forEach((value, hour) => {
    const barHeight = (value / maximum) * (height - box.top - box.bottom);
    const left = box.left + hour * slot + (slot - barWidth) / 2;
    const top = height - box.bottom - barHeight;
    svg.append(node("rect", { x: left, y: top, width: barWidth, height: Math.max(barHeight, value ? 1.5 : 0), rx: 2, class: hour === highlight ? "bar now" : "bar" }));
    if (hour % 3 === 0) {
      svg.append(node("text", { x: left + barWidth / 2, y: height - 6, "text-anchor": "middle" }, String(hour).padStart(2, "0")));
    }
    if (hour === highlight && value > 0) {
      svg.append(node("text", { x: left + barWidth / 2, y: top - 5, "text-anchor": "middle", class: "bar-label" }, label(value)));
    }
  });
}

/** Horizontal bars with their labels: [{label, value}]. */
function hbarChart(container, items, empty) {
  if (!items.length) {
    placeholder(container, empty);
    return;
  }
  const { svg, width, height } = frame(container);
  const rowHeight = Math.min(34, height / items.length);
  const labelWidth = Math.min(170, width * 0.45);
  const maximum = Math.max(...items.map((entry) => entry.value), 1);
  items.forEach((entry, index) => {
    const top = index * rowHeight + 4;
    const label = entry.label.length > 24 ? `${entry.label.slice(0, 23)}…` : entry.label;
    svg.append(node("text", { x: 0, y: top + rowHeight / 2 + 1, "dominant-baseline": "middle", class: "bar-label" }, label));
    const barWidth = ((width - labelWidth - 44) * entry.value) / maximum;
    svg.append(node("rect", { x: labelWidth, y: top + 5, width: Math.max(barWidth, 2), height: rowHeight - 12, rx: 3, class: "hbar" }));
    svg.append(node("text", { x: labelWidth + barWidth + 8, y: top + rowHeight / 2 + 1, "dominant-baseline": "middle" }, whole.format(entry.value)));
  });
}

function legend(container, series) {
  container.replaceChildren();
  for (const line of series) {
    const entry = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = line.color;
    const name = document.createElement("span");
    name.textContent = line.name;
    entry.append(swatch, name);
    container.append(entry);
  }
}

start();
