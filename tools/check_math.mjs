// Compile formulas with KaTeX (throwOnError: true) and report the ones that fail.
//
// stdin:  a JSON list of {"id": any, "tex": string, "display": bool}
// stdout: a JSON list of {"id": ..., "tex": ..., "error": string}, one per failure
//
// Used by tests/test_docs.py on every formula of every public docstring; KaTeX
// is installed from package-lock.json by `npm ci`.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const katex = require("katex");

const formulas = JSON.parse(readFileSync(0, "utf8"));
const failures = [];
for (const { id, tex, display } of formulas) {
  try {
    katex.renderToString(tex, { displayMode: Boolean(display), throwOnError: true, strict: "ignore" });
  } catch (error) {
    failures.push({ id, tex, error: String(error.message || error) });
  }
}
process.stdout.write(JSON.stringify(failures));
