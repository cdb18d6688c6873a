// llhttp_frame.js: the reference side of tests/e2e/test_differential.py.
//
// Frames each case with Node's own HTTP/1 parser (llhttp, through the
// HTTPParser binding that node's http server uses; _http_common exports it
// on Node 18 and 20) in strict mode, or with the lenient flags named on the
// command line (`--lenient optional_cr_before_lf,spaces_after_chunk_size`).
// Input and output are the format of tests/fuzz/frame_dump.c: cases
// "<length>\n<bytes>" on stdin; one JSON line per case, strings in hex:
//   {"msgs":[{"m","t","v","ka","h":[[name,value],..],"b"}],
//    "end":"clean"|"partial"|"closed"|"refused","code":"HPE_..","why":".."}
'use strict';
const { HTTPParser, methods } = require('_http_common');

const LENIENT = {
  headers: 'kLenientHeaders',
  chunked_length: 'kLenientChunkedLength',
  keep_alive: 'kLenientKeepAlive',
  transfer_encoding: 'kLenientTransferEncoding',
  version: 'kLenientVersion',
  data_after_close: 'kLenientDataAfterClose',
  optional_lf_after_cr: 'kLenientOptionalLFAfterCR',
  optional_crlf_after_chunk: 'kLenientOptionalCRLFAfterChunk',
  optional_cr_before_lf: 'kLenientOptionalCRBeforeLF',
  spaces_after_chunk_size: 'kLenientSpacesAfterChunkSize',
};

let lenient = 0;
const li = process.argv.indexOf('--lenient');
if (li > 0) {
  for (const name of process.argv[li + 1].split(',').filter(Boolean)) {
    const k = LENIENT[name];
    if (!k || HTTPParser[k] === undefined) {
      process.stderr.write(`llhttp_frame: no lenient flag ${name} in this node\n`);
      process.exit(2);
    }
    lenient |= HTTPParser[k];
  }
}

const hex = (s) => Buffer.from(s, 'latin1').toString('hex');

function frame(buf) {
  const p = new HTTPParser();
  const msgs = [];
  let cur = null;
  let inMessage = false;
  p.initialize(HTTPParser.REQUEST, {}, 16 * 1024, lenient);
  const begin = () => {
    if (!cur) cur = { h: [], url: '', body: [], trailers: false };
  };
  p[HTTPParser.kOnMessageBegin] = () => { inMessage = true; begin(); };
  // Headers past llhttp's batch of 32 (and trailers) come here first.
  p[HTTPParser.kOnHeaders] = (h, url) => {
    begin();
    // Trailers are skipped (as the gateway does); their flush repeats the url.
    if (cur.done) { cur.trailers = true; return; }
    cur.h.push(...h);
    if (url) cur.url += url;
  };
  p[HTTPParser.kOnHeadersComplete] = (maj, min, h, m, url, sc, sm, upg, ka) => {
    begin();
    if (h) cur.h.push(...h);
    if (url) cur.url += url;
    cur.m = methods[m];
    cur.v = maj === 1 ? min : -1;
    cur.ka = ka ? 1 : 0;
    cur.done = true;
    return 0;
  };
  p[HTTPParser.kOnBody] = (b, start, len) => {
    cur.body.push(Buffer.from(len === undefined ? b : b.subarray(start, start + len)));
  };
  p[HTTPParser.kOnMessageComplete] = () => {
    msgs.push(cur);
    cur = null;
    inMessage = false;
  };
  p[HTTPParser.kOnExecute] = () => {};
  const r = p.execute(buf);
  const out = { msgs: [], end: 'clean', code: '', why: '' };
  for (const m of msgs) {
    const h = [];
    for (let i = 0; i + 1 < m.h.length; i += 2) h.push([hex(m.h[i]), hex(m.h[i + 1])]);
    out.msgs.push({ m: hex(m.m || ''), t: hex(m.url), v: m.v, ka: m.ka, h,
                    b: Buffer.concat(m.body).toString('hex') });
  }
  if (r instanceof Error) {
    out.code = r.code || '';
    out.why = hex(String(r.reason || r.message || ''));
    // Data after a request that closed the connection: the server ignores
    // it, as the gateway does.
    out.end = out.code === 'HPE_CLOSED_CONNECTION' ? 'closed' : 'refused';
  } else if (inMessage || cur) {
    out.end = 'partial';
  }
  p.close && p.close();
  return out;
}

function main() {
  const chunks = [];
  process.stdin.on('data', (c) => chunks.push(c));
  process.stdin.on('end', () => {
    const all = Buffer.concat(chunks);
    const lines = [];
    let off = 0;
    while (off < all.length) {
      const nl = all.indexOf(10, off);
      if (nl < 0) break;
      const n = parseInt(all.subarray(off, nl).toString('latin1'), 10);
      const buf = all.subarray(nl + 1, nl + 1 + n);
      off = nl + 1 + n;
      lines.push(JSON.stringify(frame(buf)));
    }
    process.stdout.write(lines.join('\n') + (lines.length ? '\n' : ''));
  });
}

main();
