// p2pfleet explorer: small hand-written enhancements of server-drawn SVG (no framework).
// Without this script the page says the same; with it, the capacity chart shows the values
// under the pointer and hardware classes can be switched off and on.
(function () {
  "use strict";
  function fmtTime(t) {
    var d = new Date(t * 1000);
    return d.toLocaleTimeString() + " (" + d.toISOString().replace(/\.\d+Z$/, "Z") + ")";
  }
  function text(s) { return document.createTextNode(String(s)); }

  function enhanceChart(svg) {
    var points;
    try { points = JSON.parse(svg.getAttribute("data-points")); } catch (e) { return; }
    if (!points || !points.length) { return; }
    var pad = svg.getAttribute("data-pad").split(",").map(Number);
    var watts = Number(svg.getAttribute("data-watts"));
    var box = svg.viewBox.baseVal;
    var t0 = points[0].t, t1 = points[points.length - 1].t, span = (t1 - t0) || 1;
    var readout = document.getElementById("chart-readout");
    var hidden = {};
    var ns = "http://www.w3.org/2000/svg";
    var cursor = document.createElementNS(ns, "line");
    cursor.setAttribute("y1", pad[2]);
    cursor.setAttribute("y2", box.height - pad[3]);
    cursor.setAttribute("stroke", "#555");
    cursor.setAttribute("stroke-dasharray", "2,2");
    cursor.setAttribute("visibility", "hidden");
    cursor.setAttribute("id", "chart-cursor");
    svg.appendChild(cursor);

    function show(clientX) {
      var r = svg.getBoundingClientRect();
      var x = (clientX - r.left) / r.width * box.width;
      var t = t0 + (x - pad[0]) / (box.width - pad[0] - pad[1]) * span;
      var best = points[0];
      points.forEach(function (p) { if (Math.abs(p.t - t) < Math.abs(best.t - t)) { best = p; } });
      var cx = pad[0] + (best.t - t0) / span * (box.width - pad[0] - pad[1]);
      cursor.setAttribute("x1", cx);
      cursor.setAttribute("x2", cx);
      cursor.setAttribute("visibility", "visible");
      var parts = [fmtTime(best.t) + ": available " + best.available + " samples/s, used " +
                   best.used + " samples/s"];
      Object.keys(best.by_class || {}).sort().forEach(function (hw) {
        if (hidden[hw]) { return; }
        var c = best.by_class[hw];
        parts.push("class " + hw + ": " + c.available + " available (~" +
                   (c.available_nodes * watts / 1000) + " kW), " + c.used + " used (~" +
                   (c.used_nodes * watts / 1000) + " kW)");
      });
      readout.textContent = "";
      readout.appendChild(text(parts.join("; ")));
    }
    svg.addEventListener("mousemove", function (ev) { show(ev.clientX); });
    svg.addEventListener("touchstart", function (ev) { show(ev.touches[0].clientX); },
                         {passive: true});
    svg.addEventListener("mouseleave", function () { cursor.setAttribute("visibility", "hidden"); });

    var legend = document.getElementById("capacity-legend");
    if (!legend) { return; }
    Array.prototype.forEach.call(legend.querySelectorAll("label.series-key"), function (label) {
      var key = label.getAttribute("data-series");
      var box = document.createElement("input");
      box.type = "checkbox";
      box.checked = true;
      box.className = "series-toggle";
      box.setAttribute("aria-label", "show " + key);
      label.insertBefore(box, label.firstChild);
      box.addEventListener("change", function () {
        hidden[key] = !box.checked;
        Array.prototype.forEach.call(svg.querySelectorAll("g[data-series]"), function (g) {
          var s = g.getAttribute("data-series");
          if (s === key || s.split(":")[0] === key) {
            g.style.display = box.checked ? "" : "none";
          }
        });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var svg = document.getElementById("capacity-chart");
    if (svg) { enhanceChart(svg); }
  });
})();
