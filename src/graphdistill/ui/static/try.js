/* Try it: the student runs in this page (runner.js on onnxruntime-web's WASM backend, from the bundle the
 * server was started with); the server only draws the result, with the same drawing as everywhere else. */
"use strict";
let runner = null;

async function fileBase64(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function run() {
  const file = document.querySelector("#photo").files[0];
  const question = document.querySelector("#question").value.trim();
  const status = document.querySelector("#status");
  if (!file || !question) { status.textContent = "choose a photo and ask a question"; return; }
  status.textContent = "running…";
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const img = GraphdistillRunner.rgbOf(bitmap);
  const depth = document.querySelector("#depth");
  const { result, ms } = await runner.predict(img, question, depth ? Number(depth.value) : undefined);
  document.querySelector("#ms").textContent = ms.toFixed(0);
  status.textContent = "done";
  const text = Object.entries(runner.outputs).find(([, k]) => k === "text");
  const srcs = Object.entries(runner.outputs).find(([, k]) => k === "sources");
  const docs = new Map(runner.manifest.documents.map((d) => [d.id, d.text]));
  document.querySelector("#answer").textContent = text ? result[text[0]] : "";
  document.querySelector("#sources").innerHTML = srcs ? result[srcs[0]].map((s) => `<li><code>${esc(s)}</code> ${esc(docs.get(s) ?? "")}</li>`).join("") : "";
  document.querySelector("#result-json").textContent = JSON.stringify(result, (k, v) => (k === "counts" ? `${v.length} runs` : v), 1);
  window.graphdistillResult = { result, ms, depth: depth ? Number(depth.value) : 1 };
  const r = await fetch("/api/draw", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image: await fileBase64(file), output: { answer: text ? result[text[0]] : undefined, objects: result.objects || [], sources: srcs ? result[srcs[0]] : undefined } }) });
  if (!r.ok) throw new Error((await r.json()).error);
  document.querySelector("#picture").src = URL.createObjectURL(await r.blob());
  document.body.dataset.ran = String(Number(document.body.dataset.ran || 0) + 1);
}

(async () => {
  try {
    const info = await nav("try");
    if (!info.bundle) throw new Error("no bundle given: start graphdistill ui with --bundle BUNDLE (an ONNX bundle)");
    if (info.runtime_missing.length || typeof ort === "undefined")
      throw new Error(`onnxruntime-web is not vendored (missing ${info.runtime_missing.join(", ")}): run make ui-assets`);
    document.querySelector("#main").innerHTML = `<h1>Try the student</h1>
      <p class="muted">The ${esc(info.bundle_quantize)} ONNX bundle <code>${esc(info.bundle)}</code> runs in this page (onnxruntime-web, WASM, one thread); the photo goes to this local server only to have the result drawn on it.</p>
      <div class="bar"><input type="file" id="photo" accept="image/*"><input id="question" size="50" value="What is in the picture?">
      <button id="run" disabled>Run</button><span id="status" class="muted">loading the model…</span></div>
      <div class="cols"><div><img class="pic" id="picture" alt=""></div>
      <div><p><b>Answer:</b> <span id="answer"></span></p><p><b><span id="ms">–</span> ms</b> per query, in the browser</p>
      <h3>Sources</h3><ol id="sources"></ol><pre id="result-json"></pre></div></div>`;
    ort.env.wasm.wasmPaths = "/static/vendor/ort/";
    ort.env.wasm.numThreads = 1;
    runner = await GraphdistillRunner.StudentRunner.load("/bundle", ort);
    if (runner.depthMax > 1) {  // the app's knob: iterations of the recurrent block, the bundle's default first
      const options = Array.from({ length: runner.depthMax }, (_, i) => i + 1)
        .map((r) => `<option value="${r}"${r === runner.depthDefault ? " selected" : ""}>${r}</option>`).join("");
      document.querySelector("#run").insertAdjacentHTML("beforebegin", `<label>depth <select id="depth">${options}</select></label>`);
    }
    if (runner.tta.length)
      document.querySelector(".bar").insertAdjacentHTML("afterend", `<p class="muted" id="tta-note">This bundle's manifest asks for test-time views (${esc(runner.tta.join(", "))}); this page answers the photo alone, as <code>graphdistill run-bundle --tta none</code> does.</p>`);
    document.querySelector("#status").textContent = "ready";
    document.body.dataset.ready = "1";
    const button = document.querySelector("#run");
    button.disabled = false;
    button.addEventListener("click", () => run().catch((e) => showError("#status", e)));
  } catch (e) { showError("#main", e); }
})();
