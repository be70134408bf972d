/* Traces: the store's traces, a page at a time (LIMIT/OFFSET in SQLite), searchable. */
"use strict";
const PAGE = 50;
let offset = Number(params().get("offset") || 0);

async function load() {
  const q = document.querySelector("#q").value, status = document.querySelector("#status").value;
  const data = await api(`/api/traces?offset=${offset}&limit=${PAGE}&q=${encodeURIComponent(q)}&status=${status}`);
  document.querySelector("#count").textContent =
    data.total ? `${offset + 1}–${offset + data.rows.length} of ${data.total}` : "no trace matches";
  document.querySelector("#prev").disabled = offset === 0;
  document.querySelector("#next").disabled = offset + PAGE >= data.total;
  document.querySelector("#rows").innerHTML = data.rows.map((r) => `
    <tr class="click" data-id="${esc(r.id)}"><td><code>${esc(r.id.slice(0, 12))}</code></td><td>${esc(r.graph_name)}</td>
    <td class="${r.status === "ok" ? "ok" : "err"}">${esc(r.status)}</td><td>${fmt(r.duration_s)} s</td>
    <td><code>${esc(r.group_id.slice(0, 12))}</code></td><td>${r.sample_index}</td><td>${esc(r.question)}</td></tr>`).join("");
  for (const tr of document.querySelectorAll("#rows tr"))
    tr.addEventListener("click", () => (location.href = `/trace?id=${tr.dataset.id}`));
}

(async () => {
  try {
    await nav("traces");
    document.querySelector("#main").innerHTML = `<h1>Traces</h1>
      <div class="bar"><input id="q" placeholder="search id, group, graph or question" size="40">
      <select id="status"><option value="">any status</option><option>ok</option><option>error</option></select>
      <button id="prev">◀ previous</button><button id="next">next ▶</button><span id="count" class="muted"></span></div>
      <table><thead><tr><th>trace</th><th>graph</th><th>status</th><th>duration</th><th>group</th><th>sample</th><th>question</th></tr></thead>
      <tbody id="rows"></tbody></table>`;
    document.querySelector("#q").value = params().get("q") || "";
    let timer = null;
    document.querySelector("#q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { offset = 0; load(); }, 250); });
    document.querySelector("#status").addEventListener("change", () => { offset = 0; load(); });
    document.querySelector("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
    document.querySelector("#next").addEventListener("click", () => { offset += PAGE; load(); });
    await load();
  } catch (e) { showError("#main", e); }
})();
