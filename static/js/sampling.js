// What the telemetry budget (trainer/budget.py) samples, in words: the probe reports each sampled piece's
// interval as ``telemetry/<piece>_every`` (in steps), the budget as ``telemetry/budget`` and the share of step
// time telemetry measured as ``telemetry/share``. A run that reports none of them logs every key every step.

const PIECES = {
  shadow: "the shadow gradient (the other loss's norm and ∂loss/∂h)",
  layers: "per-layer norms",
  hist: "logit histograms",
  latent: "KL Monte Carlo and per-dimension KL",
};
const ALWAYS = {
  gan: "losses, D outputs and the applied gradient norms: every logged step",
  vae: "ELBO terms, active units and gradient norms: every logged step",
};

const percent = (x) => `${(100 * x).toLocaleString("en", { maximumFractionDigits: 1 })} %`;

/** One sentence from the newest ``telemetry/*`` values; "" when there are none. */
export function samplingNote(values, kind) {
  const pieces = Object.keys(PIECES).filter((p) => values[`telemetry/${p}_every`] !== undefined);
  if (!pieces.length) return "";
  const budget = values["telemetry/budget"];
  const share = values["telemetry/share"];
  let head = "Telemetry";
  if (budget !== undefined) head += ` budget ${percent(budget)} of step time`;
  if (share !== undefined) head += ` (measured ${percent(share)})`;
  const every = pieces.map((p) => {
    const n = values[`telemetry/${p}_every`];
    return `${PIECES[p]} ${n === 1 ? "every step" : `every ${n.toLocaleString("en")} steps`}`;
  });
  const always = ALWAYS[kind] ? `; ${ALWAYS[kind]}` : "";
  return `${head}: ${every.join(", ")}${always}.`;
}
