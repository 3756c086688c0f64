// The page's classify mode: pick a head that can classify, type a text, see one bar per label from POST /classify.
// A classifier head brings its own labels; a generative head (or the base) is scored on label words, which a
// verbalizer head may leave out (it records its labels). Loaded after app.js, whose helpers ($, state,
// setSummary, errorSummary, probabilityRow, updateButtons) it uses; app.js calls fillClassifyHeads with the registry's ready heads.
"use strict";

const classifyHeads = new Map(); // option value -> the head's summary (null: the base)

function setMode(mode) {
  state.mode = mode;
  for (const part of document.querySelectorAll("[data-mode]")) part.hidden = part.dataset.mode !== mode;
  hideInfo();
  setSummary("");
  updateButtons();
}

/** What a head offers here: a classifier's labels, a verbalizer's labels, or label words only. */
function classifyOption(head) {
  if (head.generative === false) return `${head.name} (classifier: ${(head.labels || []).join(", ")})`;
  if (head.labels) return `${head.name} (verbalizer: ${head.labels.join(", ")})`;
  return `${head.name} (label words)`;
}

function fillClassifyHeads(heads) {
  const select = $("#classify-head");
  const previous = select.value;
  classifyHeads.clear();
  classifyHeads.set("", null);
  select.replaceChildren(new Option("base (label words)", ""));
  // Classifier heads first, then verbalizers, then generative heads that need label words.
  const rank = (head) => (head.generative === false ? 0 : head.labels ? 1 : 2);
  for (const head of [...heads].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name))) {
    classifyHeads.set(head.name, head);
    select.append(new Option(classifyOption(head), head.name));
  }
  const first = heads.find((head) => head.generative === false || head.labels);
  select.value = classifyHeads.has(previous) && previous !== "" ? previous : first ? first.name : "";
  syncLabelWords();
}

/** Label words are for generative heads and the base: required without labels of their own, else optional. */
function syncLabelWords() {
  const head = classifyHeads.get($("#classify-head").value);
  const field = $("#label-words-field");
  field.hidden = Boolean(head && head.generative === false);
  const own = head && head.labels;
  $("#label-words").placeholder = own ? `empty: its own labels (${own.join(", ")})` : "";
  if (own && !state.labelWordsEdited) $("#label-words").value = "";
}

function labelWords() {
  return $("#label-words").value.split("\n").filter((line) => line.trim() !== "");
}

function classifyBody() {
  const head = classifyHeads.get($("#classify-head").value);
  const body = { text: $("#classify-text").value };
  if (head) body.head = head.name;
  const words = labelWords();
  if (!(head && head.generative === false) && words.length) body.label_words = words;
  if ($("#classify-truncate").checked) body.truncate = true;
  return body;
}

function showLabels(response) {
  const [result] = response.results;
  const rows = $("#label-bars").tBodies[0];
  rows.replaceChildren();
  for (const { label, probability } of result.probabilities) {
    probabilityRow(rows, label, probability, probability.toFixed(3)).classList.toggle("top", label === result.label);
  }
  $("#classify-prompt").textContent = (result.truncated ? "[start cut to fit the prompt limit] " : "")
    + result.prompt;
  $("#classify-sent").hidden = false;
  const how = response.method === "classifier" ? "classifier head" : "label tokens";
  setSummary(`classified: ${JSON.stringify(result.label)} (p = ${result.probability.toFixed(3)}, ${how}) in `
    + `${(result.timings.total_s * 1000).toFixed(0)} ms`);
}

async function classify(submitEvent) {
  submitEvent.preventDefault();
  if (state.classifying || !state.ready) return;
  if (!$("#classify-text").value.trim()) {
    setSummary("enter a text first", true);
    $("#classify-text").focus();
    return;
  }
  state.classifying = true;
  updateButtons();
  setSummary("classifying…");
  try {
    const response = await fetch("/classify", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(classifyBody()),
    });
    if (!response.ok) {
      setSummary(await errorSummary(response), true);
      return;
    }
    showLabels(await response.json());
  } catch (error) {
    setSummary(`request failed: ${error.message}`, true);
  } finally {
    state.classifying = false;
    updateButtons();
  }
}

for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => setMode(radio.value));
}
$("#classify-form").addEventListener("submit", classify);
$("#classify-head").addEventListener("change", syncLabelWords);
$("#label-words").addEventListener("input", () => { state.labelWordsEdited = true; });
setMode(document.querySelector('input[name="mode"]:checked').value); // a reload may restore the other mode
