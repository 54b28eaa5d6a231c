// Which metric keys SPEC §2 plans for, and which model family each belongs to.
//
// A built-in run reports only these; a user's script may log anything besides
// ("val/acc", "my/metric", "epoch"). Pages give the planned keys their panels
// and everything else a generic chart (extra.js), grouped by prefix.

const GAN = new Set(["loss/d", "loss/d_real", "loss/d_fake", "loss/g", "d/real_prob", "d/fake_prob", "d/real_logit",
  "d/fake_logit", "grad/d_norm", "grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating",
  "dldh/saturating", "dldh/non_saturating"]);
const GAN_PREFIXES = ["grad/g_layer/", "grad/d_layer/"];
const VAE = new Set(["loss/elbo", "loss/recon", "loss/kl", "kl/mc", "vae/active_units", "grad/enc_norm", "grad/dec_norm"]);
const VAE_PREFIXES = ["kl/dim/"];
const EVAL = new Set(["eval/modes", "eval/hq_frac", "eval/rev_kl", "eval/classes", "eval/fd", "eval/precision",
  "eval/recall", "eval/density", "eval/coverage", "eval/active_units"]);

/**
 * "gan", "vae" or "eval" for a SPEC §2 key, "telemetry" for a probe's own note on how often it samples
 * (``telemetry/shadow_every``…: explained in words, never charted); null for a key SPEC §2 does not name.
 */
export function specFamily(key) {
  if (key.startsWith("telemetry/")) return "telemetry";
  if (GAN.has(key) || GAN_PREFIXES.some((p) => key.startsWith(p))) return "gan";
  if (VAE.has(key) || VAE_PREFIXES.some((p) => key.startsWith(p))) return "vae";
  if (EVAL.has(key)) return "eval";
  return null;
}

/** Whether a run of ``kind`` ("gan", "vae", "custom") has a built-in place for ``key``. */
export function planned(key, kind) {
  const family = specFamily(key);
  if (family === null || kind === "custom") return false;
  return family === kind || family === "eval";
}

/** The generic chart a key goes to: its prefix ("val" for "val/acc"), or "other" for a key without one. */
export function groupOf(key) {
  const slash = key.indexOf("/");
  return slash > 0 ? key.slice(0, slash) : "other";
}
