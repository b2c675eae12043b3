// The generation parameters panel: the original API's parameters with its defaults and ranges
// (serve_app/protocol.py is the source of truth; the server validates again), remembered in
// localStorage between visits.

const STORAGE_KEY = "ray-chat.parameters";

export const DEFAULTS = Object.freeze({
  sample_len: 256,
  temperature: 0.7,
  top_p: 0.9,
  repeat_penalty: 1.1,
  repeat_last_n: 64,
  seed: null,
  revision: null,
});

const INTEGER_FIELDS = new Set(["sample_len", "repeat_last_n", "seed"]);
const SLIDER_FIELDS = ["temperature", "top_p"];

export class ParametersPanel {
  constructor(form, { onError }) {
    this.form = form;
    this.onError = onError;
    this.errorLine = form.querySelector("#params-error");
    this.fill(this.loadStored());
    for (const name of SLIDER_FIELDS) {
      const slider = form.querySelector(`#param-${name}-range`);
      const box = form.elements[name];
      slider.addEventListener("input", () => {
        box.value = slider.value;
        this.save();
      });
      box.addEventListener("input", () => {
        slider.value = box.value;
      });
    }
    form.addEventListener("input", () => this.save());
    form.addEventListener("submit", (event) => event.preventDefault());
    form.querySelector("#params-reset").addEventListener("click", () => {
      this.fill(DEFAULTS);
      this.save();
    });
  }

  loadStored() {
    try {
      return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") };
    } catch {
      return { ...DEFAULTS };
    }
  }

  fill(values) {
    for (const name of Object.keys(DEFAULTS)) {
      this.form.elements[name].value = values[name] ?? "";
    }
    for (const name of SLIDER_FIELDS) {
      this.form.querySelector(`#param-${name}-range`).value = this.form.elements[name].value;
    }
    this.showProblems();
  }

  /** Saves whatever is valid; an invalid field keeps its last valid value in storage. */
  save() {
    const stored = this.loadStored();
    for (const name of Object.keys(DEFAULTS)) {
      if (this.form.elements[name].checkValidity()) stored[name] = this.read(name);
    }
    localStorage.setItem(STORAGE_KEY, JSON.stringify(stored));
    this.showProblems();
  }

  read(name) {
    const raw = this.form.elements[name].value.trim();
    if (raw === "") return name === "seed" || name === "revision" ? null : DEFAULTS[name];
    if (name === "revision") return raw;
    return INTEGER_FIELDS.has(name) ? parseInt(raw, 10) : parseFloat(raw);
  }

  problems() {
    const problems = [];
    for (const name of Object.keys(DEFAULTS)) {
      const input = this.form.elements[name];
      input.setAttribute("aria-invalid", String(!input.checkValidity()));
      if (!input.checkValidity()) {
        const label = this.form.querySelector(`label[for="${input.id}"]`).firstChild.textContent.trim();
        problems.push(`${label}: ${input.validationMessage}`);
      }
    }
    return problems;
  }

  showProblems() {
    this.errorLine.textContent = this.problems().join(" ");
  }

  /** The parameters for the next request, or null (with the problem shown) when one is invalid. */
  values() {
    const problems = this.problems();
    if (problems.length) {
      this.onError(`Fix the parameters first — ${problems.join(" ")}`);
      return null;
    }
    return Object.fromEntries(Object.keys(DEFAULTS).map((name) => [name, this.read(name)]));
  }
}
