// vantage dashboard: draws the latency chart of a target page with uPlot from the page's JSON
// data block (#chart-data). No inline script anywhere, no eval: the Content-Security-Policy
// allows scripts from this server only. The chart is kept on window.vantageCharts (the browser
// tests read what was drawn) and the time it took on <body data-chart-rendered-ms>.
(function () {
  "use strict";
  var el = document.getElementById("chart-data");
  var box = document.getElementById("latency-chart");
  if (!el || !box || typeof uPlot === "undefined") return;
  var d = JSON.parse(el.textContent);
  var lat = d.latency;
  var palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#7f7f7f"];
  var series = [{ label: "time" }];
  var data = [lat.buckets];
  lat.series.forEach(function (s, i) {
    var colour = palette[i % palette.length];
    series.push({ label: s.region + " p50", stroke: colour, width: 1, dash: [4, 4],
                  spanGaps: false, value: function (u, v) { return v == null ? "–" : v.toFixed(1) + " ms"; } });
    data.push(s.p50_ms);
    series.push({ label: s.region + " p95", stroke: colour, width: 2,
                  spanGaps: false, value: function (u, v) { return v == null ? "–" : v.toFixed(1) + " ms"; } });
    data.push(s.p95_ms);
  });
  var width = Math.max(320, Math.min(1100, box.clientWidth || 900));
  var opts = {
    width: width,
    height: 300,
    series: series,
    scales: { x: { time: true, range: function () { return [d.from, d.to]; } }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
    axes: [{}, { label: "ms", size: 60 }],
    legend: { live: true },
  };
  var chart = new uPlot(opts, data, box);
  window.vantageCharts = { latency: chart };
  document.body.setAttribute("data-chart-rendered-ms", performance.now().toFixed(1));
})();
