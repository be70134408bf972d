/* The reference runner (graphdistill.runner) in the browser: one ONNX bundle, one query at a time.
 *
 * The same steps as src/graphdistill/runner/bundle.py, in the same order, so the answer, the objects and
 * the sources equal `graphdistill run-bundle`'s on the same photo:
 *   preprocess  letterbox with Pillow's own resize (Image.reduce by the reducing_gap factor, then the
 *               bilinear convolution in 8-bit fixed point), top-left on a pad_value canvas, (p/255-mean)/std
 *               in float32, NCHW                                                   (runner/preprocess.py)
 *   question    byte-level BPE from the bundle's tokenizer.json, truncated/padded to max_question_len
 *                                                                                  (runner/bpe.py)
 *   encode      once (then deepen depth - 1 times, for a bundle with recurrent depth); then decode_step one
 *               token at a time with the runner-owned kv_cache, greedy with the no-repeat n-gram and
 *               max-token-run rules                                                (BundleRunner.run_models)
 *   decode      objects whose keep is true by descending score, boxes back to image pixels, masks pasted
 *               inside their box as COCO RLE; the sources_k best documents          (BundleRunner.decode)
 * Not here: test-time augmentation (BundleRunner step 9). A bundle whose manifest asks for views is answered on
 * the photo alone (`tta` says which views it skips), as `run-bundle --tta none` answers it.
 * The pure functions are exported for Node too (module.exports); the runtime is onnxruntime-web's global
 * `ort` (WASM, vendored next to this file, never from a CDN).
 */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.GraphdistillRunner = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  // ------------------------------------------------------------------------------------------------------
  // Byte-level BPE (runner/bpe.py)
  // ------------------------------------------------------------------------------------------------------

  function bytesToUnicode() {
    const keep = new Set();
    for (let b = 0x21; b <= 0x7e; b++) keep.add(b);
    for (let b = 0xa1; b <= 0xac; b++) keep.add(b);
    for (let b = 0xae; b <= 0xff; b++) keep.add(b);
    const table = new Array(256);
    let shift = 0;
    for (let b = 0; b < 256; b++) table[b] = keep.has(b) ? String.fromCharCode(b) : String.fromCharCode(256 + shift++);
    return table;
  }

  // Unicode White_Space, as bpe._WHITESPACE (JavaScript's \s differs: it has U+FEFF and lacks U+0085)
  const WS = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
  // the GPT-2 rule of bpe.split_words
  const SPLIT = new RegExp(
    `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`,
    "gu"
  );

  function splitWords(text) {
    return text.match(SPLIT) || [];
  }

  function escapeRegExp(s) {
    return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  }

  class ByteLevelBPE {
    constructor(config) {
      const model = config.model || {};
      if (model.type !== "BPE") throw new Error(`tokenizer model must be BPE, got ${model.type}`);
      if (config.normalizer) throw new Error(`tokenizer normalizer ${config.normalizer.type} not supported`);
      const pre = config.pre_tokenizer || {};
      if (pre.type !== "ByteLevel") throw new Error(`pre_tokenizer must be ByteLevel, got ${pre.type}`);
      this.addPrefixSpace = Boolean(pre.add_prefix_space);
      this.useRegex = pre.use_regex === undefined ? true : Boolean(pre.use_regex);
      this.ignoreMerges = Boolean(model.ignore_merges);
      this.vocab = new Map(Object.entries(model.vocab));
      this.unkToken = model.unk_token ?? null;
      this.ranks = new Map();
      model.merges.forEach((m, r) => {
        const [a, b] = typeof m === "string" ? [m.slice(0, m.indexOf(" ")), m.slice(m.indexOf(" ") + 1)] : m;
        const key = a + "\u0000" + b;
        if (!this.ranks.has(key)) this.ranks.set(key, r);
      });
      this.added = new Map((config.added_tokens || []).map((t) => [t.content, Number(t.id)]));
      this.specialIds = new Set((config.added_tokens || []).filter((t) => t.special).map((t) => Number(t.id)));
      this.idToToken = new Map();
      for (const [t, i] of this.vocab) this.idToToken.set(Number(i), t);
      for (const [t, i] of this.added) this.idToToken.set(i, t);
      this.byteEncoder = bytesToUnicode();
      this.byteDecoder = new Map(this.byteEncoder.map((c, b) => [c, b]));
      const byLength = [...this.added.keys()].filter((t) => t).sort((x, y) => y.length - x.length);
      this.addedRe = byLength.length ? new RegExp(byLength.map(escapeRegExp).join("|"), "g") : null;
      this.cache = new Map();
    }

    encode(text) {
      const ids = [];
      for (const [piece0, isAdded] of this.splitAdded(text)) {
        if (isAdded) {
          ids.push(this.added.get(piece0));
          continue;
        }
        const piece = this.addPrefixSpace && !piece0.startsWith(" ") ? " " + piece0 : piece0;
        for (const word of this.useRegex ? splitWords(piece) : [piece]) ids.push(...this.encodeWord(word));
      }
      return ids;
    }

    *splitAdded(text) {
      let start = 0;
      if (this.addedRe) {
        this.addedRe.lastIndex = 0;
        for (const hit of text.matchAll(this.addedRe)) {
          if (hit.index > start) yield [text.slice(start, hit.index), false];
          yield [hit[0], true];
          start = hit.index + hit[0].length;
        }
      }
      if (start < text.length) yield [text.slice(start), false];
    }

    encodeWord(word) {
      if (this.cache.has(word)) return this.cache.get(word);
      let symbols = [...new TextEncoder().encode(word)].map((b) => this.byteEncoder[b]);
      const joined = symbols.join("");
      symbols = this.ignoreMerges && this.vocab.has(joined) ? [joined] : this.merge(symbols);
      const ids = [];
      for (const s of symbols) {
        if (this.vocab.has(s)) ids.push(Number(this.vocab.get(s)));
        else if (this.unkToken !== null && this.vocab.has(this.unkToken)) ids.push(Number(this.vocab.get(this.unkToken)));
      }
      this.cache.set(word, ids);
      return ids;
    }

    merge(symbols) {
      while (symbols.length > 1) {
        let best = null;
        for (let k = 0; k + 1 < symbols.length; k++) {
          const r = this.ranks.get(symbols[k] + "\u0000" + symbols[k + 1]);
          if (r !== undefined && (best === null || r < best[0])) best = [r, symbols[k], symbols[k + 1]];
        }
        if (best === null) break;
        const [, first, second] = best;
        const merged = [];
        for (let k = 0; k < symbols.length; ) {
          if (k + 1 < symbols.length && symbols[k] === first && symbols[k + 1] === second) {
            merged.push(first + second);
            k += 2;
          } else merged.push(symbols[k++]);
        }
        symbols = merged;
      }
      return symbols;
    }

    decode(ids, skipSpecialTokens = true) {
      const dec = new TextDecoder("utf-8"); // bad sequences become U+FFFD, as Python's errors="replace"
      let out = "";
      let buf = [];
      for (const i of ids) {
        if (skipSpecialTokens && this.specialIds.has(i)) continue;
        const token = this.idToToken.get(i);
        if (token === undefined) continue;
        if (this.added.has(token)) {
          out += dec.decode(new Uint8Array(buf)) + token;
          buf = [];
          continue;
        }
        for (const c of token) if (this.byteDecoder.has(c)) buf.push(this.byteDecoder.get(c));
      }
      return out + dec.decode(new Uint8Array(buf));
    }
  }

  // ------------------------------------------------------------------------------------------------------
  // Pillow's resize, exactly (Image.resize with reducing_gap: Reduce.c, then Resample.c's 8-bit path)
  // ------------------------------------------------------------------------------------------------------

  // An RGB image: {width, height, data: Uint8Array of width*height*3}
  const PRECISION_BITS = 32 - 8 - 2;
  const FILTERS = {
    bilinear: { support: 1.0, f: (x) => (x < 0 ? -x : x) < 1 ? 1 - (x < 0 ? -x : x) : 0 },
  };

  function divisionUint32(divider) {
    // (UINT32)((float)2^32 / (float)(256 * divider)), the division in float32
    return Math.floor(Math.fround(4294967296 / Math.fround(256 * divider)));
  }

  // Image.reduce((fx, fy)) over the whole image: each output pixel the rounded mean of its fx×fy block;
  // blocks cut by the right or bottom edge average the pixels they have
  function reduce(img, fx, fy) {
    const { width: W, height: H, data } = img;
    const ow = Math.ceil(W / fx), oh = Math.ceil(H / fy);
    const out = new Uint8Array(ow * oh * 3);
    for (let y = 0; y < oh; y++) {
      const y0 = y * fy, y1 = Math.min(H, y0 + fy);
      for (let x = 0; x < ow; x++) {
        const x0 = x * fx, x1 = Math.min(W, x0 + fx);
        const n = (y1 - y0) * (x1 - x0);
        const mult = divisionUint32(n), amend = Math.floor(n / 2);
        for (let c = 0; c < 3; c++) {
          let ss = amend;
          for (let yy = y0; yy < y1; yy++) for (let xx = x0; xx < x1; xx++) ss += data[(yy * W + xx) * 3 + c];
          out[(y * ow + x) * 3 + c] = Math.floor((ss * mult) / 16777216);
        }
      }
    }
    return { width: ow, height: oh, data: out };
  }

  // Resample.c precompute_coeffs + normalize_coeffs_8bpc: per output pixel its first input pixel, how many,
  // and the fixed-point weights
  function coeffs(inSize, in0, in1, outSize, filter) {
    const scale = Math.fround(in1 - in0) / outSize;
    const filterscale = scale < 1.0 ? 1.0 : scale;
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = in0 + (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) {
        const w = filter.f((x + xmin - center + 0.5) * ss);
        kk[xx * ksize + x] = w;
        ww += w;
      }
      for (let x = 0; x < xmax; x++) if (ww !== 0.0) kk[xx * ksize + x] /= ww;
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    const fixed = new Float64Array(kk.length);
    for (let i = 0; i < kk.length; i++) {
      const v = kk[i] * (1 << PRECISION_BITS);
      fixed[i] = kk[i] < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
    }
    return { ksize, bounds, kk: fixed };
  }

  function clip8(ss) {
    if (ss >= 1 << (PRECISION_BITS + 8)) return 255;
    if (ss <= 0) return 0;
    return Math.floor(ss / (1 << PRECISION_BITS));
  }

  // ImagingResampleInner: the horizontal pass over the rows the vertical pass reads, then the vertical pass
  function resample(img, outW, outH, box, filter) {
    const needH = outW !== img.width || box[0] !== 0 || box[2] !== outW;
    const needV = outH !== img.height || box[1] !== 0 || box[3] !== outH;
    const hz = coeffs(img.width, box[0], box[2], outW, filter);
    const vt = coeffs(img.height, box[1], box[3], outH, filter);
    const yFirst = vt.bounds[0];
    const yLast = vt.bounds[outH * 2 - 2] + vt.bounds[outH * 2 - 1];
    let cur = img;
    if (needH) {
      for (let i = 0; i < outH; i++) vt.bounds[i * 2] -= yFirst;
      const rows = yLast - yFirst;
      const tmp = new Uint8Array(outW * rows * 3);
      const half = 1 << (PRECISION_BITS - 1);
      for (let yy = 0; yy < rows; yy++) {
        const line = (yy + yFirst) * img.width;
        for (let xx = 0; xx < outW; xx++) {
          const xmin = hz.bounds[xx * 2], xmax = hz.bounds[xx * 2 + 1], k = xx * hz.ksize;
          let s0 = half, s1 = half, s2 = half;
          for (let x = 0; x < xmax; x++) {
            const p = (line + x + xmin) * 3, w = hz.kk[k + x];
            s0 += img.data[p] * w;
            s1 += img.data[p + 1] * w;
            s2 += img.data[p + 2] * w;
          }
          const o = (yy * outW + xx) * 3;
          tmp[o] = clip8(s0);
          tmp[o + 1] = clip8(s1);
          tmp[o + 2] = clip8(s2);
        }
      }
      cur = { width: outW, height: rows, data: tmp };
    }
    if (needV) {
      const out = new Uint8Array(cur.width * outH * 3);
      const half = 1 << (PRECISION_BITS - 1);
      for (let yy = 0; yy < outH; yy++) {
        const ymin = vt.bounds[yy * 2], ymax = vt.bounds[yy * 2 + 1], k = yy * vt.ksize;
        for (let xx = 0; xx < cur.width; xx++) {
          let s0 = half, s1 = half, s2 = half;
          for (let y = 0; y < ymax; y++) {
            const p = ((y + ymin) * cur.width + xx) * 3, w = vt.kk[k + y];
            s0 += cur.data[p] * w;
            s1 += cur.data[p + 1] * w;
            s2 += cur.data[p + 2] * w;
          }
          const o = (yy * cur.width + xx) * 3;
          out[o] = clip8(s0);
          out[o + 1] = clip8(s1);
          out[o + 2] = clip8(s2);
        }
      }
      cur = { width: cur.width, height: outH, data: out };
    }
    return cur === img ? { width: img.width, height: img.height, data: img.data.slice() } : cur;
  }

  // Image.resize((w, h), BILINEAR, reducing_gap=gap)
  function pillowResize(img, w, h, interpolation, reducingGap) {
    const filter = FILTERS[interpolation];
    if (!filter) throw new Error(`interpolation ${interpolation} is not implemented in the browser runner`);
    if (img.width === w && img.height === h) return { width: w, height: h, data: img.data.slice() };
    let box = [0, 0, img.width, img.height];
    let src = img;
    if (reducingGap !== null && reducingGap !== undefined) {
      const fx = Math.trunc(img.width / w / reducingGap) || 1;
      const fy = Math.trunc(img.height / h / reducingGap) || 1;
      if (fx > 1 || fy > 1) {
        // the safe box of the whole image is the whole image
        src = reduce(img, fx, fy);
        box = [0, 0, img.width / fx, img.height / fy];
      }
    }
    return resample(src, w, h, box.map(Math.fround), filter);
  }

  // ------------------------------------------------------------------------------------------------------
  // Preprocessing and decoding (runner/preprocess.py)
  // ------------------------------------------------------------------------------------------------------

  function resized(height, width, size) {
    const scale = size / Math.max(height, width);
    const clamp = (v) => Math.max(1, Math.min(size, pyRound(v)));
    return [clamp(width * scale), clamp(height * scale), scale];
  }

  // Python's round(): half to even
  function pyRound(v) {
    const f = Math.floor(v), d = v - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  function canvasSize(spec) {
    const s = spec.size;
    if (Array.isArray(s)) {
      if (s.length !== 2 || s[0] !== s[1]) throw new Error(`preprocessing size must be square, got ${s}`);
      return s[0];
    }
    return s;
  }

  // RGB image -> {x: Float32Array [1, 3, S, S], box: letterbox}
  function preprocess(img, spec) {
    if (spec.resize !== "letterbox" || spec.layout !== "NCHW" || spec.dtype !== "float32")
      throw new Error(`unsupported preprocessing ${JSON.stringify(spec)}`);
    const align = spec.align || "top-left";
    if (align !== "top-left") throw new Error(`letterbox align ${align} is not implemented in the browser runner`);
    const size = canvasSize(spec);
    const [nw, nh, scale] = resized(img.height, img.width, size);
    const small = pillowResize(img, nw, nh, spec.interpolation || "bilinear", spec.reducing_gap ?? null);
    const pad = spec.pad_value || [0, 0, 0];
    const plane = size * size;
    const x = new Float32Array(3 * plane);
    const f = Math.fround;
    for (let c = 0; c < 3; c++) {
      const mean = f(spec.mean[c]), std = f(spec.std[c]);
      const padv = f(f(f(pad[c] / 255) - mean) / std);
      x.fill(padv, c * plane, (c + 1) * plane);
      for (let y = 0; y < nh; y++)
        for (let xx = 0; xx < nw; xx++) {
          const p = small.data[(y * nw + xx) * 3 + c];
          x[c * plane + y * size + xx] = f(f(f(p / 255) - mean) / std);
        }
    }
    return { x, box: { scale, padLeft: 0, padTop: 0, height: img.height, width: img.width }, size };
  }

  // [cx, cy, w, h] in 0..1 of the canvas -> [x1, y1, x2, y2] in image pixels (boxes_to_image)
  function boxToImage(b, box, size) {
    const side = size / box.scale;
    let [cx, cy, bw, bh] = b.map((v) => v * side);
    cx -= box.padLeft / box.scale;
    cy -= box.padTop / box.scale;
    const x1 = Math.min(Math.max(cx - bw / 2, 0), box.width);
    const y1 = Math.min(Math.max(cy - bh / 2, 0), box.height);
    const x2 = Math.min(Math.max(cx + bw / 2, x1), box.width);
    const y2 = Math.min(Math.max(cy + bh / 2, y1), box.height);
    return [x1, y1, x2, y2];
  }

  // object_mask_rle's rule, pixel by pixel: sigmoid of the logits, the cells covering the image read
  // bilinearly (cell centres at integers, clamped at the edges), on where > 0.5 inside the object's box;
  // COCO uncompressed RLE, column-major, first run counts zeros
  function objectMaskRle(logits, ms, box, xyxy) {
    const H = box.height, W = box.width;
    const x0 = Math.max(0, Math.floor(xyxy[0])), y0 = Math.max(0, Math.floor(xyxy[1]));
    const x1 = Math.max(x0, Math.min(W, Math.ceil(xyxy[2]))), y1 = Math.max(y0, Math.min(H, Math.ceil(xyxy[3])));
    if (x1 <= x0 || y1 <= y0) return { size: [H, W], counts: [H * W] };
    const [mw, mh] = resized(H, W, ms);
    const grid = new Float64Array(mh * mw);
    for (let r = 0; r < mh; r++) for (let c = 0; c < mw; c++) grid[r * mw + c] = 1 / (1 + Math.exp(-logits[r * ms + c]));
    const axis = (i, n, cells) => {
      const u = (i + 0.5) * (cells / n) - 0.5;
      const left = Math.min(Math.max(Math.floor(u), 0), Math.max(cells - 2, 0));
      return [left, Math.min(Math.max(u - left, 0), 1), Math.min(left + 1, cells - 1)];
    };
    const rows = [];
    for (let y = y0; y < y1; y++) rows.push(axis(y, H, mh));
    // the positions (column-major) where the mask switches on or off; two switches at one position cancel
    // (a run that stops at the bottom of one column and starts at the top of the next)
    const pos = [];
    const flip = (p) => {
      if (pos.length && pos[pos.length - 1] === p) pos.pop();
      else pos.push(p);
    };
    for (let x = x0; x < x1; x++) {
      const [l, fr, rt] = axis(x, W, mw);
      let on = false;
      for (let y = y0; y < y1; y++) {
        const [t, fy, b] = rows[y - y0];
        const top = grid[t * mw + l] * (1 - fr) + grid[t * mw + rt] * fr;
        const bot = grid[b * mw + l] * (1 - fr) + grid[b * mw + rt] * fr;
        const v = top * (1 - fy) + bot * fy > 0.5;
        if (v !== on) {
          flip(x * H + y);
          on = v;
        }
      }
      if (on) flip(x * H + y1); // off below the box
    }
    const bounds = [0, ...pos.filter((p) => p < H * W), H * W];
    const counts = [];
    for (let i = 1; i < bounds.length; i++) counts.push(bounds[i] - bounds[i - 1]);
    return { size: [H, W], counts };
  }

  // greedy decoding's banned tokens (runner.bundle.banned_tokens)
  function bannedTokens(history, n, run) {
    const banned = new Set();
    const L = history.length;
    if (run >= 1 && L >= run && new Set(history.slice(L - run)).size === 1) banned.add(history[L - 1]);
    if (n >= 1 && L >= n) {
      const prefix = n > 1 ? history.slice(L - n + 1) : [];
      for (let i = 0; i < L - n + 1; i++) {
        let same = true;
        for (let j = 0; j < n - 1; j++) if (history[i + j] !== prefix[j]) { same = false; break; }
        if (same) banned.add(history[i + n - 1]);
      }
    }
    return banned;
  }

  function greedyToken(scores, history, n, run) {
    const banned = bannedTokens(history, n, run);
    let best = -1, bestV = -Infinity;
    for (let i = 0; i < scores.length; i++) {
      if (banned.has(i)) continue;
      if (best < 0 || scores[i] > bestV) { best = i; bestV = scores[i]; }
    }
    return best;
  }

  // the k documents of highest score, highest first; ties keep document order (top_sources)
  function topSources(logits, k, ids) {
    const order = ids.map((_, i) => i);
    order.sort((a, b) => (logits[b] - logits[a]) || (a - b));
    return order.slice(0, Math.max(k, 0)).map((i) => ids[i]);
  }

  // ------------------------------------------------------------------------------------------------------
  // The runner
  // ------------------------------------------------------------------------------------------------------

  const prod = (a) => a.reduce((p, v) => p * v, 1);

  class StudentRunner {
    // base: the URL of the bundle folder (manifest.json, tokenizer.json, *.onnx)
    static async load(base, ort, options = {}) {
      const get = async (name, kind) => {
        const r = await fetch(`${base}/${name}`);
        if (!r.ok) throw new Error(`${base}/${name}: HTTP ${r.status}`);
        return kind === "json" ? r.json() : new Uint8Array(await r.arrayBuffer());
      };
      const manifest = await get("manifest.json", "json");
      if (manifest.runtime !== "onnx") throw new Error(`the bundle's runtime is ${manifest.runtime}, not onnx`);
      const tokenizer = new ByteLevelBPE(await get(manifest.tokenizer.file, "json"));
      const sessions = {};
      const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all", ...options };
      for (const [name, prog] of Object.entries(manifest.programs))
        sessions[name] = await ort.InferenceSession.create(await get(prog.file, "bytes"), opts);
      return new StudentRunner(manifest, tokenizer, sessions, ort);
    }

    constructor(manifest, tokenizer, sessions, ort) {
      this.manifest = manifest;
      this.tokenizer = tokenizer;
      this.sessions = sessions;
      this.ort = ort;
      const tok = manifest.tokenizer;
      this.padId = tok.pad_id; this.bosId = tok.bos_id; this.eosId = tok.eos_id;
      this.maxQuestionLen = tok.max_question_len;
      this.outputs = manifest.outputs || { answer: "text", objects: "objects", sources: "sources" };
      this.encodeOutputs = manifest.programs.encode.outputs.map((o) => o.name);
      this.hasText = "decode_step" in manifest.programs;
      this.maxSteps = this.hasText ? manifest.kv_cache.max_answer_len - 1 : 0;
      this.decoding = manifest.output_decoding;
      this.classNames = manifest.class_names;
      this.documentIds = manifest.documents.map((d) => d.id);
      // recurrent depth (manifest depth + the deepen program; graphdistill.runner.bundle step 5)
      this.depthMax = manifest.depth ? manifest.depth.max : 1;
      this.depthDefault = manifest.depth ? manifest.depth.default : 1;
      if (this.depthMax > 1 && !("deepen" in manifest.programs)) throw new Error(`depth.max ${this.depthMax} but no deepen program`);
      // test-time views the bundle asks for (manifest tta): this runner answers the photo alone
      this.tta = manifest.tta ? manifest.tta.augmentations : [];
    }

    checkDepth(depth) {
      const r = depth === undefined || depth === null ? this.depthDefault : Number(depth);
      if (!Number.isInteger(r) || r < 1 || r > this.depthMax)
        throw new Error(`depth ${depth}: this bundle takes depths 1..${this.depthMax} (manifest depth)`);
      return r;
    }

    tensor(spec, data) {
      if (spec.dtype === "int64") return new this.ort.Tensor("int64", BigInt64Array.from(data, (v) => BigInt(v)), spec.shape);
      if (spec.dtype === "float32") return new this.ort.Tensor("float32", data, spec.shape);
      throw new Error(`input ${spec.name}: dtype ${spec.dtype} is not handled`);
    }

    encodeQuestion(question) {
      const ids = this.tokenizer.encode(question).slice(0, this.maxQuestionLen);
      const padded = new Array(this.maxQuestionLen).fill(this.padId);
      const mask = new Array(this.maxQuestionLen).fill(0);
      ids.forEach((id, i) => { padded[i] = id; mask[i] = 1; });
      return [padded, mask];
    }

    // steps 3-5: encode once (and deepen depth - 1 times), then decode_step token by token
    async runModels(x, question, depth) {
      const r = this.checkDepth(depth);
      const enc = this.manifest.programs.encode;
      const [ids, mask] = this.encodeQuestion(question);
      const feeds = {};
      const values = [x, ids, mask];
      enc.inputs.forEach((spec, i) => { feeds[spec.name] = this.tensor(spec, values[i]); });
      const res = await this.sessions.encode.run(feeds);
      const named = {};
      for (const name of this.encodeOutputs) named[name] = res[name];
      if (r > 1) {
        // each deepen input is the latest output of that name (question_mask: the query's own); its outputs,
        // in order, replace those names (an ONNX output may not share an input's name: the graph's are
        // "<name>.next", so they are read by position)
        const deep = this.manifest.programs.deepen, session = this.sessions.deepen;
        for (let i = 1; i < r; i++) {
          const f = {};
          for (const spec of deep.inputs) f[spec.name] = spec.name === "question_mask" ? this.tensor(spec, mask) : named[spec.name];
          const out = await session.run(f);
          deep.outputs.forEach((spec, j) => { named[spec.name] = out[session.outputNames[j]]; });
        }
      }
      if (!this.hasText) return { answerIds: [], outputs: named };
      const step = this.manifest.programs.decode_step;
      // the runner's arrays (cross_kv from encode; kv_cache zeros) and each input's place in them
      const arrays = {};
      for (const [k, a] of Object.entries(step.arrays)) arrays[k] = { shape: a.shape, data: new Float32Array(prod(a.shape)) };
      arrays.cross_kv.data.set(named.cross_kv.data);
      const view = (spec) => {
        const [name, i, j] = spec.view_of;
        const a = arrays[name];
        const block = prod(a.shape.slice(2));
        return a.data.subarray((i * a.shape[1] + j) * block, (i * a.shape[1] + j + 1) * block);
      };
      const kv = arrays.kv_cache;
      const [L, two, B, heads, T, D] = kv.shape;
      const answer = [];
      let token = this.bosId;
      let prev = this.bosId; // the token fed at the step before (<bos> at position 0)
      for (let pos = 0; pos < this.maxSteps; pos++) {
        const f = {};
        for (const spec of step.inputs) {
          if (spec.name === "token") f[spec.name] = this.tensor(spec, [token]);
          else if (spec.name === "position") f[spec.name] = this.tensor(spec, [pos]);
          else if (spec.name === "prev_token") f[spec.name] = this.tensor(spec, [prev]);
          else if (spec.view_of) f[spec.name] = this.tensor(spec, view(spec));
          else if (spec.per_query) f[spec.name] = this.tensor(spec, named[spec.per_query].data);
          else throw new Error(`decode_step input ${spec.name}: not token, position, prev_token, a view or per_query`);
        }
        const out = await this.sessions.decode_step.run(f);
        const scores = out[step.outputs[0].name].data, kvNew = out[step.outputs[1].name].data;
        // kv_cache[:, :, :, :, pos] = kv_new[:, :, :, :, 0]
        for (let o = 0; o < L * two * B * heads; o++) kv.data.set(kvNew.subarray(o * D, (o + 1) * D), (o * T + pos) * D);
        const nxt = greedyToken(scores, answer, this.decoding.no_repeat_ngram || 0, this.decoding.max_token_run || 0);
        if (nxt === this.eosId) break;
        answer.push(nxt);
        prev = token;
        token = nxt;
      }
      return { answerIds: answer, outputs: named };
    }

    decodeObjects(out, box, size) {
      const scores = out.scores.data, classes = out.classes.data, keepArr = out.keep.data, boxes = out.boxes.data;
      const order = Array.from(scores, (_, i) => i).sort((a, b) => (scores[b] - scores[a]) || (a - b));
      const keep = order.filter((q) => Boolean(keepArr[q]));
      const ms = out.mask_logits ? out.mask_logits.dims[out.mask_logits.dims.length - 1] : 0;
      return keep.map((q) => {
        const cid = Number(classes[q]);
        const b = boxToImage([0, 1, 2, 3].map((i) => boxes[q * 4 + i]), box, size);
        return {
          label: cid < this.classNames.length ? this.classNames[cid] : String(cid),
          class_id: cid,
          score: scores[q],
          box: b,
          mask: out.mask_logits ? objectMaskRle(out.mask_logits.data.subarray(q * ms * ms, (q + 1) * ms * ms), ms, box, b) : null,
        };
      });
    }

    // steps 2-8 for one RGB image {width, height, data}; depth: the recurrent block's iterations (default:
    // the manifest's depth.default, 1 without). Test-time views (step 9) are not run here: the photo alone.
    async predict(img, question, depth) {
      const t0 = performance.now();
      const { x, box, size } = preprocess(img, this.manifest.preprocessing);
      const raw = await this.runModels(x, question, depth);
      const result = {};
      let objects = null;
      for (const [name, kind] of Object.entries(this.outputs)) {
        if (kind === "text") result[name] = this.tokenizer.decode(raw.answerIds);
        else if (kind === "objects" || kind === "detections") {
          if (objects === null) objects = "boxes" in raw.outputs ? this.decodeObjects(raw.outputs, box, size) : [];
          result[name] = kind === "objects" ? objects : {
            kind: "detections", xyxy: objects.map((o) => o.box), class_ids: objects.map((o) => o.class_id),
            names: objects.map((o) => o.label), scores: objects.map((o) => o.score), image_size: [img.height, img.width],
          };
        } else if (kind === "sources") result[name] = topSources(raw.outputs.source_logits.data, this.decoding.sources_k, this.documentIds);
        else if (kind === "embedding") result[name] = Array.from(raw.outputs[`embedding:${name}`].data);
        else throw new Error(`output ${name} has unknown kind ${kind}`);
      }
      return { result, ms: performance.now() - t0, answerIds: raw.answerIds };
    }
  }

  // A decoded picture (ImageBitmap / HTMLImageElement) -> RGB {width, height, data}; transparent pixels on
  // white, as graphdistill.images.load_image composites them
  function rgbOf(source) {
    const w = source.width, h = source.height;
    const canvas = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(w, h) : Object.assign(document.createElement("canvas"), { width: w, height: h });
    const ctx = canvas.getContext("2d", { colorSpace: "srgb", willReadFrequently: true });
    ctx.drawImage(source, 0, 0);
    const rgba = ctx.getImageData(0, 0, w, h).data;
    const data = new Uint8Array(w * h * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      const a = rgba[i + 3];
      for (let c = 0; c < 3; c++) data[j + c] = a === 255 ? rgba[i + c] : Math.round((rgba[i + c] * a + 255 * (255 - a)) / 255);
    }
    return { width: w, height: h, data };
  }

  return { ByteLevelBPE, splitWords, bytesToUnicode, pillowResize, reduce, preprocess, boxToImage, objectMaskRle,
    bannedTokens, greedyToken, topSources, StudentRunner, rgbOf, pyRound };
});
