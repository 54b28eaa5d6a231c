// The run page's live controls: which of them show, and the generator loss the flip button flips from.
//
// A launched run has every control. A user's script has only those it
// registered (Stop once it checks run.stop_requested; g_loss, lr_g, lr_d with
// the optimisers it handed to watch_gan), and may register more as it runs:
// its `capabilities` frames call showControls again.

/* global htmx */
const $ = (id) => document.getElementById(id);
const FORM_CONTROLS = ["g_loss", "lr_g", "lr_d"];

/** Show only ``controls`` (null or undefined: every control, as for a launched run). */
export function showControls(controls) {
  const allowed = (name) => !Array.isArray(controls) || controls.includes(name);
  for (const el of document.querySelectorAll("[data-control]")) el.hidden = !allowed(el.dataset.control);
  const form = $("control-form");
  if (form) form.hidden = !FORM_CONTROLS.some(allowed);
}

/** Show ``loss`` as the generator loss in force; the flip button offers the other of saturating / non-saturating. */
export function showGLoss(loss) {
  if ($("run-gloss")) {
    $("run-gloss").textContent = loss;
    $("run-gloss").className = `loss-${loss}`; // the loss's colour, as on its chart lines (chartview.js LOSS_VARS)
  }
  const flip = $("flip-button");
  if (flip) {
    const other = loss === "saturating" ? "non_saturating" : "saturating";
    flip.dataset.other = other;
    flip.textContent = `Flip to ${other}`;
    flip.setAttribute("hx-vals", JSON.stringify({ g_loss: other }));
    htmx.process(flip);
  }
}

/**
 * The loss a GAN trains with, read off one step's norms: the applied norm is the norm of the loss in force, the
 * other one is the shadow. null when the step does not tell (a null value, equal norms, or another loss).
 */
export function lossFromNorms(applied, saturating, nonSaturating) {
  if (applied === null || applied === undefined) return null;
  if (applied === saturating && applied !== nonSaturating) return "saturating";
  if (applied === nonSaturating && applied !== saturating) return "non_saturating";
  return null;
}
