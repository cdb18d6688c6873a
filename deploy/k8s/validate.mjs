// validate.mjs: checks Kubernetes objects against the API's JSON schemas,
// with the npm package kubernetes-models (its models embed the OpenAPI
// schemas of Kubernetes 1.3x and validate with ajv). Owns: the mapping from
// apiVersion/kind to a model and the report; not the parsing of YAML (the
// caller, tests/e2e/test_deploy.py, hands over JSON: node has no YAML parser).
//
//   npm install -g kubernetes-models@5.1.0
//   python3 -c 'import json,sys,yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)' \
//     < deploy/k8s/gateway-deployment.yaml | node deploy/k8s/validate.mjs "$(npm root -g)/kubernetes-models"
//
// Reads a JSON array of objects on stdin; prints one line per object
// ("ok Kind/name" or "invalid Kind/name: why") and exits 1 if any is invalid
// or has no model.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";

const root = process.argv[2];
if (!root) {
  console.error("usage: node validate.mjs MODELS_DIR < objects.json");
  process.exit(2);
}
const objects = JSON.parse(readFileSync(0, "utf8"));
let bad = 0;
for (const obj of objects) {
  const name = `${obj.kind}/${obj.metadata?.name ?? "?"}`;
  // "v1" is the core group's directory; "apps/v1" etc. are their own.
  const file = path.join(root, ...obj.apiVersion.split("/"), `${obj.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[obj.kind];
  } catch (e) {
    console.log(`invalid ${name}: no model for ${obj.apiVersion} ${obj.kind} (${e.message})`);
    bad++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok ${name}`);
  } catch (e) {
    console.log(`invalid ${name}: ${e.message}`);
    bad++;
  }
}
process.exit(bad ? 1 : 0);
