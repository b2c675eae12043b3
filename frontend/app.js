// The chat page: sidebar of conversations, model picker, parameters, the streaming chat and its
// errors. HTTP lives in api.js, Markdown rendering in markdown.js, the parameters form in
// parameters.js; this module owns the DOM and the page's state.

import * as api from "/static/api.js";
import { renderMarkdown } from "/static/markdown.js";
import { ParametersPanel } from "/static/parameters.js";

const MODEL_KEY = "ray-chat.model";
const CONVERSATION_KEY = "ray-chat.conversation";
const READY_POLL_S = 30;
const LOADING_POLL_S = 3;
const STICK_TO_BOTTOM_PX = 48;

const $ = (selector) => document.querySelector(selector);
const ui = {
  sidebar: $("#sidebar"),
  scrim: $("#scrim"),
  openSidebar: $("#open-sidebar"),
  closeSidebar: $("#close-sidebar"),
  newConversation: $("#new-conversation"),
  conversationList: $("#conversation-list"),
  conversationEmpty: $("#conversation-empty"),
  title: $("#chat-title"),
  modelSelect: $("#model-select"),
  modelState: $("#model-state"),
  paramsToggle: $("#params-toggle"),
  paramsPanel: $("#params-panel"),
  messages: $("#messages"),
  welcome: $("#welcome"),
  messageItems: $("#message-items"),
  jumpLatest: $("#jump-latest"),
  errorBanner: $("#error-banner"),
  errorMessage: $("#error-message"),
  retryButton: $("#retry-button"),
  dismissError: $("#dismiss-error"),
  composer: $("#composer"),
  prompt: $("#prompt-input"),
  send: $("#send-button"),
  stop: $("#stop-button"),
  confirmDialog: $("#confirm-delete-dialog"),
  signInDialog: $("#sign-in-dialog"),
  signInKey: $("#sign-in-key"),
  signInError: $("#sign-in-error"),
  account: $("#account"),
  accountName: $("#account-name"),
  signOut: $("#sign-out"),
  confirmTitle: $("#confirm-title"),
  messageTemplate: $("#message-template"),
  conversationTemplate: $("#conversation-template"),
};

const state = {
  conversations: [],
  currentId: null,
  models: [],
  modelStates: {}, // name -> "ready" | "loading" | "failed" | "offline"
  stream: null, // {controller} while an answer streams
  loading: Promise.resolve(), // settles once the open conversation's history is shown
  stickToBottom: true,
  retry: null,
};

const parameters = new ParametersPanel(ui.paramsPanel, { onError: (message) => showError(message) });

// ---------------------------------------------------------------- errors

function showError(message, retry = null) {
  ui.errorMessage.textContent = message;
  state.retry = retry;
  ui.retryButton.hidden = !retry;
  ui.errorBanner.hidden = false;
}

function clearError() {
  ui.errorBanner.hidden = true;
  state.retry = null;
}

const messageOf = (error) => (error instanceof api.ApiError ? error.message : `Something went wrong: ${error.message}`);

// ---------------------------------------------------------------- models

function selectedModel() {
  return ui.modelSelect.value || null;
}

function renderModelState() {
  const name = selectedModel();
  const modelState = state.modelStates[name] || "loading";
  ui.modelState.dataset.state = modelState;
  ui.modelState.querySelector(".label").textContent = modelState;
  ui.modelState.title = `${name || "model"}: ${modelState}`;
  for (const option of ui.modelSelect.options) {
    const optionState = state.modelStates[option.value] || "loading";
    option.textContent = optionState === "ready" ? option.value : `${option.value} (${optionState})`;
  }
}

async function loadModels() {
  state.models = await api.listModels();
  const remembered = localStorage.getItem(MODEL_KEY);
  const byName = (name) => state.models.find((m) => m.name === name || m.aliases.includes(name));
  const initial = byName(remembered) || state.models.find((m) => m.is_default) || state.models[0];
  ui.modelSelect.replaceChildren(
    ...state.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name;
      option.title = [model.name, ...model.aliases].join(", ") + ` — revision ${model.revision}`;
      return option;
    }),
  );
  if (initial) ui.modelSelect.value = initial.name;
  renderModelState();
}

let readinessTimer = null;
async function pollReadiness() {
  clearTimeout(readinessTimer);
  let delayS = READY_POLL_S;
  try {
    const { ready, models } = await api.readiness();
    for (const model of state.models) state.modelStates[model.name] = ready ? "ready" : models[model.name] || "ready";
    if (!ready) delayS = LOADING_POLL_S;
  } catch {
    for (const model of state.models) state.modelStates[model.name] = "offline";
    delayS = LOADING_POLL_S;
  }
  renderModelState();
  readinessTimer = setTimeout(pollReadiness, delayS * 1000);
}

// ---------------------------------------------------------------- conversations (sidebar)

const titleOf = (conversation) => conversation?.title || (conversation?.id ? `Conversation ${conversation.id}` : "New conversation");

function shortTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const today = new Date();
  return date.toDateString() === today.toDateString()
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

function renderConversationList() {
  const items = state.conversations.map((conversation) => {
    const item = ui.conversationTemplate.content.firstElementChild.cloneNode(true);
    const title = titleOf(conversation);
    item.dataset.id = conversation.id;
    const link = item.querySelector(".conversation-link");
    link.href = `#/c/${conversation.id}`;
    item.querySelector(".conversation-title").textContent = title;
    const time = item.querySelector(".conversation-time");
    time.textContent = shortTime(conversation.updated_at);
    if (conversation.updated_at) time.dateTime = conversation.updated_at;
    if (conversation.id === state.currentId) {
      item.classList.add("active");
      link.setAttribute("aria-current", "page");
    }
    item.querySelector('[data-action="rename"]').setAttribute("aria-label", `Rename “${title}”`);
    item.querySelector('[data-action="delete"]').setAttribute("aria-label", `Delete “${title}”`);
    item.querySelector(".export-menu summary").setAttribute("aria-label", `Export “${title}”`);
    for (const anchor of item.querySelectorAll(".export-options a")) {
      anchor.href = api.exportUrl(conversation.id, anchor.dataset.format);
      anchor.addEventListener("click", (event) => api.downloadExport(event, anchor).catch((error) => showError(error.message)));
    }
    return item;
  });
  placeConversationItems(items);
  revealActiveConversation();
  ui.conversationEmpty.hidden = items.length > 0;
  const current = state.conversations.find((c) => c.id === state.currentId);
  ui.title.textContent = state.currentId ? titleOf(current || { id: state.currentId }) : "New conversation";
  document.title = state.currentId ? `${ui.title.textContent} · ray-chat` : "ray-chat";
}

/** Puts `items` in the sidebar without undoing what the user is in the middle of (an answer
 * that finishes re-renders the list): a row being renamed stays the very same element, in
 * place, since replacing it would detach the input and throw away what is typed; an open export
 * menu stays open. */
function placeConversationItems(items) {
  const openMenu = ui.conversationList.querySelector(".export-menu[open]")?.closest("[data-id]")?.dataset.id;
  for (const item of items) if (item.dataset.id === openMenu) item.querySelector(".export-menu").open = true;
  const editing = ui.conversationList.querySelector(".renaming");
  const index = editing ? items.findIndex((item) => item.dataset.id === editing.dataset.id) : -1;
  if (index < 0) {
    ui.conversationList.replaceChildren(...items);
    return;
  }
  for (const child of [...ui.conversationList.children]) if (child !== editing) child.remove();
  editing.before(...items.slice(0, index));
  editing.after(...items.slice(index + 1));
}

/** Scrolls the sidebar (only the sidebar: scrollIntoView would also move the page while the
 * phone drawer is off-screen) so the open conversation is in view. */
function revealActiveConversation() {
  const active = ui.conversationList.querySelector(".active");
  const nav = ui.conversationList.parentElement;
  if (!active) return;
  const top = active.offsetTop - ui.conversationList.offsetTop;
  if (top < nav.scrollTop) nav.scrollTop = top;
  else if (top + active.offsetHeight > nav.scrollTop + nav.clientHeight) nav.scrollTop = top + active.offsetHeight - nav.clientHeight;
}

async function refreshConversations() {
  try {
    state.conversations = await api.listConversations();
    renderConversationList();
  } catch (error) {
    showError(messageOf(error), refreshConversations);
  }
}

function startRename(item) {
  const id = Number(item.dataset.id);
  const conversation = state.conversations.find((c) => c.id === id);
  const input = document.createElement("input");
  input.className = "rename-input";
  input.dataset.testid = "rename-input";
  input.value = conversation?.title || "";
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title");
  item.classList.add("renaming");
  item.querySelector(".conversation-link").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation?.title) {
      try {
        const summary = await api.renameConversation(id, title);
        // The list may have been reloaded while the user typed: update the entry it holds now.
        Object.assign(state.conversations.find((c) => c.id === id) || {}, summary);
      } catch (error) {
        showError(messageOf(error));
      }
    }
    item.classList.remove("renaming"); // the edit is over: the re-render may replace this row now
    renderConversationList();
    ui.conversationList.querySelector(`[data-id="${id}"] .conversation-link`)?.focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(item) {
  const id = Number(item.dataset.id);
  ui.confirmTitle.textContent = titleOf(state.conversations.find((c) => c.id === id) || { id });
  ui.confirmDialog.returnValue = "";
  ui.confirmDialog.showModal();
  ui.confirmDialog.addEventListener(
    "close",
    async () => {
      if (ui.confirmDialog.returnValue !== "delete") return;
      try {
        await api.deleteConversation(id);
      } catch (error) {
        showError(messageOf(error), () => confirmDelete(item));
        return;
      }
      state.conversations = state.conversations.filter((c) => c.id !== id);
      if (state.currentId === id) openConversation(null);
      else renderConversationList();
    },
    { once: true },
  );
}

// ---------------------------------------------------------------- messages

function setItemText(item, text) {
  item.rawText = text;
  const content = item.querySelector(".message-content");
  if (item.dataset.role === "assistant") content.replaceChildren(renderMarkdown(text));
  else content.textContent = text;
}

function setItemStatus(item, status, error = null) {
  item.dataset.status = status;
  const badge = item.querySelector(".message-badge");
  badge.textContent = status === "stopped" ? "Stopped" : status === "failed" ? "Failed" : "";
  badge.hidden = !badge.textContent;
  const errorLine = item.querySelector(".message-error");
  errorLine.textContent = error || "";
  errorLine.hidden = !error;
}

// A call an answer made (stored by a chat with tools through /v1): the function and its arguments.
function callLine(call) {
  const line = document.createElement("pre");
  line.className = "message-call";
  line.textContent = `${call.function.name}(${call.function.arguments})`;
  return line;
}

const AUTHORS = { user: "You", tool: "Tool result" };

function createMessageItem({ role, content = "", model = null, status = "complete", error = null, id = null, tool_calls = null }) {
  const item = ui.messageTemplate.content.firstElementChild.cloneNode(true);
  item.dataset.role = role;
  item.classList.add(role);
  if (id !== null) item.dataset.id = id;
  item.querySelector(".message-author").textContent = AUTHORS[role] || model || "Assistant";
  setItemText(item, content);
  if (tool_calls) item.querySelector(".message-content").append(...tool_calls.map(callLine));
  setItemStatus(item, status, error);
  return item;
}

function updateMessageChrome() {
  const items = [...ui.messageItems.children];
  ui.welcome.hidden = items.length > 0;
  const lastAssistant = items.findLast((item) => item.dataset.role === "assistant");
  for (const item of items) {
    item.querySelector('[data-action="regenerate"]').hidden = item !== lastAssistant || Boolean(state.stream);
  }
}

function renderMessages(messages) {
  ui.messageItems.replaceChildren(...messages.map(createMessageItem));
  updateMessageChrome();
  state.stickToBottom = true;
  scrollToBottom();
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
  ui.jumpLatest.hidden = true;
}

function followOutput() {
  if (state.stickToBottom) scrollToBottom();
  else ui.jumpLatest.hidden = false;
}

ui.messages.addEventListener("scroll", () => {
  const distance = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight;
  state.stickToBottom = distance < STICK_TO_BOTTOM_PX;
  if (state.stickToBottom) ui.jumpLatest.hidden = true;
});
ui.jumpLatest.addEventListener("click", () => {
  state.stickToBottom = true;
  scrollToBottom();
});

async function copyText(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
    else {
      // Plain-http deployments have no async clipboard; the old selection-based copy still works.
      const scratch = document.createElement("textarea");
      scratch.value = text;
      scratch.setAttribute("readonly", "");
      scratch.style.position = "fixed";
      scratch.style.opacity = "0";
      document.body.append(scratch);
      scratch.select();
      document.execCommand("copy");
      scratch.remove();
    }
    const label = button.querySelector(".action-label") || button;
    const before = label.textContent;
    label.textContent = "Copied";
    button.classList.add("done");
    setTimeout(() => {
      label.textContent = before;
      button.classList.remove("done");
    }, 1500);
  } catch (error) {
    showError(`Could not copy: ${error.message}`);
  }
}

ui.messageItems.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const item = button.closest(".message");
  if (button.dataset.action === "copy") copyText(item.rawText || "", button);
  else if (button.dataset.action === "copy-code") copyText(button.closest(".code-block").querySelector("pre").textContent, button);
  else if (button.dataset.action === "regenerate") regenerate();
});

// ---------------------------------------------------------------- opening a conversation

async function openConversation(id) {
  if (state.stream) stopStreaming();
  clearError();
  state.currentId = id;
  if (id) localStorage.setItem(CONVERSATION_KEY, String(id));
  else localStorage.removeItem(CONVERSATION_KEY);
  const hash = id ? `#/c/${id}` : "";
  if (location.hash !== hash) history.replaceState(null, "", hash || location.pathname);
  renderConversationList();
  if (!id) {
    renderMessages([]);
    ui.prompt.focus();
    return;
  }
  const loading = api.getConversation(id);
  state.loading = loading.catch(() => {});
  try {
    const conversation = await loading;
    if (state.currentId !== id) return;
    renderMessages(conversation.messages.filter((m) => m.role !== "system"));
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 404) {
      state.conversations = state.conversations.filter((c) => c.id !== id);
      await openConversation(null);
      showError(`Conversation ${id} no longer exists.`);
    } else {
      showError(messageOf(error), () => openConversation(id));
    }
  }
}

const idFromHash = () => Number((location.hash.match(/^#\/c\/(\d+)$/) || [])[1]) || null;

window.addEventListener("hashchange", () => {
  const id = idFromHash();
  if (id !== state.currentId) openConversation(id);
});

// ---------------------------------------------------------------- sending and streaming

function setStreaming(stream) {
  state.stream = stream;
  ui.send.hidden = Boolean(stream);
  ui.stop.hidden = !stream;
  ui.messages.setAttribute("aria-busy", String(Boolean(stream)));
  updateMessageChrome();
}

/** Aborting the fetch is enough for the server to keep the partial answer; the stop route
 * (where the server has it) also ends generation at once, not when the disconnect is noticed. */
function stopStreaming() {
  if (!state.stream) return;
  state.stream.controller.abort();
  if (state.currentId) api.stopGeneration(state.currentId);
}

/** Parameters and model for the next request, or null (the problem shown) when they can't be used. */
function nextRequest(retry) {
  const values = parameters.values();
  if (!values) return null;
  const model = selectedModel();
  clearError();
  if (state.modelStates[model] === "loading") {
    showError(`${model} is still loading. Retry in a moment.`, retry);
    return null;
  }
  return { ...values, model };
}

async function ensureConversation() {
  if (state.currentId) return state.currentId;
  const created = await api.createConversation();
  state.conversations.unshift(created);
  state.currentId = created.id;
  localStorage.setItem(CONVERSATION_KEY, String(created.id));
  history.replaceState(null, "", `#/c/${created.id}`);
  renderConversationList();
  return created.id;
}

/**
 * Shows a new answer streaming in. `request(conversationId, signal, onText)` starts it. When it
 * is refused before any text arrived (nothing was stored), `onRefused(error)` undoes the turn;
 * `retry` is what the error banner's Retry does.
 */
async function streamAnswer({ model, request, onRefused, retry }) {
  const controller = new AbortController();
  const answerItem = createMessageItem({ role: "assistant", model });
  answerItem.classList.add("streaming");
  ui.messageItems.append(answerItem);
  setStreaming({ controller });
  state.stickToBottom = true;
  scrollToBottom();

  let pendingText = null;
  let hasText = false;
  // A new conversation is titled by its first prompt, which the server stores as the answer
  // starts, not before its first byte: the list is read again, a few times at most, until then.
  let titleChecks = 0;
  let titleCheckedAt = -Infinity;
  const checkTitle = async () => {
    if (titleChecks >= 5 || performance.now() - titleCheckedAt < 400) return;
    titleChecks += 1;
    titleCheckedAt = performance.now();
    await refreshConversations();
    if (state.conversations.find((c) => c.id === state.currentId)?.title) titleChecks = Infinity;
  };
  const render = () => {
    if (pendingText === null) return;
    setItemText(answerItem, pendingText);
    pendingText = null;
    followOutput();
  };
  const onText = (soFar) => {
    if (pendingText === null) requestAnimationFrame(render);
    pendingText = soFar;
    hasText = true;
    checkTitle();
  };
  try {
    const conversationId = await ensureConversation();
    pendingText = await request(conversationId, controller.signal, onText);
    render();
    setItemStatus(answerItem, "complete");
  } catch (error) {
    render();
    if (error.name === "AbortError") {
      setItemStatus(answerItem, "stopped");
    } else if (hasText || error.partialText) {
      setItemStatus(answerItem, "failed", "The answer was cut off.");
      showError(messageOf(error), retry);
    } else {
      answerItem.remove();
      onRefused(error);
    }
  } finally {
    answerItem.classList.remove("streaming");
    setStreaming(null);
    followOutput();
  }
  refreshConversations();
}

/** Sends a prompt and streams its answer. The composer is emptied only once the prompt is on
 * its way, so a refused send leaves the text where the user typed it. */
async function send(prompt, { fromComposer = false } = {}) {
  prompt = prompt.trim();
  if (!prompt || state.stream) return;
  await state.loading; // the loaded history must not replace the turn about to be shown
  if (state.stream) return;
  const body = nextRequest(() => send(prompt));
  if (!body) return;
  if (fromComposer) {
    ui.prompt.value = "";
    autosizePrompt();
  }
  const userItem = createMessageItem({ role: "user", content: prompt });
  ui.messageItems.append(userItem);
  await streamAnswer({
    model: body.model,
    request: (id, signal, onText) => api.generate(id, { prompt, ...body }, { signal, onText }),
    retry: () => send(prompt),
    onRefused: (error) => {
      // Nothing was stored or streamed: take the turn back and offer to send it again.
      userItem.remove();
      if (!ui.prompt.value.trim()) ui.prompt.value = prompt;
      autosizePrompt();
      updateMessageChrome();
      showError(messageOf(error), () => {
        if (ui.prompt.value.trim() === prompt) ui.prompt.value = "";
        autosizePrompt();
        send(prompt);
      });
    },
  });
}

/** Answers the last prompt again; the new answer takes the old one's place (the server keeps
 * only the new one). Servers without the regenerate route get the prompt sent again instead. */
async function regenerate() {
  if (state.stream) return;
  const items = [...ui.messageItems.children];
  const lastPrompt = items.findLast((item) => item.dataset.role === "user");
  if (!lastPrompt) return;
  const body = nextRequest(regenerate);
  if (!body) return;
  const previous = lastPrompt.nextElementSibling;
  previous?.remove();
  await streamAnswer({
    model: body.model,
    request: (id, signal, onText) => api.regenerate(id, body, { signal, onText }),
    retry: regenerate,
    onRefused: (error) => {
      if (previous) ui.messageItems.append(previous);
      updateMessageChrome();
      if (error instanceof api.RouteMissingError) send(lastPrompt.rawText);
      else showError(messageOf(error), regenerate);
    },
  });
}

// ---------------------------------------------------------------- composer and chrome

function autosizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send(ui.prompt.value, { fromComposer: true });
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.prompt.addEventListener("input", autosizePrompt);
ui.stop.addEventListener("click", () => {
  stopStreaming();
  ui.prompt.focus();
});
for (const suggestion of document.querySelectorAll(".suggestion")) {
  suggestion.addEventListener("click", () => send(suggestion.textContent));
}

ui.retryButton.addEventListener("click", () => {
  const retry = state.retry;
  clearError();
  retry?.();
});
ui.dismissError.addEventListener("click", clearError);

ui.modelSelect.addEventListener("change", () => {
  localStorage.setItem(MODEL_KEY, selectedModel());
  renderModelState();
});

function setParamsOpen(open) {
  ui.paramsPanel.hidden = !open;
  ui.paramsToggle.setAttribute("aria-expanded", String(open));
  if (open) ui.paramsPanel.querySelector("input[type=number]").focus();
}
ui.paramsToggle.addEventListener("click", () => setParamsOpen(ui.paramsPanel.hidden));

function openSidebar() {
  ui.sidebar.classList.add("open");
  ui.scrim.hidden = false;
  ui.openSidebar.setAttribute("aria-expanded", "true");
  ui.newConversation.focus();
}
function closeSidebar() {
  if (!ui.sidebar.classList.contains("open")) return;
  ui.sidebar.classList.remove("open");
  ui.scrim.hidden = true;
  ui.openSidebar.setAttribute("aria-expanded", "false");
}
ui.openSidebar.addEventListener("click", openSidebar);
ui.closeSidebar.addEventListener("click", closeSidebar);
ui.scrim.addEventListener("click", closeSidebar);

ui.newConversation.addEventListener("click", () => {
  closeSidebar();
  openConversation(null);
});
ui.conversationList.addEventListener("click", (event) => {
  if (event.target.closest(".conversation-link")) closeSidebar(); // the hash change opens it
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const item = button.closest(".conversation");
  if (button.dataset.action === "rename") startRename(item);
  else if (button.dataset.action === "delete") confirmDelete(item);
});

document.addEventListener("click", (event) => {
  for (const menu of document.querySelectorAll(".export-menu[open]")) {
    if (!menu.contains(event.target) || event.target.closest(".export-options a")) menu.open = false;
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (state.stream) stopStreaming();
  else if (!ui.paramsPanel.hidden) {
    setParamsOpen(false);
    ui.paramsToggle.focus();
  } else closeSidebar();
  for (const menu of document.querySelectorAll(".export-menu[open]")) menu.open = false;
});

// ---------------------------------------------------------------- signing in

/** Asks for an API key in the sign-in dialog (`api.onKeyNeeded`); null if cancelled. */
function askForKey(wasRejected) {
  ui.signInError.hidden = !wasRejected;
  ui.signInKey.value = "";
  ui.signInDialog.returnValue = "";
  ui.signInDialog.showModal();
  return new Promise((resolve) => {
    ui.signInDialog.addEventListener(
      "close",
      () => {
        const key = ui.signInDialog.returnValue === "sign-in" ? ui.signInKey.value.trim() : "";
        ui.signInKey.value = "";
        if (key) setTimeout(showAccount); // once api.js has kept the key
        resolve(key || null);
      },
      { once: true },
    );
  });
}

/** Who is signed in, at the foot of the sidebar, with the way out; nothing without a key. */
async function showAccount() {
  ui.account.hidden = !api.apiKey();
  if (ui.account.hidden) return;
  try {
    const name = await api.userName();
    ui.accountName.textContent = name ? `Signed in as ${name}` : "Signed in with a key";
  } catch {
    ui.accountName.textContent = "Signed in";
  }
}

ui.signOut.addEventListener("click", () => {
  api.signOut();
  localStorage.removeItem(CONVERSATION_KEY); // the next person starts on a new conversation
  location.replace(location.pathname); // a fresh page, which asks for a key again
});

api.onKeyNeeded(askForKey);

// ---------------------------------------------------------------- start

async function start() {
  clearError();
  try {
    await loadModels();
  } catch (error) {
    state.modelStates = {};
    showError(messageOf(error), start);
    return;
  }
  pollReadiness();
  showAccount();
  await refreshConversations();
  const remembered = Number(localStorage.getItem(CONVERSATION_KEY)) || null;
  const id = idFromHash() || (state.conversations.some((c) => c.id === remembered) ? remembered : null);
  await openConversation(id);
  document.body.dataset.ready = "true"; // for tests and scripts: the first view is complete
}

start();
