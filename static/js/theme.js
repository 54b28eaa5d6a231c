// Light / dark switch; charts listen for "gradwatch:theme" and recolour themselves.
const button = document.getElementById("theme-toggle");
button?.addEventListener("click", () => {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  localStorage.setItem("gradwatch-theme", next);
  window.dispatchEvent(new CustomEvent("gradwatch:theme"));
});
