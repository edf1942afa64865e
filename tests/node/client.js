#!/usr/bin/env node
// Ferry from Node.js: a plain gRPC client generated at run time from
// protos/grpc_service.proto, with nothing Ferry- or Triton-specific installed.
//
//   npm ci --prefix tests/node
//   node tests/node/client.js 127.0.0.1:8001 input.bin
//
// input.bin holds 2*256 little-endian float32 values for the "mlp" model.
// Prints one JSON line: {ready, inputs, id, shape, output, not_found_code},
// where output is base64 of the raw little-endian float32 OUTPUT0 bytes.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const ROOT = path.resolve(__dirname, "..", "..");

function loadService() {
  // grpc_service.proto imports "protos/model_config.proto", so the include dir is the repo root.
  const definition = protoLoader.loadSync("protos/grpc_service.proto", {
    includeDirs: [ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

// Promisified unary call with a deadline.
function call(client, method, request, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const [address, inputFile] = process.argv.slice(2);
  if (!address || !inputFile) {
    throw new Error("usage: node client.js HOST:PORT INPUT_FILE");
  }
  const raw = fs.readFileSync(inputFile);
  const shape = [2, 256];
  if (raw.length !== shape[0] * shape[1] * 4) {
    throw new Error(`${inputFile}: expected ${shape[0] * shape[1] * 4} bytes of float32, got ${raw.length}`);
  }

  const Service = loadService();
  const client = new Service(address, grpc.credentials.createInsecure());
  try {
    const ready = await call(client, "ServerReady", {});
    const metadata = await call(client, "ModelMetadata", { name: "mlp" });
    const response = await call(client, "ModelInfer", {
      model_name: "mlp",
      id: "node-1",
      inputs: [{ name: "INPUT0", datatype: "FP32", shape: shape.map(String) }],
      outputs: [{ name: "OUTPUT0" }],
      raw_input_contents: [raw],
    });

    // An unknown model must come back as a gRPC status, not a transport failure.
    let notFoundCode = null;
    try {
      await call(client, "ModelInfer", {
        model_name: "nope",
        inputs: [{ name: "INPUT0", datatype: "FP32", shape: shape.map(String) }],
        raw_input_contents: [raw],
      });
    } catch (err) {
      if (typeof err.code !== "number") throw err;
      notFoundCode = err.code;
    }
    if (notFoundCode === null) {
      throw new Error('ModelInfer for model "nope" unexpectedly succeeded');
    }

    const out = response.outputs[0];
    process.stdout.write(
      JSON.stringify({
        ready: ready.ready,
        inputs: metadata.inputs.map((t) => ({ name: t.name, datatype: t.datatype, shape: t.shape })),
        id: response.id,
        shape: out.shape.map(Number),
        output: Buffer.from(response.raw_output_contents[0]).toString("base64"),
        not_found_code: notFoundCode,
      }) + "\n",
    );
  } finally {
    client.close();
  }
}

main().catch((err) => {
  if (typeof err.code === "number") {
    const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || "UNKNOWN";
    process.stderr.write(`gRPC error ${err.code} (${name}): ${err.details || err.message}\n`);
  } else {
    process.stderr.write(`error: ${err.stack || err}\n`);
  }
  process.exit(1);
});
