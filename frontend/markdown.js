// Model output -> safe HTML. Raw HTML in an answer is shown as text (a model that writes
// "use a <div>" means the words), and DOMPurify cleans whatever Markdown produced, so nothing
// in an answer can run script, load images or restyle the page.

import { Marked } from "/static/vendor/marked/marked.esm.js";
import DOMPurify from "/static/vendor/dompurify/purify.es.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (char) => ESCAPES[char]);

const markdown = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    // Remote images would let an answer make the browser fetch arbitrary URLs: show a link.
    image: ({ href, text }) => `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`,
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Class names could borrow the page's own styles; only Markdown's `language-x` is kept.
DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "class" && !/^language-[\w+#.-]+$/.test(data.attrValue)) data.keepAttr = false;
});

const SANITIZE = {
  USE_PROFILE: { html: true },
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "svg", "math", "iframe"],
  FORBID_ATTR: ["style", "id"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};

/** Markdown text -> a sanitised DocumentFragment, code blocks given a header with a copy button. */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), { ...SANITIZE, RETURN_DOM_FRAGMENT: true });
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const language = (code?.className.match(/language-([\w+#.-]+)/) || [])[1] || "code";
    const wrapper = document.createElement("div");
    wrapper.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = language;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "code-copy";
    copy.dataset.action = "copy-code";
    copy.dataset.testid = "copy-code";
    copy.textContent = "Copy";
    head.append(label, copy);
    pre.replaceWith(wrapper);
    wrapper.append(head, pre);
  }
  return fragment;
}
