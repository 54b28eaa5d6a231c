// Zoom that shows detail: the one owner of "a line chart's x range changed".
//
// A chart holds a thinned view of a long run (a few thousand points per line, extremes kept), so zooming
// into it alone shows no more than those points. When the user zooms or pans, this asks the server for
// the visible steps at full resolution (GET /api/runs/{id}/metrics?start=&end=, every point when the
// range holds at most HISTORY_POINTS) and puts them in place of the thinned points of that range;
// resetting the zoom (double click, "autoscale") thins the lines back. Live points keep arriving meanwhile.

const SETTLE_MS = 200; // a drag or a scroll fires many range changes: ask once it settles

/**
 * @param {import("./charts.js").LineChart} chart
 * @param {(ids: string[], start: number, end: number) => Promise<object>} fetchRange
 *   resolves to ``{trace id: {step, value}}`` for steps ``start``..``end``
 */
export function zoomDetail(chart, fetchRange) {
  let timer = null;
  let asked = 0; // a late answer for an earlier range is dropped
  chart.el.on("plotly_relayout", (event) => {
    if (event["xaxis.autorange"]) {
      clearTimeout(timer);
      asked += 1;
      chart.rethin();
      return;
    }
    const range = event["xaxis.range"] || [event["xaxis.range[0]"], event["xaxis.range[1]"]];
    if (range[0] === undefined || range[1] === undefined) return; // a change of something else
    const steps = chart.stepsIn(range[0], range[1]); // the axis may be in steps, wall time or seconds since start
    if (steps === null) return;
    const [start, end] = steps;
    if (!(end >= start)) return;
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const mine = ++asked;
      const ids = chart.traceIds();
      if (!ids.length) return;
      try {
        const points = await fetchRange(ids, start, end);
        if (mine === asked) chart.detail(start, end, points);
      } catch (error) {
        console.warn(`zoom detail for steps ${start}..${end}: ${error.message}`);
      }
    }, SETTLE_MS);
  });
}
