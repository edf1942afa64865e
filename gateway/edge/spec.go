package main

// What the edge knows it learns from the Python gateway behind it, over two internal
// RPCs of gateway/edge_api.py (JSON in, JSON out): Hello once at start (Redis key
// names, the admission script, limits) and Model per model version (its inputs, queue
// bound, default level and queue timeout, whether it has a live worker). The rules and
// the key layout thus stay in one place, the Python code; the edge only applies them to
// requests that pass every check, and forwards anything else to the gateway, which
// answers it (an invalid request gets the gateway's own INVALID_ARGUMENT message).

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	helloMethod = "/ferry.edge.v1.Edge/Hello"
	modelMethod = "/ferry.edge.v1.Edge/Model"
	protocol    = 1
)

type hello struct {
	Protocol        int       `json:"protocol"`
	GatewayAlive    string    `json:"gateway_alive"`
	ReplyList       string    `json:"reply_list"`
	AliveTTLms      int64     `json:"alive_ttl_ms"`
	ReplyTTLms      int64     `json:"reply_ttl_ms"`
	HeartbeatS      float64   `json:"heartbeat_s"`
	Enqueue         string    `json:"enqueue"`
	EnqueueSHA      string    `json:"enqueue_sha"`
	RequestTimeoutS float64   `json:"request_timeout_s"`
	MaxInflight     int       `json:"max_inflight"`
	FlushIntervalUs int64     `json:"flush_interval_us"`
	MaxGroup        int       `json:"max_group"`
	RedisTimeoutS   float64   `json:"redis_timeout_s"`
	MaxMessageBytes int       `json:"max_message_bytes"`
	MaxElements     int64     `json:"max_elements"`
	ReadParameters  []string  `json:"read_parameters"` // request parameters the gateway acts on
	FailCount       string    `json:"fail_count_field"`
	FailNs          string    `json:"fail_ns_field"`
	SpecTTLs        float64   `json:"spec_ttl_s"`
	LatencyBuckets  []float64 `json:"latency_buckets"`
	ForwardAll      string    `json:"forward_all"`
}

type inputSpec struct {
	Name     string  `json:"name"`
	Datatype string  `json:"datatype"`
	Size     int64   `json:"size"`
	Dims     []int64 `json:"dims"`
}

type modelSpec struct {
	Name           string      `json:"name"`
	Version        int64       `json:"version"`
	RequestStream  string      `json:"request_stream"`
	QueueCount     string      `json:"queue_count"`
	StatsHash      string      `json:"stats_hash"`
	MaxQueueSize   int64       `json:"max_queue_size"`
	MaxBatch       int64       `json:"max_batch"`
	Level          int         `json:"level"`
	QueueTimeoutUs int64       `json:"queue_timeout_us"`
	Inputs         []inputSpec `json:"inputs"`
	Outputs        []string    `json:"outputs"`
	Live           bool        `json:"live"`
	Forward        string      `json:"forward"` // non-empty: the edge never takes this model's requests
}

func callJSON(ctx context.Context, up *grpc.ClientConn, method string, in, out interface{}) error {
	req, err := json.Marshal(in)
	if err != nil {
		return err
	}
	var resp []byte
	if err := up.Invoke(ctx, method, &req, &resp, grpc.ForceCodec(rawCodec{})); err != nil {
		return err
	}
	return json.Unmarshal(resp, out)
}

// fetchHello asks the gateway for the edge's configuration, retrying while it starts.
func fetchHello(up *grpc.ClientConn, gatewayID string, wait time.Duration) (*hello, error) {
	deadline := time.Now().Add(wait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		h := &hello{}
		err := callJSON(ctx, up, helloMethod, map[string]interface{}{"gateway_id": gatewayID, "protocol": protocol}, h)
		cancel()
		if err == nil {
			return h, nil
		}
		code := status.Code(err)
		if code != codes.Unavailable && code != codes.DeadlineExceeded || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type specKey struct{ name, version string }

type specEntry struct {
	mu      sync.Mutex
	spec    *modelSpec // nil: the gateway did not describe it (unknown model, a refusal): forward
	expires time.Time
}

// specs caches Model answers for spec_ttl_s: a model's liveness and a reloaded tokens
// or model file reach the edge within that time.
type specs struct {
	up  *grpc.ClientConn
	ttl time.Duration
	mu  sync.Mutex
	m   map[specKey]*specEntry
}

func newSpecs(up *grpc.ClientConn, ttl time.Duration) *specs {
	return &specs{up: up, ttl: ttl, m: map[specKey]*specEntry{}}
}

// get returns the model version's spec, or nil when its requests must be forwarded.
func (s *specs) get(ctx context.Context, name, version string) *modelSpec {
	k := specKey{name, version}
	s.mu.Lock()
	e := s.m[k]
	if e == nil {
		if len(s.m) > 4096 { // clients naming endless unknown models must not grow this without bound
			s.m = map[specKey]*specEntry{}
		}
		e = &specEntry{}
		s.m[k] = e
	}
	s.mu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if time.Now().Before(e.expires) {
		return e.spec
	}
	c, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	spec := &modelSpec{}
	if err := callJSON(c, s.up, modelMethod, map[string]string{"name": name, "version": version}, spec); err != nil {
		spec = nil
		if status.Code(err) != codes.NotFound {
			// Not cached: the gateway may be restarting; its own answer to the forwarded call says more.
			return nil
		}
	} else if spec.Forward != "" {
		spec = nil
	}
	e.spec, e.expires = spec, time.Now().Add(s.ttl)
	return spec
}

// admit returns the request's rows when the edge may queue it itself: every check of
// gateway/validate.py holds in its simplest form. Anything else (an error to report,
// parameters, typed contents, variable dims) returns 0, and why, and goes to the gateway.
func admit(spec *modelSpec, r *inferRequest, h *hello) (int64, string) {
	for _, p := range r.params {
		for _, read := range h.ReadParameters {
			if p == read { // the gateway validates and applies it; others it ignores, and so may the edge
				return 0, "request parameter " + p
			}
		}
	}
	maxElements := h.MaxElements
	if len(r.inputs) != len(spec.Inputs) || len(r.rawLens) != len(r.inputs) {
		return 0, "inputs or raw_input_contents missing or extra"
	}
	var batch int64 = -1
	for i, t := range r.inputs {
		if t.extra {
			return 0, "input parameters or typed contents"
		}
		var want *inputSpec
		for j := range spec.Inputs {
			if spec.Inputs[j].Name == t.name {
				want = &spec.Inputs[j]
				break
			}
		}
		if want == nil || t.datatype != want.Datatype || want.Size <= 0 {
			return 0, "a check failed"
		}
		for _, u := range r.inputs[:i] {
			if u.name == t.name {
				return 0, "a check failed"
			}
		}
		shape := t.shape
		rows := int64(1)
		if spec.MaxBatch > 0 {
			if len(shape) != len(want.Dims)+1 || shape[0] < 1 || shape[0] > spec.MaxBatch {
				return 0, "a check failed"
			}
			rows, shape = shape[0], shape[1:]
		} else if len(shape) != len(want.Dims) {
			return 0, "a check failed"
		}
		count := rows
		for j, d := range shape {
			if d != want.Dims[j] || d < 0 {
				return 0, "a check failed"
			}
			if count *= d; count > maxElements {
				return 0, "a check failed"
			}
		}
		if batch != -1 && rows != batch {
			return 0, "a check failed"
		}
		batch = rows
		if int64(r.rawLens[i]) != count*want.Size {
			return 0, "a check failed"
		}
	}
	for i, o := range r.outputs {
		if o.extra {
			return 0, "output parameters"
		}
		known := false
		for _, n := range spec.Outputs {
			known = known || n == o.name
		}
		if !known {
			return 0, "a check failed"
		}
		for _, p := range r.outputs[:i] {
			if p.name == o.name {
				return 0, "a check failed"
			}
		}
	}
	if batch < 1 {
		return 0, "no rows"
	}
	return batch, ""
}
