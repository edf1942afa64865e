package main

// Prometheus metrics of the calls the edge takes, under the gateway's own names
// (ferry/metrics.py), so dashboards and alerts that sum over gateways count them too;
// the calls it relays are counted by the gateway that answers them. Plus
// ferry_edge_relayed_total, by reason. Text exposition format 0.0.4, by hand: the
// edge needs no client library.

import (
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
)

type histogram struct {
	counts []uint64 // one per bound, then +Inf
	sum    float64
}

type metrics struct {
	mu        sync.Mutex
	bounds    []float64
	requests  map[[3]string]uint64 // model, version, status
	durations map[[2]string]*histogram
	relayed   map[string]uint64
	inflight  func() int
	dropped   func() uint64
	resent    func() uint64
}

func newMetrics(bounds []float64) *metrics {
	return &metrics{bounds: bounds, requests: map[[3]string]uint64{}, durations: map[[2]string]*histogram{},
		relayed: map[string]uint64{}}
}

func (m *metrics) observe(model, version, status string, seconds float64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[[3]string{model, version, status}]++
	k := [2]string{model, version}
	h := m.durations[k]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(m.bounds)+1)}
		m.durations[k] = h
	}
	h.counts[sort.SearchFloat64s(m.bounds, seconds)]++
	h.sum += seconds
}

func (m *metrics) relay(why string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.relayed[why]++
	return m.relayed[why] == 1
}

func label(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

func (m *metrics) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	var b strings.Builder
	m.mu.Lock()
	b.WriteString("# HELP ferry_requests_total Inference requests answered by the gateway, by final gRPC status " +
		"(here: those the edge took)\n# TYPE ferry_requests_total counter\n")
	for _, k := range sortedKeys3(m.requests) {
		fmt.Fprintf(&b, "ferry_requests_total{model=\"%s\",version=\"%s\",status=\"%s\"} %d\n",
			label(k[0]), label(k[1]), label(k[2]), m.requests[k])
	}
	b.WriteString("# HELP ferry_request_duration_seconds From the gateway receiving a request to its answer " +
		"(here: the edge)\n# TYPE ferry_request_duration_seconds histogram\n")
	for _, k := range sortedKeys2(m.durations) {
		h := m.durations[k]
		var cum uint64
		for i, n := range h.counts {
			cum += n
			le := "+Inf"
			if i < len(m.bounds) {
				le = strconv.FormatFloat(m.bounds[i], 'g', -1, 64)
			}
			fmt.Fprintf(&b, "ferry_request_duration_seconds_bucket{model=\"%s\",version=\"%s\",le=\"%s\"} %d\n",
				label(k[0]), label(k[1]), le, cum)
		}
		fmt.Fprintf(&b, "ferry_request_duration_seconds_sum{model=\"%s\",version=\"%s\"} %g\n", label(k[0]),
			label(k[1]), h.sum)
		fmt.Fprintf(&b, "ferry_request_duration_seconds_count{model=\"%s\",version=\"%s\"} %d\n", label(k[0]),
			label(k[1]), cum)
	}
	b.WriteString("# HELP ferry_edge_relayed_total Inference calls the edge left to the gateway, by reason\n" +
		"# TYPE ferry_edge_relayed_total counter\n")
	reasons := make([]string, 0, len(m.relayed))
	for r := range m.relayed {
		reasons = append(reasons, r)
	}
	sort.Strings(reasons)
	for _, r := range reasons {
		fmt.Fprintf(&b, "ferry_edge_relayed_total{reason=\"%s\"} %d\n", label(r), m.relayed[r])
	}
	m.mu.Unlock()
	if m.inflight != nil {
		fmt.Fprintf(&b, "# HELP ferry_gateway_inflight_requests Requests this gateway holds, waiting for their "+
			"answer\n# TYPE ferry_gateway_inflight_requests gauge\nferry_gateway_inflight_requests %d\n", m.inflight())
	}
	if m.dropped != nil {
		fmt.Fprintf(&b, "# HELP ferry_dropped_replies_total Replies that found no waiting call\n"+
			"# TYPE ferry_dropped_replies_total counter\nferry_dropped_replies_total %d\n", m.dropped())
	}
	if m.resent != nil {
		fmt.Fprintf(&b, "# HELP ferry_resent_requests_total Requests queued again after the Redis connection "+
			"was replaced\n# TYPE ferry_resent_requests_total counter\nferry_resent_requests_total %d\n", m.resent())
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Write([]byte(b.String()))
}

func sortedKeys3(m map[[3]string]uint64) [][3]string {
	keys := make([][3]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return strings.Join(keys[i][:], "\x00") < strings.Join(keys[j][:], "\x00") })
	return keys
}

func sortedKeys2(m map[[2]string]*histogram) [][2]string {
	keys := make([][2]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i][0]+"\x00"+keys[i][1] < keys[j][0]+"\x00"+keys[j][1] })
	return keys
}
