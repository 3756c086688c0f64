// The comparison page: one POST /generate with stream + compare, its server-sent events routed to three
// columns (the chosen head, linear greedy, linear top-k) as tokens arrive. It polls /readyz for the
// connection state and the server's limits (so the form never offers what the server refuses), and
// explains each token (probability and the alternatives) on hover, tap and keyboard focus alike. Its classify mode
// lives in classify.js.
// Static on purpose: no build step, no CDN.
"use strict";

const $ = (selector) => document.querySelector(selector);
const POLL_READY_MS = 3000; // while connected
const POLL_DOWN_MS = 1000; // while disconnected or loading, to notice the comeback quickly
const ALTERNATIVES = 5; // alternatives per token asked of the server (capped by its limit)
const UNSURE_BELOW = 0.2; // tokens less likely than this also get a dotted underline, not only a pale shade
const NARROW = matchMedia("(max-width: 600px)"); // the token panel is a bottom sheet there

const state = {
  ready: false, controller: null, alternatives: ALTERNATIVES, headPicked: false, shown: null,
  chatBase: false, heads: [], stopEdited: false, mode: "generate", classifying: false, labelWordsEdited: false,
};
const tokenData = new WeakMap(); // token span -> its stream event
const columns = {};
for (const section of document.querySelectorAll(".column")) {
  columns[section.dataset.decoder] = {
    label: section.querySelector("h2").textContent.replace(/\s+/g, " ").trim(),
    tokens: section.querySelector(".tokens"),
    stats: section.querySelector(".stats"),
    decoding: section.querySelector(".decoding"),
    count: 0,
    firstAt: null,
  };
}

// --- shading: perceptual (square root) with a floor, so p≈0.01 and p≈0.1 stay visible and distinct ---
function shade(p) {
  return 0.14 + 0.56 * Math.sqrt(Math.min(Math.max(p, 0), 1));
}

function paint(span, p) {
  span.style.setProperty("--p", p.toFixed(3));
  span.style.setProperty("--shade", shade(p).toFixed(3));
  span.classList.toggle("unsure", p < UNSURE_BELOW);
}

// --- connection: poll /readyz; never claim a device while the server does not answer ---
function updateButtons() {
  $("#generate").disabled = !state.ready || state.controller !== null;
  $("#stop-button").disabled = state.controller === null;
  $("#classify").disabled = !state.ready || state.classifying;
}

function setConnection(kind, text) {
  state.ready = kind === "ready";
  $("#connection").dataset.state = kind;
  $("#base-info").textContent = text;
  updateButtons();
}

async function pollReady() {
  let next = POLL_DOWN_MS;
  try {
    const response = await fetch("/readyz", { cache: "no-store", signal: AbortSignal.timeout(3 * POLL_DOWN_MS) });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      const wasReady = state.ready;
      setConnection("ready", `base ${body.base} on ${body.device}`);
      applyLimits(body.limits);
      state.chatBase = Boolean(body.chat_template);
      if (!wasReady) loadHeads(); // first contact, or back after an outage: the registry may have changed
      next = POLL_READY_MS;
    } else {
      setConnection("loading", `not ready: ${body.detail || response.statusText}`);
    }
  } catch {
    setConnection("disconnected", "disconnected: the server does not answer (retrying)");
  }
  setTimeout(pollReady, next);
}

function applyLimits(limits) {
  if (!limits) return;
  $("#max-tokens").max = String(limits.max_new_tokens);
  clampNumber($("#max-tokens"), "Max tokens");
  state.alternatives = Math.min(ALTERNATIVES, limits.max_top_logprobs);
}

async function loadHeads() {
  const select = $("#head");
  try {
    const response = await fetch("/heads", { cache: "no-store" });
    if (!response.ok) throw new Error((await response.json()).detail);
    // A head the server cannot serve is listed "invalid" or "incompatible" (another base's): not something to pick.
    const heads = (await response.json()).heads.filter((head) => head.status === "ready");
    const previous = select.value;
    select.replaceChildren(select.options[0]);
    for (const head of heads) {
      const option = new Option(`${head.name} (${head.type}, ${head.task})`, head.name);
      const chat = head.prompt_format === "chat" ? " (as the user message of the base's chat template)" : "";
      option.title = `template: ${head.prompt_template}${chat}`;
      select.append(option);
    }
    const names = heads.map((head) => head.name);
    state.heads = heads;
    if (names.includes(previous)) select.value = previous;
    else if (!state.headPicked) {
      // The default prompt is a math problem: the embedded base's `math` head, else this base's math head.
      const math = names.includes("math") ? "math" : heads.find((head) => head.task === "math")?.name;
      if (math) select.value = math;
    }
    defaultStop();
    fillClassifyHeads(heads);
  } catch (error) {
    setSummary(`could not list heads: ${error.message}`, true);
  }
}

/** A plain prompt's answer is one line (stop at "\n"); a chat-formatted one ends at the chat template's end-of-turn
 * token and spans lines, so it gets no stop string. Only while the user has not written their own. */
function defaultStop() {
  if (state.stopEdited) return;
  const head = state.heads.find((h) => h.name === $("#head").value);
  const chat = head ? head.prompt_format === "chat" : state.chatBase;
  $("#stop").value = chat ? "" : "\\n";
}

// --- the form ---
function note(text) {
  $("#form-note").textContent = text;
}

/** The input's number within its min/max (an integer unless its step allows fractions); null when empty. */
function clampNumber(input, label) {
  if (input.value.trim() === "") return null;
  let value = Number(input.value);
  if (!Number.isFinite(value)) value = Number(input.defaultValue || input.min || 0);
  if (!input.step || Number.isInteger(Number(input.step))) value = Math.round(value);
  const min = input.min === "" ? -Infinity : Number(input.min);
  const max = input.max === "" ? Infinity : Number(input.max);
  const clamped = Math.min(Math.max(value, min), max);
  if (String(clamped) !== input.value) {
    input.value = String(clamped);
    if (clamped !== value) note(`${label} is between ${input.min} and ${input.max}${label === "Max tokens"
      ? " on this server" : ""}: set to ${clamped}.`);
  }
  return clamped;
}

/** One stop string per line; `\n`, `\t` and `\\` are written as escapes so a newline can be one. */
function stopStrings() {
  const unescape = (line) => line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
  return $("#stop").value.split("\n").filter((line) => line !== "").map(unescape);
}

function requestBody() {
  const seed = clampNumber($("#seed"), "Seed");
  const stop = stopStrings();
  return {
    prompt: $("#prompt").value,
    head: $("#head").value || null,
    raw: $("#raw").checked,
    max_new_tokens: clampNumber($("#max-tokens"), "Max tokens") ?? 64,
    compare: true,
    stream: true,
    top_logprobs: state.alternatives,
    decoding: {
      strategy: $("#strategy").value,
      temperature: clampNumber($("#temperature"), "Temperature") ?? 1,
      top_k: clampNumber($("#top-k"), "Top-k") ?? 50,
      top_p: clampNumber($("#top-p"), "Top-p") ?? 0.9,
      ...(seed !== null ? { seed } : {}),
    },
    ...(stop.length ? { stop } : {}),
  };
}

function describeDecoding(d) {
  const seed = d.seed !== undefined ? ` · seed ${d.seed}` : "";
  if (d.strategy === "top_k") return `top-k ${d.top_k} · T ${d.temperature}${seed}`;
  if (d.strategy === "top_p") return `top-p ${d.top_p} · T ${d.temperature}${seed}`;
  return "greedy";
}

// --- the columns ---
/** A failed answer as one line: its status and the server's `detail` (a string, or validation errors as JSON). */
async function errorSummary(response) {
  const error = await response.json().catch(() => ({ detail: response.statusText }));
  const detail = typeof error.detail === "string" ? error.detail : JSON.stringify(error.detail);
  return `error ${response.status}: ${detail}`;
}

function setSummary(text, isError = false) {
  $("#summary").textContent = text;
  $("#summary").classList.toggle("error", isError);
}

function resetColumns(body) {
  hideInfo();
  document.querySelector('.column[data-decoder="main"] .title').textContent =
    body.head ? `head: ${body.head}` : "base (linear head)";
  columns.main.decoding.textContent = describeDecoding(body.decoding);
  columns.linear_top_k.decoding.textContent = describeDecoding({ ...body.decoding, strategy: "top_k" });
  for (const [decoder, column] of Object.entries(columns)) {
    column.label = document.querySelector(`.column[data-decoder="${decoder}"] h2`).textContent
      .replace(/\s+/g, " ").trim();
    column.tokens.replaceChildren();
    column.stats.textContent = "";
    column.count = 0;
    column.firstAt = null;
  }
  $("#sent").hidden = true;
}

function addToken(event, sentAt) {
  const column = columns[event.decoder];
  if (!column) return;
  column.count += 1;
  if (column.firstAt === null) column.firstAt = performance.now() - sentAt;
  const span = document.createElement("span");
  span.className = "token";
  span.tabIndex = column.count === 1 ? 0 : -1; // one tab stop per column; arrow keys move within it
  paint(span, Math.exp(event.logprob));
  span.textContent = event.text; // may be empty while a partial character or stop string is held back
  tokenData.set(span, event);
  column.tokens.append(span);
  column.stats.textContent = `${column.count} tokens · first after ${column.firstAt.toFixed(0)} ms…`;
}

function describe(timings, tokens, finishReason) {
  return `first token ${(timings.first_token_s * 1000).toFixed(0)} ms · total ${(timings.total_s * 1000).toFixed(0)} ms`
    + ` · ${tokens} tokens · ${timings.tokens_per_s.toFixed(1)} tok/s · ${finishReason}`;
}

function finish(response, sentAt) {
  columns.main.stats.textContent = describe(response.timings, response.tokens, response.finish_reason);
  for (const comparison of response.comparisons || []) {
    const column = columns[comparison.decoder];
    if (column && comparison.timings) {
      column.stats.textContent = describe(comparison.timings, comparison.tokens, comparison.finish_reason);
    }
  }
  $("#sent-prompt").textContent = response.prompt;
  $("#sent").hidden = false;
  const seconds = ((performance.now() - sentAt) / 1000).toFixed(2);
  setSummary(`done: ${response.tokens} tokens in ${seconds} s (${response.finish_reason})`);
}

function handleFrame(frame, sentAt) {
  for (const line of frame.split("\n")) {
    if (!line.startsWith("data: ")) continue;
    const payload = line.slice(6);
    if (payload === "[DONE]") return;
    const event = JSON.parse(payload);
    if (event.type === "token") addToken(event, sentAt);
    else if (event.type === "done") finish(event.response, sentAt);
    else if (event.type === "error") setSummary(`error ${event.status}: ${event.detail}`, true);
  }
}

async function generate(submitEvent) {
  submitEvent.preventDefault();
  if (state.controller !== null || !state.ready) return;
  if (!$("#prompt").value.trim()) {
    setSummary("enter a prompt first", true);
    $("#prompt").focus();
    return;
  }
  note("");
  const body = requestBody();
  resetColumns(body);
  setSummary("generating…");
  const controller = new AbortController();
  state.controller = controller;
  updateButtons();
  const sentAt = performance.now();
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      setSummary(await errorSummary(response), true);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handleFrame(buffer.slice(0, end), sentAt);
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    if (controller.signal.aborted) {
      setSummary(`stopped: ${columns.main.count} tokens received; the server has dropped the request`);
    } else {
      setSummary(`request failed: ${error.message}`, true);
    }
  } finally {
    state.controller = null;
    updateButtons();
  }
}

// --- the token panel: probability and alternatives, for mouse, touch and keyboard alike ---
/** One probability row (the token panel's alternatives, the classify mode's labels): the text as JSON, a bar
 * as wide as p, and `shown` in the last cell. */
function probabilityRow(tbody, text, p, shown) {
  const row = tbody.insertRow();
  const code = document.createElement("code");
  code.textContent = JSON.stringify(text);
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.setAttribute("aria-hidden", "true");
  bar.style.setProperty("--w", `${(p * 100).toFixed(1)}%`);
  row.insertCell().append(code);
  row.insertCell().append(bar);
  row.insertCell().textContent = shown;
  return row;
}

function addAlternative(table, text, p, chosen) {
  const shown = `${p.toFixed(3)}${chosen ? " (chosen)" : ""}`;
  probabilityRow(table.tBodies[0], text, p, shown).classList.toggle("chosen", chosen);
}

function showInfo(span) {
  const event = tokenData.get(span);
  if (!event) return;
  const info = $("#token-info");
  const p = Math.exp(event.logprob);
  const title = document.createElement("p");
  const code = document.createElement("code");
  code.textContent = JSON.stringify(event.token);
  title.append(code, ` p = ${p.toFixed(3)} (logprob ${event.logprob.toFixed(3)}) · ${columns[event.decoder].label}`);
  const parts = [title];
  if (event.top && event.top.length) {
    const table = document.createElement("table");
    table.createCaption().textContent = "Most likely at this step";
    table.createTBody();
    for (const alt of event.top) addAlternative(table, alt.token, Math.exp(alt.logprob), alt.token_id === event.token_id);
    parts.push(table);
  }
  info.replaceChildren(...parts);
  info.hidden = false;
  if (state.shown && state.shown !== span) state.shown.removeAttribute("aria-describedby");
  span.setAttribute("aria-describedby", "token-info");
  state.shown = span;
  if (NARROW.matches) {
    info.style.left = info.style.top = "";
    return;
  }
  const box = span.getBoundingClientRect();
  const width = info.offsetWidth;
  const left = Math.min(box.left, document.documentElement.clientWidth - width - 8);
  info.style.left = `${Math.max(8, left) + scrollX}px`;
  info.style.top = `${box.bottom + scrollY + 6}px`;
}

function hideInfo() {
  $("#token-info").hidden = true;
  if (state.shown) state.shown.removeAttribute("aria-describedby");
  state.shown = null;
}

function focusToken(span) {
  if (!span) return;
  for (const other of span.parentElement.querySelectorAll('.token[tabindex="0"]')) other.tabIndex = -1;
  span.tabIndex = 0;
  span.focus();
}

const tokenOf = (target) => (target instanceof Element ? target.closest(".columns .token") : null);
const board = $(".columns");
board.addEventListener("focusin", (event) => {
  const span = tokenOf(event.target);
  if (span) showInfo(span);
});
board.addEventListener("focusout", (event) => {
  if (tokenOf(event.target) === state.shown && !tokenOf(event.relatedTarget)) hideInfo();
});
board.addEventListener("click", (event) => focusToken(tokenOf(event.target))); // a tap focuses, so it shows
board.addEventListener("mouseover", (event) => {
  const span = tokenOf(event.target);
  if (span) showInfo(span);
});
board.addEventListener("mouseout", (event) => {
  if (!tokenOf(event.target) || tokenOf(event.relatedTarget)) return;
  const focused = tokenOf(document.activeElement);
  if (focused) showInfo(focused);
  else hideInfo();
});
board.addEventListener("keydown", (event) => {
  const span = tokenOf(event.target);
  if (!span) return;
  const all = [...span.parentElement.children];
  const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
  if (event.key in moves) focusToken(all[all.indexOf(span) + moves[event.key]]);
  else if (event.key === "Home") focusToken(all[0]);
  else if (event.key === "End") focusToken(all[all.length - 1]);
  else if (event.key === "Escape") hideInfo();
  else return;
  event.preventDefault();
});

for (const span of document.querySelectorAll(".legend .token[data-p]")) paint(span, Number(span.dataset.p));
$("#form").addEventListener("submit", generate);
$("#stop-button").addEventListener("click", () => state.controller?.abort());
$("#head").addEventListener("change", () => { state.headPicked = true; defaultStop(); });
$("#stop").addEventListener("input", () => { state.stopEdited = true; });
$("#max-tokens").addEventListener("change", () => clampNumber($("#max-tokens"), "Max tokens"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !event.isComposing) {
    event.preventDefault();
    $(state.mode === "classify" ? "#classify-form" : "#form").requestSubmit();
  }
});
pollReady();
