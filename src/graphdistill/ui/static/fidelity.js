/* Fidelity: the held-out rows, teacher and student side by side, sortable by each row's scores. */
"use strict";
const COLS = [["disagreement", "disagreement"], ["answer_f1", "answer F1"], ["objects_f1", "objects F1"], ["mask_miou", "mask mIoU"], ["sources_recall", "sources recall"]];
let sort = "disagreement", order = "desc";

async function showRow(id) {
  const box = document.querySelector("#pair");
  box.innerHTML = `<p class="muted">running the student on this row…</p>`;
  const p = await api(`/api/fidelity/${encodeURIComponent(id)}`);
  const side = (who, o) => `<div><h3>${who}</h3><p><b>Answer:</b> <span class="answer-${who}">${esc(o.answer)}</span></p>
    <ol>${(o.sources || []).map((s) => `<li><code>${esc(s)}</code> ${esc(p.documents[s] ?? "")}</li>`).join("")}</ol>
    <p class="muted">${(o.objects || []).map((b) => `${esc(b.label)} ${fmt(b.score)}`).join(", ") || "no objects"}</p></div>`;
  box.innerHTML = `<h2>${esc(p.question)}</h2><img class="pic" id="pair-picture" alt="teacher and student" src="/api/fidelity/${encodeURIComponent(id)}/picture.png">
    <div class="cols">${side("teacher", p.teacher)}${side("student", p.student)}</div>`;
}

async function load() {
  const d = await api(`/api/fidelity?sort=${sort}&order=${order}`);
  document.querySelector("#head").innerHTML = `<p>${d.n} ${esc(d.split)} rows of <code>${esc(d.run)}</code>; student: ${esc(d.student)}.
    ${Object.entries(d.fidelity).filter(([k, v]) => typeof v === "number" && k !== "n" && !k.endsWith("_threshold")).map(([k, v]) => `${esc(k)} <b>${fmt(v)}</b>`).join(" · ")}</p>`;
  document.querySelector("#thead").innerHTML = `<th>question</th><th>teacher</th><th>student</th>` +
    COLS.map(([k, label]) => `<th class="sort" data-k="${k}" id="sort-${k}">${label}${k === sort ? (order === "desc" ? " ▼" : " ▲") : ""}</th>`).join("");
  document.querySelectorAll("th.sort").forEach((th) => th.addEventListener("click", () => {
    order = th.dataset.k === sort && order === "desc" ? "asc" : "desc"; sort = th.dataset.k; load();
  }));
  document.querySelector("#rows").innerHTML = d.rows.map((r) => `<tr class="click" data-id="${esc(r.id)}"><td>${esc(r.question)}</td>
    <td>${esc(r.teacher_answer)}</td><td>${esc(r.student_answer)}</td>${COLS.map(([k]) => `<td class="${k}">${fmt(r[k])}</td>`).join("")}</tr>`).join("");
  document.querySelectorAll("#rows tr").forEach((tr) => tr.addEventListener("click", () => showRow(tr.dataset.id).catch((e) => showError("#pair", e))));
}

(async () => {
  try {
    await nav("fidelity");
    document.querySelector("#main").innerHTML = `<h1>Fidelity</h1><div id="head"></div><div id="pair" class="card muted">click a row to see teacher and student side by side</div>
      <table><thead><tr id="thead"></tr></thead><tbody id="rows"></tbody></table>`;
    await load();
  } catch (e) { showError("#main", e); }
})();
