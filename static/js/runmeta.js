// The run page's name, tags and notes editors (templates/partials/run_meta.html): the small behaviours htmx
// does not do itself. The forms post to /ui/runs/{id}/meta and are swapped for the server's answer.

/* global htmx */

function renameOpen(open) {
  const box = document.getElementById("meta-name");
  const form = document.getElementById("rename-form");
  if (!box || !form) return;
  box.classList.toggle("editing", open);
  form.hidden = !open;
  if (open) {
    const input = document.getElementById("rename-input");
    input.focus();
    input.select();
  }
}

document.addEventListener("click", (event) => {
  const target = event.target;
  if (target.closest?.("#rename-button")) renameOpen(true);
  else if (target.closest?.(".rename-cancel")) renameOpen(false);
  const remove = target.closest?.(".tag-remove");
  if (remove) {
    // Drop the chip (its hidden input goes with it), then save the list that is left.
    const form = remove.closest("form");
    remove.closest(".tag-chip").remove();
    if (typeof htmx !== "undefined") htmx.trigger(form, "submit");
    else form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && event.target.id === "rename-input") renameOpen(false);
});

// After a rename, the tab's title follows the new name (textContent: the name is user text).
document.body.addEventListener("htmx:afterSettle", () => {
  const name = document.getElementById("run-name")?.textContent;
  if (document.getElementById("rename-error")) document.getElementById("rename-input")?.focus();
  else if (name) document.title = `${name} · gradwatch`;
  if (document.getElementById("tags-error")) document.getElementById("tag-input")?.focus();
});
