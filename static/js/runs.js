// The runs page: the launch form's small behaviours, the runs table's filters and pages, compare selection, sweep
// groups, and the table's live reloads.
//
// The table's state (search, filters, page, grouping) is the page's URL query: the filter form and the page links
// change the URL, and the table partial is fetched for it (GET /ui/runs-table?<same query>). Nothing polls: the
// server pushes a "runs" event (GET /api/runs/changes, server-sent events) whenever a run is created, changes status,
// advances, is renamed or tagged, or is deleted, and the table is fetched again for the current URL. The compare
// selection lives here, not in the checkboxes, so it survives every swap and every page.

/* global htmx */
const selected = new Set();
const collapsed = new Set(JSON.parse(sessionStorage.getItem("gradwatch-collapsed-sweeps") || "[]"));
const DEFAULTS = { page: "1", per: "50", group: "1" };

function syncCompare() {
  document.getElementById("compare-runs").value = [...selected].join(",");
  const button = document.getElementById("compare-button");
  button.disabled = selected.size === 0;
  button.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
  for (const box of document.querySelectorAll(".compare-pick")) box.checked = selected.has(box.value);
}

function syncSweeps() {
  for (const body of document.querySelectorAll("#runs-table tbody.sweep")) {
    const closed = collapsed.has(body.dataset.sweep);
    body.classList.toggle("collapsed", closed);
    body.querySelector(".sweep-toggle")?.setAttribute("aria-expanded", String(!closed));
  }
}

/** The filter form's state as a query string, defaults left out (so the plain runs page stays "/"). */
function formQuery(form) {
  const params = new URLSearchParams();
  const data = new FormData(form);
  for (const name of ["q", "status", "kind", "tag", "sweep", "per"]) {
    const value = (data.get(name) || "").trim();
    if (value && value !== DEFAULTS[name]) params.set(name, value);
  }
  if (!document.getElementById("filter-group").checked) params.set("group", "0");
  return params;
}

/** Put the URL's state into the form (after back/forward). */
function fillForm(params) {
  const form = document.getElementById("runs-filter");
  for (const name of ["q", "tag"]) form.elements[name].value = params.get(name) || "";
  for (const name of ["status", "kind"]) form.elements[name].value = params.get(name) || "";
  form.elements.per.value = params.get("per") || DEFAULTS.per;
  document.getElementById("filter-group").checked = params.get("group") !== "0";
}

let loading = false;
let again = false;

/** Fetch the table for the URL's query; a reload asked for while one is in flight runs once it is done. */
function loadTable() {
  if (typeof htmx === "undefined") return;
  if (loading) {
    again = true;
    return;
  }
  loading = true;
  const query = new URLSearchParams(location.search);
  query.delete("preset"); // the launch form's, not the table's
  const qs = query.toString();
  htmx.ajax("GET", `/ui/runs-table${qs ? `?${qs}` : ""}`, { target: "#runs-table", swap: "innerHTML" })
    .finally(() => {
      loading = false;
      if (again) {
        again = false;
        loadTable();
      }
    });
}

function navigate(params, push) {
  const qs = params.toString();
  const url = `${location.pathname}${qs ? `?${qs}` : ""}`;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
  loadTable();
}

const filterForm = document.getElementById("runs-filter");
let typing = null;
filterForm.addEventListener("submit", (event) => {
  event.preventDefault();
  navigate(formQuery(filterForm), true);
});
filterForm.addEventListener("input", (event) => {
  if (event.target.name !== "q" && event.target.name !== "tag") return;
  clearTimeout(typing);
  typing = setTimeout(() => navigate(formQuery(filterForm), false), 250); // a new page 1 as the user types
});
filterForm.addEventListener("change", (event) => {
  if (event.target.name === "q" || event.target.name === "tag") return; // the input handler has it
  navigate(formQuery(filterForm), true);
});
window.addEventListener("popstate", () => {
  fillForm(new URLSearchParams(location.search));
  loadTable();
});

document.addEventListener("click", (event) => {
  // Page links, tag chips, "only this sweep": same-page links that change the table's query.
  const link = event.target.closest?.("#runs-table a.filter-link, #runs-table a.clear-filters");
  if (link && !event.ctrlKey && !event.metaKey && !event.shiftKey && event.button === 0) {
    event.preventDefault();
    const params = new URL(link.href).searchParams;
    fillForm(params);
    const sweep = params.get("sweep") || "";
    let hidden = document.getElementById("filter-sweep");
    if (sweep && !hidden) {
      hidden = Object.assign(document.createElement("input"), { type: "hidden", name: "sweep", id: "filter-sweep" });
      filterForm.append(hidden);
    }
    if (hidden) hidden.value = sweep;
    navigate(params, true);
    return;
  }
  const toggle = event.target.closest?.(".sweep-toggle");
  if (toggle) {
    const id = toggle.dataset.sweep;
    if (collapsed.has(id)) collapsed.delete(id);
    else collapsed.add(id);
    sessionStorage.setItem("gradwatch-collapsed-sweeps", JSON.stringify([...collapsed]));
    syncSweeps();
    return;
  }
  // Mark the chosen preset.
  const button = event.target.closest?.(".preset");
  if (button) for (const b of document.querySelectorAll(".preset")) b.classList.toggle("active", b === button);
});

document.addEventListener("change", (event) => {
  const target = event.target;
  if (target.classList?.contains("compare-pick")) {
    if (target.checked) selected.add(target.value);
    else selected.delete(target.value);
    syncCompare();
  }
  // Show the GAN or the VAE section as the kind changes.
  if (target.name === "kind" && target.form?.id === "launch-form") target.form.dataset.kind = target.value;
});

// A run deleted from the table (confirmed, and done) leaves the selection.
document.body.addEventListener("htmx:afterRequest", (event) => {
  const button = event.detail.elt;
  if (event.detail.successful && button?.matches?.("button[hx-delete^='/ui/table/runs/']")) {
    selected.delete(button.closest("tr[data-run]")?.dataset.run);
    syncCompare();
  }
});

document.body.addEventListener("htmx:afterSwap", (event) => {
  if (event.detail.target.id === "runs-table") {
    syncCompare();
    syncSweeps();
  }
});

// The first invalid field gets focus so the user lands on what to fix.
document.body.addEventListener("htmx:afterSettle", (event) => {
  if (event.detail.target.id === "launch-form") {
    document.querySelector('#launch-form [aria-invalid="true"]')?.focus();
  }
});

// Pushed changes. EventSource reconnects by itself after a drop (the server says "retry: 2000"); every (re)connect
// starts with a "hello", after which the table is fetched once, for whatever changed while the stream was down
// (or, the first time, since the server drew the page).
const table = document.getElementById("runs-table");
const changes = new EventSource("/api/runs/changes");
changes.addEventListener("hello", (event) => {
  // The first hello after a load says whether anything changed since the server drew the page.
  const { version } = JSON.parse(event.data);
  if (String(version) !== table.dataset.version) loadTable();
  table.dataset.version = "";
});
changes.addEventListener("runs", () => loadTable());
window.addEventListener("pagehide", () => changes.close());

syncCompare();
syncSweeps();
window.gradwatch = { selected, collapsed, loadTable, changes, htmx: typeof htmx !== "undefined" };
