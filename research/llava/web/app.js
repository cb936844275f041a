// The chat page: the whole conversation goes to the server's own /v1/chat/completions on every turn (the API is
// stateless), the answer is read from its server-sent events as it streams. Text from the user and the model is
// only ever set with textContent, so nothing they write is rendered as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "v1/chat/completions";   // relative: the page talks only to the server that served it
const KEY = "llava-api-key";         // sessionStorage: the key is kept for this tab only, never on disk

const state = {
  history: [],        // OpenAI messages sent so far (images as data: or http(s) URLs)
  pending: [],        // images attached to the next message: {url, name}
  limits: null,       // {max_image_bytes, max_body_bytes} from the server, when it told us
  model: null,
  controller: null,   // AbortController of the answer being streamed
  epoch: 0,           // counts New chat: an answer that ends after it belongs to no conversation
};

// ------------------------------------------------------------------------------------------------ notices
function showNotice(text) {
  $("notice-text").textContent = text;
  $("notice").hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

function kb(bytes) {
  return bytes >= 1 << 20 ? (bytes / (1 << 20)).toFixed(1) + " MB" : Math.ceil(bytes / 1024) + " KB";
}

// ------------------------------------------------------------------------------------------------ images
function addPending(url, name) {
  state.pending.push({ url, name });
  renderPending();
}

function renderPending() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((image, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    item.appendChild(thumbnail(image));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", "Remove " + image.name);
    remove.addEventListener("click", () => { state.pending.splice(i, 1); renderPending(); });
    item.appendChild(remove);
    box.appendChild(item);
  });
}

function thumbnail(image) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = image.name;
  img.title = image.name;
  img.src = image.url;
  return img;
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showNotice(`${file.name || "That file"} is not an image.`);
      continue;
    }
    const limit = state.limits && state.limits.max_image_bytes;
    if (limit && file.size > limit) {
      showNotice(`${file.name || "The image"} is ${kb(file.size)}; the server accepts images of at most ` +
                 `${kb(limit)} (${limit} bytes).`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => addPending(reader.result, file.name || "pasted image");
    reader.onerror = () => showNotice(`Could not read ${file.name || "the image"}.`);
    reader.readAsDataURL(file);
  }
}

function addUrl(text) {
  const url = text.trim();
  if (!url) return;
  if (!/^https?:\/\//i.test(url) && !/^data:image\//i.test(url)) {
    showNotice("An image URL starts with http://, https:// or data:image/.");
    return;
  }
  addPending(url, url.startsWith("data:") ? "image" : url);
  $("image-url").value = "";
}

// ------------------------------------------------------------------------------------------------ messages
function messageView(role) {
  $("empty").hidden = true;
  const view = document.createElement("div");
  view.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "LLaVA";
  view.appendChild(who);
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  view.appendChild(bubble);
  $("conversation").appendChild(view);
  return view;
}

function showUser(images, text) {
  const view = messageView("user");
  const bubble = view.querySelector(".bubble");
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    images.forEach((image) => strip.appendChild(thumbnail(image)));
    bubble.appendChild(strip);
  }
  if (text) {
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    bubble.appendChild(body);
  }
  return view;
}

function scrollDown() {
  const main = $("conversation");
  main.scrollTop = main.scrollHeight;
}

// ------------------------------------------------------------------------------------------------ settings
function settings() {
  const body = {};
  const max = parseInt($("max-tokens").value, 10);
  if (max > 0) body.max_tokens = max;
  const temperature = parseFloat($("temperature").value);
  body.temperature = Number.isFinite(temperature) ? temperature : 0;
  const topP = parseFloat($("top-p").value);
  if (Number.isFinite(topP)) body.top_p = topP;
  return body;
}

// ------------------------------------------------------------------------------------------------ the key
// A server started with --api_key answers 401 without it: ask once, keep it for the tab, send it with every
// request. A key the server refuses is forgotten, so the next request asks again.
async function api(path, options, asked) {
  const init = Object.assign({}, options);
  init.headers = Object.assign({}, init.headers);
  const key = sessionStorage.getItem(KEY);
  if (key) init.headers.Authorization = "Bearer " + key;
  const response = await fetch(path, init);
  if (response.status !== 401) return response;
  sessionStorage.removeItem(KEY);
  if (asked) return response;
  const given = window.prompt("This server needs an API key (kept for this tab only):");
  if (!given || !given.trim()) return response;
  sessionStorage.setItem(KEY, given.trim());
  return api(path, options, true);
}

// ------------------------------------------------------------------------------------------------ errors
class ServerError extends Error {}

async function errorText(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && body.error.message) || "";
  } catch (_) { /* not an OpenAI error body: say what we know */ }
  const detail = message || response.statusText || "no details";
  switch (response.status) {
    case 401: return "The server needs a valid API key: " + detail;
    case 413: return "Too large for the server: " + detail;
    case 429: return "The server is busy (its queue is full): " + detail + ". Try again in a moment.";
    case 400: return "The server refused the request: " + detail;
    default: return `The server answered ${response.status}: ${detail}`;
  }
}

// ------------------------------------------------------------------------------------------------ asking
async function send() {
  if (state.controller) return;
  const text = $("prompt").value.trim();
  const images = state.pending.slice();
  if (!text && !images.length) {
    showNotice("Write a question or add an image first.");
    return;
  }
  clearNotice();
  const content = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text) content.push({ type: "text", text });
  const user = { role: "user", content };
  const messages = state.history.concat([user]);
  const body = Object.assign({ messages, stream: true }, settings());
  if (state.model) body.model = state.model;
  const json = JSON.stringify(body);
  const size = new Blob([json]).size;
  if (state.limits && size > state.limits.max_body_bytes) {
    showNotice(`This conversation with its images is ${kb(size)}, more than the server accepts ` +
               `(${kb(state.limits.max_body_bytes)}). Start a new chat or use a smaller image.`);
    return;
  }

  $("prompt").value = "";
  state.pending = [];
  renderPending();
  const userView = showUser(images, text);
  const answerView = messageView("assistant");
  answerView.dataset.state = "streaming";
  const answerText = document.createElement("div");
  answerText.className = "text";
  answerView.querySelector(".bubble").appendChild(answerText);
  scrollDown();
  busy(true);

  let answer = "";
  let outcome = "done";
  let problem = null;
  const controller = new AbortController();
  state.controller = controller;
  const epoch = state.epoch;
  try {
    const response = await api(API, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: json, signal: controller.signal,
    });
    if (!response.ok) throw new ServerError(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new ServerError("The server failed while answering: " + event.error.message);
      const choice = event.choices && event.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        answer += delta;
        answerText.textContent = answer;
        scrollDown();
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      if (e instanceof ServerError) problem = e.message;
      else if (e instanceof TypeError) {   // what fetch and a broken stream throw for a network failure
        problem = "Cannot reach the server (it may have stopped, or the connection dropped). " +
                  "Your message was not answered.";
      } else problem = "Could not read the server's answer: " + e.message;
    }
  } finally {
    state.controller = null;
    busy(false);
  }
  if (epoch !== state.epoch) return;

  answerView.dataset.state = outcome;
  if (outcome === "done" || (outcome === "stopped" && answer)) {
    state.history.push(user, { role: "assistant", content: answer });
    if (outcome === "stopped") note(answerView, "stopped");
  } else {
    // the turn is not part of the conversation: give its words and images back to fix and resend
    userView.classList.add("failed");
    note(answerView, outcome === "stopped" ? "stopped before any answer" : "not answered");
    if (problem) showNotice(problem);
    if (!$("prompt").value) $("prompt").value = text;
    state.pending = images.concat(state.pending);
    renderPending();
  }
  scrollDown();
}

function note(view, text) {
  const tag = document.createElement("div");
  tag.className = "note";
  tag.textContent = text;
  view.querySelector(".bubble").appendChild(tag);
}

// Server-sent events from a fetch response: one parsed JSON object per `data:` line until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("busy", on);
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.epoch++;
  state.history = [];
  state.pending = [];
  renderPending();
  clearNotice();
  for (const view of document.querySelectorAll("#conversation .msg")) view.remove();
  $("empty").hidden = false;
  $("prompt").value = "";
  $("prompt").focus();
}

// ------------------------------------------------------------------------------------------------ wiring
async function loadServerInfo() {
  try {
    const limits = await api("limits");
    if (limits.status === 401) {   // no key given, or a wrong one: say so; the next request asks again
      showNotice(await errorText(limits));
      return;
    }
    if (limits.ok) state.limits = await limits.json();
    const models = await api("v1/models");
    if (models.ok) {
      const list = await models.json();
      state.model = list.data && list.data[0] && list.data[0].id;
      $("model").textContent = state.model || "";
    }
  } catch (_) {
    showNotice("Cannot reach the server. Is it running?");
  }
}

function wire() {
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("notice-close").addEventListener("click", clearNotice);
  $("file-input").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("add-url").addEventListener("click", () => addUrl($("image-url").value));
  $("image-url").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); addUrl($("image-url").value); }
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  let depth = 0;   // dragenter/dragleave fire for every child element crossed
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    const dt = e.dataTransfer;
    if (dt.files && dt.files.length) addFiles(dt.files);
    else if (dt.getData("text/uri-list")) addUrl(dt.getData("text/uri-list").split("\n")[0]);
  });
}

wire();
loadServerInfo();
