// The swarmllm page: a chat that streams from /v1/chat/completions, and a dashboard that polls
// /swarm/status. Plain JS, no libraries: nothing is fetched from anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, takesImages: false, history: [], image: null, busy: false };
const POLL_MS = 2000;

$("api-key").value = localStorage.getItem("swarmllm-api-key") || "";
$("api-key").addEventListener("change", (e) => localStorage.setItem("swarmllm-api-key", e.target.value));

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function shortId(peerId) { return "…" + peerId.slice(-8); }

function blockCells(count, cls) {
  const bar = el("div", { class: "blocks" });
  bar.style.gridTemplateColumns = `repeat(${count}, 1fr)`;
  for (let i = 0; i < count; i++) bar.append(el("div", { class: cls(i) }));
  return bar;
}

// ------------------------------------------------------------------ dashboard

function renderStatus(s) {
  state.model = s.model;
  state.takesImages = s.takes_images;
  $("model-name").textContent = s.model;
  $("image-row").hidden = !s.takes_images;
  const badge = $("coverage-status");
  if (s.uncovered.length) {
    const gaps = s.uncovered.map(([a, b]) => (b - a > 1 ? `${a}-${b - 1}` : `${a}`)).join(", ");
    badge.textContent = `blocks ${gaps} not served`;
    badge.className = "badge bad";
  } else {
    badge.textContent = "fully covered";
    badge.className = "badge ok";
  }
  $("block-count").textContent = `${s.num_blocks} blocks, ${s.peers.length} peers`;
  const bar = blockCells(s.num_blocks, (i) => "c" + Math.min(s.blocks[i], 2));
  [...bar.children].forEach((cell, i) => { cell.title = `block ${i}: ${s.blocks[i]} peer(s)`; });
  $("coverage-bar").replaceWith(bar);
  bar.id = "coverage-bar";

  const routed = new Map(s.last_route.map((hop) => [hop.peer_id, hop]));
  const body = $("peers").tBodies[0];
  body.replaceChildren();
  for (const p of s.peers) {
    const hop = routed.get(p.peer_id);
    const row = el("tr", { "data-peer-id": p.peer_id, "data-span": `${p.start}-${p.end}` });
    if (hop) row.classList.add("routed");
    const name = el("td", { title: p.peer_id }, `${p.name || "peer"} ${shortId(p.peer_id)}`);
    const span = el("td", { class: "span-cell" });
    span.append(blockCells(s.num_blocks, (i) => {
      if (i < p.start || i >= p.end) return "";
      return hop && i >= hop.start && i < hop.end ? "on routed" : "on";
    }));
    const state_ = el("td", { class: p.reachable ? `state-${p.state}` : "unreachable" },
      p.reachable ? (p.banned ? `${p.state} (banned)` : p.state) : "unreachable");
    const precision = p.quant && p.quant !== "none" ? `${p.quant} (${p.dtype})` : p.dtype;
    const device = [p.device, precision].filter(Boolean).join(" / ") || "–";
    row.append(
      name,
      el("td", {}, `${p.start}–${p.end - 1}`),
      span,
      state_,
      el("td", {}, device),
      el("td", {}, p.decode_steps_per_s.toFixed(1)),
      el("td", {}, p.ping_ms == null ? "–" : `${p.ping_ms.toFixed(1)} ms`),
      el("td", {}, String(p.cache_tokens_left)),
      el("td", {}, p.sessions == null ? "–" : String(p.sessions)),
    );
    body.append(row);
  }

  const route = $("route");
  route.replaceChildren();
  if (!s.last_route.length) route.append(el("li", {}, "no reply yet"));
  const names = new Map(s.peers.map((p) => [p.peer_id, p.name || "peer"]));
  for (const hop of s.last_route) {
    route.append(el("li", {},
      `blocks ${hop.start}–${hop.end - 1} on ${names.get(hop.peer_id) || "peer"} ` +
      `${shortId(hop.peer_id)}: compute ${hop.compute_ms} ms, round trip ${hop.round_trip_ms} ms, ` +
      `batch ${hop.batch}`));
  }
}

let pollTimer = null;

async function poll() {
  clearTimeout(pollTimer);
  try {
    const response = await fetch("/swarm/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    renderStatus(await response.json());
    $("dashboard-error").hidden = true;
  } catch (e) {
    $("dashboard-error").textContent = `cannot read the swarm's status: ${e.message}`;
    $("dashboard-error").hidden = false;
  } finally {
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

// ------------------------------------------------------------------ chat

function addMessage(role, text, image) {
  const node = el("div", { class: `message ${role}` });
  if (image) node.append(el("img", { src: image, alt: "attached picture" }));
  node.append(document.createTextNode(text));
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy || !state.model) return;
  state.busy = true;
  $("send").disabled = true;
  let content = text;
  const image = state.image;
  if (image) {
    // the vision prompt takes one user message: a picture starts a new conversation
    state.history = [];
    content = [{ type: "text", text }, { type: "image_url", image_url: { url: image } }];
  }
  state.history.push({ role: "user", content });
  addMessage("user", text, image);
  clearImage();
  $("prompt").value = "";
  const reply = addMessage("assistant streaming", "");
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify({
        model: state.model,
        messages: state.history,
        stream: true,
        max_tokens: Number($("max-tokens").value) || 128,
        temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        answer += delta;
        reply.textContent = answer;
        reply.scrollIntoView({ block: "end" });
      }
    }
    state.history.push({ role: "assistant", content: answer });
    if (image) state.history = [];  // the picture's reply cannot be continued as text
  } catch (e) {
    state.history.pop();
    addMessage("error", e.message);
  } finally {
    reply.classList.remove("streaming");
    reply.classList.add("done");
    state.busy = false;
    $("send").disabled = false;
    poll();  // show the route this reply took
  }
}

function clearImage() {
  state.image = null;
  $("image-input").value = "";
  $("image-preview").hidden = true;
  $("image-clear").hidden = true;
}

$("image-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (!file) return clearImage();
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    $("image-preview").src = reader.result;
    $("image-preview").hidden = false;
    $("image-clear").hidden = false;
  };
  reader.readAsDataURL(file);
});
$("image-clear").addEventListener("click", clearImage);
$("new-chat").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
$("chat-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
poll();
