// Open-loop load with a client deadline, for benchmarks/overload.py (--client k6).
//
// k6 (Go) sends `RATE` ModelInfer calls per second at a constant arrival rate for
// `DURATION`, each with a gRPC deadline of `DEADLINE_MS`, and classifies every call:
// ok, rejected early (an error back in under EARLY x the deadline), or failed late.
// An arrival that finds no free virtual user is dropped by k6 (dropped_iterations):
// the client never throttles the load silently. Results go to `OUT` as k6's summary JSON.
import grpc from 'k6/net/grpc';
import encoding from 'k6/encoding';
import { Counter, Trend } from 'k6/metrics';

const RATE = Number(__ENV.RATE);
const VUS = Number(__ENV.VUS);
const DEADLINE_MS = Number(__ENV.DEADLINE_MS || 100);
const EARLY = Number(__ENV.EARLY || 0.5);
const DIM = Number(__ENV.DIM);

const client = new grpc.Client();
client.load([__ENV.PROTO_ROOT], 'protos/grpc_service.proto');

const values = new Float32Array(DIM);
for (let i = 0; i < DIM; i++) values[i] = Math.sin(i);
const request = {
  model_name: __ENV.MODEL,
  inputs: [{ name: __ENV.INPUT, datatype: 'FP32', shape: [1, DIM] }],
  raw_input_contents: [encoding.b64encode(values.buffer)],
};

export const options = {
  scenarios: {
    load: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: __ENV.DURATION || '10s',
      preAllocatedVUs: VUS, maxVUs: VUS,
    },
  },
  summaryTrendStats: ['p(50)', 'p(99)', 'max', 'count'],
};

const ok = new Counter('outcome_ok');
const early = new Counter('outcome_early');
const late = new Counter('outcome_late');
// One counter per gRPC status code (metrics must be created in the init context).
const byCode = [];
for (let c = 0; c <= 16; c++) byCode.push(new Counter(`status_${c}`));
const okTime = new Trend('answer_ok', true);
const errTime = new Trend('answer_error', true);

let connected = false;

export default function () {
  if (!connected) {
    client.connect(__ENV.ADDR, { plaintext: true });
    connected = true;
  }
  const t0 = Date.now();
  const res = client.invoke('inference.GRPCInferenceService/ModelInfer', request, { timeout: `${DEADLINE_MS}ms` });
  const took = Date.now() - t0;
  const code = res.status;
  const counter = byCode[Number(code)];
  if (counter) counter.add(1);
  else if (__ITER === 0) console.error(`unexpected status ${JSON.stringify(code)} ${JSON.stringify(res.error)}`);
  if (code === grpc.StatusOK) {
    ok.add(1);
    okTime.add(took);
  } else {
    errTime.add(took);
    if (took < EARLY * DEADLINE_MS) early.add(1);
    else late.add(1);
  }
}

export function handleSummary(data) {
  return { [__ENV.OUT]: JSON.stringify(data.metrics) };
}
