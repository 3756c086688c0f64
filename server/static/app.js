// The comparison page: one POST /generate with stream + compare, its server-sent events
// routed to three columns (the chosen head, linear greedy, linear top-k) as tokens arrive.
"use strict";

const $ = (selector) => document.querySelector(selector);
const columns = {};
for (const section of document.querySelectorAll(".column")) {
  columns[section.dataset.decoder] = {
    tokens: section.querySelector(".tokens"),
    stats: section.querySelector(".stats"),
    count: 0,
  };
}

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

async function loadBase() {
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    $("#base-info").textContent = response.ok
      ? `base ${body.base} on ${body.device}`
      : `not ready: ${body.detail}`;
  } catch (error) {
    $("#base-info").textContent = `server unreachable: ${error}`;
  }
}

async function loadHeads() {
  const select = $("#head");
  try {
    const response = await fetch("/heads");
    if (!response.ok) throw new Error((await response.json()).detail);
    // A head the server cannot serve is listed "invalid" with its reason: not something to pick.
    const heads = (await response.json()).heads.filter((head) => head.status === "ready");
    for (const head of heads) {
      const option = document.createElement("option");
      option.value = head.name;
      option.textContent = `${head.name} (${head.type}, ${head.task})`;
      select.append(option);
    }
    if (heads.some((head) => head.name === "math")) select.value = "math";
  } catch (error) {
    setStatus(`could not list heads: ${error.message}`, true);
  }
}

function resetColumns(headName) {
  document.querySelector('.column[data-decoder="main"] .title').textContent =
    headName ? `head: ${headName}` : "base (linear head)";
  for (const column of Object.values(columns)) {
    column.tokens.textContent = "";
    column.stats.textContent = "";
    column.count = 0;
    column.firstAt = null;
  }
}

function addToken(event, sentAt) {
  const column = columns[event.decoder];
  if (!column) return;
  column.count += 1;
  if (column.firstAt === null) column.firstAt = performance.now() - sentAt;
  const probability = Math.exp(event.logprob);
  const span = document.createElement("span");
  span.className = "token";
  span.style.setProperty("--p", probability.toFixed(3));
  span.title = `p=${probability.toFixed(3)} · token ${JSON.stringify(event.token)}`;
  span.textContent = event.text; // may be empty while a partial character or stop string is held back
  column.tokens.append(span);
  column.stats.textContent = `${column.count} tokens · first after ${column.firstAt.toFixed(0)} ms…`;
}

function describe(timings, tokens, finishReason) {
  return `first token ${(timings.first_token_s * 1000).toFixed(0)} ms · total ${(timings.total_s * 1000).toFixed(0)} ms`
    + ` · ${tokens} tokens · ${timings.tokens_per_s.toFixed(1)} tok/s · ${finishReason}`;
}

function finish(response) {
  columns.main.stats.textContent = describe(response.timings, response.tokens, response.finish_reason);
  for (const comparison of response.comparisons || []) {
    const column = columns[comparison.decoder];
    if (column && comparison.timings) {
      column.stats.textContent = describe(comparison.timings, comparison.tokens, comparison.finish_reason);
    }
  }
}

function handleFrame(frame, sentAt) {
  for (const line of frame.split("\n")) {
    if (!line.startsWith("data: ")) continue;
    const payload = line.slice(6);
    if (payload === "[DONE]") return;
    const event = JSON.parse(payload);
    if (event.type === "token") addToken(event, sentAt);
    else if (event.type === "done") finish(event.response);
    else if (event.type === "error") setStatus(`error ${event.status}: ${event.detail}`, true);
  }
}

async function generate(submitEvent) {
  submitEvent.preventDefault();
  const button = $("#generate");
  const head = $("#head").value || null;
  const seed = $("#seed").value;
  const body = {
    prompt: $("#prompt").value,
    head,
    raw: $("#raw").checked,
    max_new_tokens: Number($("#max-tokens").value),
    compare: true,
    stream: true,
    decoding: { strategy: "greedy", top_k: Number($("#top-k").value), ...(seed !== "" ? { seed: Number(seed) } : {}) },
  };
  resetColumns(head);
  setStatus("generating…");
  button.disabled = true;
  const sentAt = performance.now();
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ detail: response.statusText }));
      setStatus(`error ${response.status}: ${error.detail}`, true);
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
    if (!$("#status").classList.contains("error")) {
      setStatus(`done in ${((performance.now() - sentAt) / 1000).toFixed(2)} s`);
    }
  } catch (error) {
    setStatus(`request failed: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

$("#form").addEventListener("submit", generate);
loadBase();
loadHeads();
