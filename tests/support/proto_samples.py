"""Sample Triton ``config.pbtxt`` texts shared by the proto_* subprocess scripts.

Pure data: importing this module imports neither ``protos`` nor ``tritonclient``.
"""

# A Triton config.pbtxt exercising most of the schema.
SAMPLE_CONFIG_PBTXT = """
name: "densenet_onnx"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape: { shape: [ 1, 3, 224, 224 ] }
  },
  {
    name: "mask"
    data_type: TYPE_BOOL
    dims: [ -1 ]
    optional: true
    allow_ragged_batch: true
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape: { shape: [ 1, 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
batch_input [
  {
    kind: BATCH_ACCUMULATED_ELEMENT_COUNT
    target_name: "INDEX"
    data_type: TYPE_FP32
    source_input: "mask"
  }
]
instance_group [
  {
    name: "gpu_group"
    count: 2
    kind: KIND_GPU
    gpus: [ 0, 1 ]
    rate_limiter {
      resources [ { name: "R1" count: 4 }, { name: "R2" global: true count: 2 } ]
      priority: 2
    }
  },
  { count: 1 kind: KIND_CPU }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_priority_level: 1
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 5000
    allow_timeout_override: true
    max_queue_size: 16
  }
  priority_queue_policy {
    key: 2
    value: { timeout_action: REJECT max_queue_size: 4 }
  }
}
optimization {
  graph: { level: 1 }
  priority: PRIORITY_MAX
  cuda { graphs: true busy_wait_events: true output_copy_stream: true }
  execution_accelerators {
    gpu_execution_accelerator : [
      {
        name : "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
      }
    ]
  }
  input_pinned_memory: { enable: false }
}
parameters: {
  key: "intra_op_thread_count"
  value: { string_value: "4" }
}
model_warmup [
  {
    name: "zero_warmup"
    batch_size: 1
    count: 2
    inputs {
      key: "data_0"
      value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] zero_data: true }
    }
  }
]
model_transaction_policy { decoupled: false }
response_cache { enable: true }
model_repository_agents {
  agents [ { name: "checksum" parameters { key: "MD5:model.onnx" value: "abc" } } ]
}
default_model_filename: "model.onnx"
cc_model_filenames { key: "7.5" value: "model_sm75.onnx" }
metric_tags { key: "team" value: "ml" }
"""

SAMPLE_ENSEMBLE_PBTXT = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 4
input [ { name: "RAW" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP16 dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess"
      model_version: -1
      input_map { key: "IN" value: "RAW" }
      output_map { key: "OUT" value: "pre_out" }
    },
    {
      model_name: "classifier"
      model_version: 3
      input_map { key: "x" value: "pre_out" }
      output_map { key: "y" value: "SCORES" }
    }
  ]
}
"""

SAMPLE_SEQUENCE_PBTXT = """
name: "stateful"
backend: "python"
max_batch_size: 2
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2 ] }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [
    {
      input_name: "INPUT_STATE"
      output_name: "OUTPUT_STATE"
      data_type: TYPE_INT32
      dims: [ 1 ]
      initial_state: { name: "init" data_type: TYPE_INT32 dims: [ 1 ] zero_data: true }
    }
  ]
}
instance_group [ { kind: KIND_MODEL } ]
"""


# Fields Triton added after some tritonclient releases (see NEWER_* in the test).
SAMPLE_NEWER_FIELDS_PBTXT = """
name: "m"
backend: "pytorch"
runtime: "model.py"
input [ { name: "x" data_type: TYPE_BF16 dims: [ 2 ] is_non_linear_format_io: true } ]
model_metrics {
  metric_control [
    {
      metric_identifier { family: "nv_inference_first_response_histogram_ms" }
      histogram_options { buckets: [ 1, 2, 4, 8 ] }
    }
  ]
}
"""

# Samples both sides must parse to byte-identical messages, by name.
ROUND_TRIP_SAMPLES = {
    "config": SAMPLE_CONFIG_PBTXT,
    "ensemble": SAMPLE_ENSEMBLE_PBTXT,
    "sequence": SAMPLE_SEQUENCE_PBTXT,
}
