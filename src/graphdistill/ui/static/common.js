/* Shared by every page: the navigation bar, fetching the JSON API, escaping. */
"use strict";
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmt = (v, d = 2) => (v === null || v === undefined ? "–" : typeof v === "number" ? v.toFixed(d) : esc(v));

async function api(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `${path}: HTTP ${r.status}`);
  return body;
}

function showError(where, err) {
  document.querySelector(where).innerHTML = `<p class="err" id="error">${esc(err.message || err)}</p>`;
}

async function nav(current) {
  const info = await api("/api/info");
  const pages = [["traces", "Traces", true], ["filter", "Filter", info.pages.filter],
    ["fidelity", "Fidelity", info.pages.fidelity], ["try", "Try it", info.pages.try]];
  document.querySelector("nav").innerHTML = `<span class="brand">graphdistill</span>` + pages.map(([p, label, on]) =>
    `<a href="/${p}" id="nav-${p}" class="${p === current ? "on" : ""} ${on ? "" : "off"}" title="${on ? "" : "not given when the UI was started"}">${label}</a>`).join("") +
    `<span class="muted" style="margin-left:auto;color:#8a94a3">${esc(info.store)}</span>`;
  return info;
}

const params = () => new URLSearchParams(location.search);
