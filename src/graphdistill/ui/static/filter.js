/* Filter: kept and dropped by rule, each dropped group with its reason. */
"use strict";
const PAGE = 50;
let offset = 0;

async function load() {
  const rule = document.querySelector("#rule").value, kept = document.querySelector("#kept").value;
  const d = await api(`/api/filter?offset=${offset}&limit=${PAGE}&rule=${encodeURIComponent(rule)}&kept=${kept}`);
  document.querySelector("#count").textContent = d.total ? `${offset + 1}–${offset + d.rows.length} of ${d.total}` : "none";
  document.querySelector("#prev").disabled = offset === 0;
  document.querySelector("#next").disabled = offset + PAGE >= d.total;
  document.querySelector("#rows").innerHTML = d.rows.map((r) => `<tr class="${r.trace ? "click" : ""}" data-trace="${esc(r.trace ?? "")}">
    <td><code>${esc(r.group_id.slice(0, 12))}</code></td><td><span class="tag ${r.kept ? "" : "drop"}">${r.kept ? "kept" : "dropped"}</span></td>
    <td>${esc(r.split ?? "")}</td><td>${esc(r.rule ?? "")}</td><td class="reason">${esc(r.reason ?? "")}</td><td>${esc(r.question ?? "")}</td><td>${esc(r.answer ?? "")}</td></tr>`).join("");
  for (const tr of document.querySelectorAll("#rows tr.click")) tr.addEventListener("click", () => (location.href = `/trace?id=${tr.dataset.trace}`));
}

(async () => {
  try {
    await nav("filter");
    const d = await api(`/api/filter?limit=0`);
    const s = d.summary;
    document.querySelector("#main").innerHTML = `<h1>Filter</h1>
      <p><b id="n-kept">${d.kept}</b> kept, <b id="n-dropped">${d.dropped}</b> dropped of ${d.kept + d.dropped} inputs${s.splits ? ` · splits ${esc(Object.entries(s.splits).map(([k, v]) => `${k} ${v}`).join(", "))}` : ""}.</p>
      ${d.recorded ? "" : `<p class="muted">This dataset's filter did not record each group's reason (report/decisions.jsonl): kept groups are the dataset's rows, dropped ones the store's other groups.</p>`}
      <div class="cols"><div><h2>Dropped, by the first rule each failed</h2><table id="by-rule"><tr><th>rule</th><th>dropped</th></tr>
      ${Object.entries(s.by_rule || {}).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("") || "<tr><td colspan=2>none</td></tr>"}</table></div>
      <div><h2>Flagged, by every rule</h2><table><tr><th>rule</th><th>inputs</th></tr>
      ${Object.entries(s.flagged_by_rule || {}).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("") || "<tr><td colspan=2>none</td></tr>"}</table></div></div>
      <h2>Decisions</h2><div class="bar"><select id="kept"><option value="">kept and dropped</option><option value="false" selected>dropped</option><option value="true">kept</option></select>
      <select id="rule"><option value="">any rule</option>${d.rules.map((r) => `<option>${esc(r)}</option>`).join("")}</select>
      <button id="prev">◀</button><button id="next">▶</button><span id="count" class="muted"></span></div>
      <table><thead><tr><th>group</th><th></th><th>split</th><th>rule</th><th>reason</th><th>question</th><th>answer</th></tr></thead><tbody id="rows"></tbody></table>`;
    for (const id of ["#kept", "#rule"]) document.querySelector(id).addEventListener("change", () => { offset = 0; load(); });
    document.querySelector("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
    document.querySelector("#next").addEventListener("click", () => { offset += PAGE; load(); });
    await load();
  } catch (e) { showError("#main", e); }
})();
