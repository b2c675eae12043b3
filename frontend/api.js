// The HTTP API of the ingress, as the page uses it. Every failure becomes an ApiError whose
// message a person can act on; this module knows nothing about the DOM.

export class ApiError extends Error {
  /** status: the HTTP status, or 0 when the server could not be reached at all. */
  constructor(message, { status = 0, retryAfterS = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfterS = retryAfterS;
  }

  get isRetryable() {
    return [0, 429, 502, 503, 504].includes(this.status);
  }
}

/** The server predates this route (FastAPI's own 404 "Not Found", or 405). */
export class RouteMissingError extends ApiError {}

const NETWORK_MESSAGE = "Can't reach the server. Check your connection, then retry.";

/** `{"detail": "msg"}` or FastAPI's 422 `{"detail": [{loc, msg}, ...]}` -> one readable line. */
function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((error) => {
        const field = (error.loc || []).filter((part) => part !== "body").join(".");
        return field ? `${field}: ${error.msg}` : error.msg;
      })
      .join("; ");
  }
  return null;
}

/** The server's message as a sentence: capitalized, one full stop. */
const sentence = (text) => `${text[0].toUpperCase()}${text.slice(1).replace(/\.$/, "")}.`;

async function errorFromResponse(response) {
  let detail = null;
  try {
    detail = describeDetail((await response.json()).detail);
  } catch {
    // Not JSON (a proxy's error page): fall back to the status line below.
  }
  if (response.status === 405 || (response.status === 404 && detail === "Not Found")) {
    return new RouteMissingError(`This server does not support ${new URL(response.url).pathname} yet.`, {
      status: response.status,
    });
  }
  const retryAfterS = Number(response.headers.get("Retry-After")) || null;
  let message = detail || `The server answered ${response.status} ${response.statusText}.`;
  if (response.status === 503) {
    // Overloaded, or a model (re)loading: both pass, so say when to retry.
    const wait = retryAfterS ? `Retry in ${retryAfterS} s.` : "Retry in a moment.";
    message = `${sentence(detail || "The server is busy or a model is still loading")} ${wait}`;
  } else if (response.status === 429) {
    // One of this user's limits; the server's message names it and says when to retry.
    message = sentence(detail || `You have reached a limit of this server. Retry in ${retryAfterS || 1} s`);
  }
  return new ApiError(message, { status: response.status, retryAfterS });
}

const API_KEY_STORAGE = "ray-chat.apiKey";

/** The API key this browser keeps for servers that require one (`auth: key` or `users`). */
export const apiKey = () => localStorage.getItem(API_KEY_STORAGE) || "";

/** Forgets the key: the next request that needs one asks for it again. */
export const signOut = () => localStorage.removeItem(API_KEY_STORAGE);

// How the page asks the person for a key: `ask(wasRejected)` resolves to the key, or null if
// they would rather not (`onKeyNeeded`). Without a page, no one is asked.
let askForKey = async () => null;
let asking = null; // the question being asked: every request refused meanwhile waits for its answer

export function onKeyNeeded(ask) {
  askForKey = ask;
}

/** After a 401 to a request sent with `sentKey`: true once there is another key to try. */
async function keyAfterRefusal(sentKey) {
  if (apiKey() !== sentKey) return true; // another request got a new key meanwhile
  asking ??= askForKey(Boolean(sentKey)).finally(() => (asking = null));
  const key = ((await asking) || "").trim();
  if (!key) return apiKey() !== sentKey;
  localStorage.setItem(API_KEY_STORAGE, key);
  return true;
}

/** fetch() that turns network failures and non-2xx answers into ApiError, and sends the API key
 * when the server requires one (asking the person for it on a 401, `onKeyNeeded`). */
async function request(path, { method = "GET", body, signal, headers = {} } = {}) {
  for (;;) {
    const key = apiKey();
    let response;
    try {
      response = await fetch(path, {
        method,
        signal,
        headers: {
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
          ...(key ? { Authorization: `Bearer ${key}` } : {}),
          ...headers,
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(NETWORK_MESSAGE);
    }
    if (response.status === 401 && (await keyAfterRefusal(key))) continue;
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }
}

const json = async (path, options) => (await request(path, options)).json();

export const listModels = () => json("/models");

/** The name of the user whose key this browser sends (`auth: users`); null where the server has
 * no users (one shared key). */
export async function userName() {
  try {
    return (await json("/v1/usage")).data[0]?.user ?? null;
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
}

/** {ready: bool, models: {name: "ready"|"loading"|"failed"}} (models is empty when all ready). */
export async function readiness() {
  let response;
  try {
    response = await fetch("/readyz");
  } catch {
    throw new ApiError(NETWORK_MESSAGE);
  }
  if (response.ok) return { ready: true, models: {} };
  const body = await response.json().catch(() => ({}));
  return { ready: false, models: body.models || {} };
}

/** Summaries newest first. Servers without `?detail=true` answer bare ids oldest first. */
export async function listConversations() {
  const items = await json("/conversations?detail=true");
  if (items.every((item) => typeof item === "number")) {
    return items.reverse().map((id) => ({ id, title: null, created_at: null, updated_at: null }));
  }
  return items;
}

export async function createConversation() {
  try {
    return await json("/conversations", { method: "POST" });
  } catch (error) {
    if (!(error instanceof RouteMissingError)) throw error;
    const id = await json("/conversations/start");
    return { id, title: null, created_at: null, updated_at: null };
  }
}

export const getConversation = (id) => json(`/conversations/${id}`);

export const renameConversation = (id, title) => json(`/conversations/${id}`, { method: "PATCH", body: { title } });

export const deleteConversation = (id) => json(`/conversations/${id}`, { method: "DELETE" });

export const exportUrl = (id, format) => `/conversations/${id}/export?format=${format}`;

/** A plain link cannot send the API key: with a key, fetch the export and save it from memory. */
export async function downloadExport(event, anchor) {
  if (!apiKey()) return; // the link itself works
  event.preventDefault();
  const url = new URL(anchor.href);
  const response = await request(url.pathname + url.search);
  const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : "conversation";
  link.click();
  URL.revokeObjectURL(link.href);
}

/**
 * Streams an answer: calls onText(fullTextSoFar) as pieces arrive and resolves with the full
 * text. Aborting `signal` ends the stream; the server then keeps the partial answer as "stopped".
 */
export const generate = (conversationId, body, options) =>
  streamText(`/conversations/${conversationId}/generate`, body, options);

/** Like generate, for the last prompt again; the new answer replaces the previous one. */
export const regenerate = (conversationId, body, options) =>
  streamText(`/conversations/${conversationId}/regenerate`, body, options);

/** Ends the answer being generated now; the server stores it as "stopped". Best effort: the
 * aborted fetch already tells the server, so a failure here is only logged. */
export async function stopGeneration(conversationId) {
  try {
    await request(`/conversations/${conversationId}/stop`, { method: "POST" });
  } catch (error) {
    console.warn("stop request failed:", error.message);
  }
}

const STREAM_ERROR_MARKER = "\n[error] ";

async function streamText(path, body, { signal, onText }) {
  const response = await request(path, { method: "POST", body, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      onText(text);
    }
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const partial = new ApiError("The connection dropped in the middle of the answer. What arrived is kept; retry to ask again.");
    partial.partialText = text;
    throw partial;
  }
  text += decoder.decode();
  // An answer that failed after it started ends with the server's error line (docs/api.md#answers-that-stop-or-fail).
  const cut = text.lastIndexOf(STREAM_ERROR_MARKER);
  if (cut >= 0 && text.endsWith("\n")) {
    const failure = new ApiError(text.slice(cut + STREAM_ERROR_MARKER.length).trim());
    failure.partialText = text.slice(0, cut);
    onText(failure.partialText);
    throw failure;
  }
  onText(text);
  return text;
}
