/* One trace as its graph: the nodes in the order they ran with their timings; a node's reads, writes and
 * picture; the final output with the sources' text; the K samples of the same input side by side. */
"use strict";

function showNode(t, i) {
  document.querySelectorAll(".node").forEach((n, j) => n.classList.toggle("sel", j === i));
  const s = i === null ? null : t.spans[i];
  const pic = t.has_image ? `<img class="pic" id="node-picture" alt="picture" src="/api/traces/${t.id}/picture.png${s ? `?node=${encodeURIComponent(s.node)}` : ""}">` : "";
  document.querySelector("#detail").innerHTML = s === null
    ? `<h2>Output</h2><div class="cols"><div>${pic}</div><div>
        <p><b>Answer:</b> <span id="answer">${esc(t.output.answer)}</span></p>
        <h3>Sources</h3><ol id="sources">${t.sources.map((d) => `<li><code>${esc(d.id)}</code> ${esc(d.text ?? "")}</li>`).join("")}</ol>
        <pre>${esc(JSON.stringify(t.output, null, 1))}</pre></div></div>`
    : `<h2 id="node-title">Node ${esc(s.node)}</h2><p class="muted">started at +${fmt(s.start_ms, 0)} ms, ran ${fmt(s.ms, 1)} ms${s.model_id ? ` · ${esc(s.model_id)}` : ""}</p>
       ${s.error ? `<p class="err">${esc(s.error)}</p>` : ""}
       <div class="cols"><div>${pic}</div><div><h3>writes</h3><pre id="node-writes">${esc(JSON.stringify(s.writes, null, 1))}</pre>
       <h3>reads</h3><pre>${esc(JSON.stringify(s.reads, null, 1))}</pre></div></div>`;
}

(async () => {
  try {
    await nav("traces");
    const t = await api(`/api/traces/${encodeURIComponent(params().get("id"))}`);
    const total = Math.max(1, ...t.spans.map((s) => s.start_ms + s.ms));
    document.querySelector("#main").innerHTML = `<h1>Trace <code>${esc(t.id)}</code></h1>
      <p>${esc(t.graph.name)} · <span class="${t.status === "ok" ? "ok" : "err"}">${esc(t.status)}</span>${t.error ? ` <span class="err">${esc(t.error)}</span>` : ""}
      · ${fmt(t.duration_s)} s · group <code>${esc(t.group_id.slice(0, 16))}</code> sample ${t.sample_index}</p>
      <p><b>Question:</b> ${esc(t.question)}</p>
      <div class="graph" id="graph">${t.spans.map((s, i) => `${i ? '<span class="arrow">→</span>' : ""}<div class="node${s.error ? " bad" : ""}" data-i="${i}" id="node-${esc(s.node)}"><b>${esc(s.node)}</b><div class="ms">${fmt(s.ms, 1)} ms</div></div>`).join("")}
        <span class="arrow">→</span><div class="node" data-i="out" id="node-output"><b>output</b></div></div>
      <div class="card">${t.spans.map((s) => `<div class="muted">${esc(s.node)}</div><div class="wf"><span style="left:${100 * s.start_ms / total}%;width:${Math.max(0.5, 100 * s.ms / total)}%"></span></div>`).join("")}</div>
      <div id="detail" class="card"></div>
      <h2>The ${t.samples.length} samples of this input</h2>
      <div class="samples" id="samples">${t.samples.map((s) => `<div class="card"><a href="/trace?id=${s.id}">sample ${s.sample_index}</a> <span class="${s.status === "ok" ? "ok" : "err"}">${esc(s.status)}</span>
        <img class="pic" loading="lazy" alt="sample ${s.sample_index}" src="/api/traces/${s.id}/picture.png"><p>${esc(s.answer ?? "")}</p></div>`).join("")}</div>`;
    document.querySelectorAll(".node").forEach((n) => n.addEventListener("click", () => showNode(t, n.dataset.i === "out" ? null : Number(n.dataset.i))));
    showNode(t, null);
  } catch (e) { showError("#main", e); }
})();
