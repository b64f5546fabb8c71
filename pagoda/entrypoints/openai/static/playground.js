// Pagoda's chat playground: streams replies from this server's own OpenAI API
// (/v1/models, /v1/chat/completions). Model output is only ever put in the page as text
// (textContent, text nodes), never parsed as HTML.
"use strict";

const playground = {
  apiKey: null, // asked for when the server answers 401; kept in this page's memory only
  messages: [], // the conversation, as sent to the server
  controller: null, // aborts the reply being streamed
  lastReply: null, // the last reply's timings, for tests and measurements
};
window.playground = playground;

const $ = (id) => document.getElementById(id);

class ServerError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Markdown, safely: fenced code blocks, headings, lists, paragraphs, `code` and **bold**.
// Every piece of text becomes a text node, so `<script>` in a reply is shown, not run.
function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const fence = /```[^\n]*\n?([\s\S]*?)(?:```|$)/g; // an unclosed fence (mid-stream) runs to the end
  let last = 0;
  for (const match of text.matchAll(fence)) {
    appendBlocks(fragment, text.slice(last, match.index));
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = match[1];
    pre.append(code);
    fragment.append(pre);
    last = match.index + match[0].length;
  }
  appendBlocks(fragment, text.slice(last));
  return fragment;
}

function appendBlocks(parent, text) {
  let paragraph = null;
  let list = null;
  for (const line of text.split("\n")) {
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:([-*+])|\d+[.)])\s+(.*)$/);
    if (!line.trim()) {
      paragraph = list = null;
    } else if (heading) {
      const level = Math.min(6, heading[1].length + 2); // the page's own h1 stays on top
      parent.append(inlineElement(`h${level}`, heading[2]));
      paragraph = list = null;
    } else if (item) {
      const kind = item[1] ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== kind) {
        list = document.createElement(kind);
        parent.append(list);
      }
      list.append(inlineElement("li", item[2]));
      paragraph = null;
    } else {
      if (paragraph) {
        paragraph.append(document.createElement("br"));
        appendInline(paragraph, line);
      } else {
        paragraph = inlineElement("p", line);
        parent.append(paragraph);
      }
      list = null;
    }
  }
}

function inlineElement(tag, text) {
  const element = document.createElement(tag);
  appendInline(element, text);
  return element;
}

function appendInline(parent, text) {
  for (const part of text.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/)) {
    if (part.startsWith("`") && part.endsWith("`") && part.length > 2) {
      parent.append(textElement("code", part.slice(1, -1)));
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      parent.append(textElement("strong", part.slice(2, -2)));
    } else if (part) {
      parent.append(document.createTextNode(part));
    }
  }
}

function textElement(tag, text) {
  const element = document.createElement(tag);
  element.textContent = text;
  return element;
}

// The server -------------------------------------------------------------------------------

function headers() {
  const result = { "Content-Type": "application/json" };
  if (playground.apiKey !== null) result.Authorization = `Bearer ${playground.apiKey}`;
  return result;
}

async function serverError(response) {
  const body = await response.text();
  try {
    const { message, param } = JSON.parse(body).error;
    return new ServerError(response.status, `Error ${response.status}${param ? ` (${param})` : ""}: ${message}`);
  } catch {
    return new ServerError(response.status, `HTTP ${response.status}: ${body || response.statusText}`);
  }
}

// The JSON events of a server-sent event stream, up to [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await serverError(response);
  const select = $("model");
  select.replaceChildren(
    ...(await response.json()).data.map((model) => {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      return option;
    }),
  );
}

// Loads the models, asking for the API key while the server refuses it.
async function connect() {
  try {
    await loadModels();
    $("key-form").hidden = true;
    $("prompt").focus();
  } catch (error) {
    if (error.status !== 401) return showError(addMessage("assistant"), error.message);
    if (playground.apiKey !== null) $("key-error").textContent = error.message;
    playground.apiKey = null; // a refused key is not kept
    $("key-form").hidden = false;
    $("api-key").focus();
  }
}

// The chat ---------------------------------------------------------------------------------

function addMessage(role, text = "") {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function showError(element, message) {
  element.append(textElement("p", message));
  element.lastChild.className = "error";
}

function samplingParams() {
  const params = {};
  for (const [id, name] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]]) {
    const value = $(id).value.trim();
    if (value !== "") params[name] = Number(value);
  }
  return params;
}

function requestBody() {
  const system = $("system").value.trim();
  return {
    model: $("model").value,
    messages: system ? [{ role: "system", content: system }, ...playground.messages] : playground.messages,
    stream: true,
    stream_options: { include_usage: true },
    ...samplingParams(),
  };
}

// Streams one reply into `element`, keeping its text and timings in `reply` as they come.
async function streamReply(element, reply, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal,
  });
  if (!response.ok) throw await serverError(response);
  const content = element.appendChild(document.createElement("div"));
  for await (const event of sseEvents(response)) {
    if (event.error) throw new ServerError(event.error.code, event.error.message);
    if (event.usage) reply.tokens = event.usage.completion_tokens;
    const delta = event.choices?.[0]?.delta?.content;
    if (!delta) continue;
    reply.firstTokenAt ??= performance.now();
    reply.text += delta;
    reply.tokens += event.usage ? 0 : 1; // a count of chunks until the usage says how many
    content.replaceChildren(renderMarkdown(reply.text));
    element.scrollIntoView({ block: "end" });
  }
}

function showStats(element, reply, note) {
  const parts = [];
  if (reply.firstTokenAt !== null) {
    parts.push(`TTFT ${Math.round(reply.firstTokenAt - reply.sentAt)} ms`, `${reply.tokens} tokens`);
    const decodeSeconds = (reply.endedAt - reply.firstTokenAt) / 1000;
    if (reply.tokens > 1 && decodeSeconds > 0) parts.push(`${((reply.tokens - 1) / decodeSeconds).toFixed(1)} tokens/s`);
  }
  if (note) parts.push(note);
  element.append(textElement("div", parts.join(" · ")));
  element.lastChild.className = "stats";
  element.scrollIntoView({ block: "end" });
  playground.lastReply = {
    ttftMs: reply.firstTokenAt === null ? null : reply.firstTokenAt - reply.sentAt,
    firstTokenSincePageLoadMs: reply.firstTokenAt, // performance.now() counts from navigation
    tokens: reply.tokens,
    note: note || null,
  };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || playground.controller) return;
  $("prompt").value = "";
  playground.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const element = addMessage("assistant");
  const reply = { text: "", tokens: 0, sentAt: performance.now(), firstTokenAt: null, endedAt: null };
  playground.controller = new AbortController();
  setBusy(true);
  let note = null;
  try {
    await streamReply(element, reply, playground.controller.signal);
  } catch (error) {
    note = error.name === "AbortError" ? "stopped" : "failed";
    if (note === "failed") showError(element, error.message);
    if (error.status === 401) {
      $("prompt").value = text; // not answered: the question goes back to the input box
      $("key-form").hidden = false;
      $("api-key").focus();
    }
  } finally {
    reply.endedAt = performance.now();
    playground.controller = null;
    setBusy(false);
  }
  showStats(element, reply, note);
  // A reply cut short stays in the conversation; a question with no reply at all leaves it.
  if (reply.text) playground.messages.push({ role: "assistant", content: reply.text });
  else playground.messages.pop();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => playground.controller?.abort());
  $("clear").addEventListener("click", () => {
    playground.controller?.abort();
    playground.messages = [];
    $("messages").replaceChildren();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    playground.apiKey = $("api-key").value;
    $("api-key").value = "";
    $("key-error").textContent = "";
    connect();
  });
  connect();
});

playground.renderMarkdown = renderMarkdown;
