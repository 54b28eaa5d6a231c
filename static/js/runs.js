// The runs page: the launch form's small behaviours and compare selection across table refreshes.
//
// htmx replaces the runs table every second; the selection lives here, not in
// the checkboxes, and is put back after each swap.

/* global htmx */
const selected = new Set();

function syncCompare() {
  document.getElementById("compare-runs").value = [...selected].join(",");
  document.getElementById("compare-button").disabled = selected.size === 0;
  for (const box of document.querySelectorAll(".compare-pick")) box.checked = selected.has(box.value);
}

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

document.body.addEventListener("htmx:afterSwap", (event) => {
  if (event.detail.target.id === "runs-table") {
    const present = new Set([...document.querySelectorAll(".compare-pick")].map((b) => b.value));
    for (const id of [...selected]) if (!present.has(id)) selected.delete(id);
    syncCompare();
  }
});

// Mark the chosen preset.
document.addEventListener("click", (event) => {
  const button = event.target.closest?.(".preset");
  if (!button) return;
  for (const b of document.querySelectorAll(".preset")) b.classList.toggle("active", b === button);
});

// The first invalid field gets focus so the user lands on what to fix.
document.body.addEventListener("htmx:afterSettle", (event) => {
  if (event.detail.target.id === "launch-form") {
    document.querySelector('#launch-form [aria-invalid="true"]')?.focus();
  }
});

window.gradwatch = { selected, htmx: typeof htmx !== "undefined" };
