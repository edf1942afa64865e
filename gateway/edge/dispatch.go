package main

// Queue admitted requests on Redis and match replies back to waiting calls: the same
// contract as gateway/dispatch.py (broker/messages.py items 1, 2 and 4), in Go.
//
//   - The submitter sends everything queued since its last round trip in one pipeline,
//     one request group per model version (split at max_batch_size rows), each admitted
//     by the gateway's ENQUEUE script; under load at most once per flush_interval_us.
//   - The listener (replies.go) pops this edge's reply list in bulk (BLMPOP ... COUNT) and
//     completes each call by correlation number; a reply for a call that already ended is dropped.
//   - When the submitter's or the listener's connection is replaced, every call still
//     waiting is queued again (Redis may have lost it, or a reply popped in transit; running
//     twice beats never answering), as in Python.  The alive key is refreshed on the
//     submitter's connection, so a connection broken after the last request is noticed (and
//     what it carried re-sent) within a heartbeat, not at the next request.

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	listenBlockS = 1
	popCount     = 256
)

// flushMinGroup: under light load a request leaves at once; once a round trip carries this
// many, later ones wait up to flush_interval_us to share one. The gateway engages at 2 because
// its rounds are costly (grpc.aio); the edge's are cheap, and at 2 the wait cost it 30-45% at
// concurrency 8 and 20-30% at 16 (2 cores, perf_analyzer, alternating runs) for nothing at 64.
const flushMinGroup = 8

type result struct {
	code  codes.Code
	body  []byte
	local bool // decided here (queue full, deadline, Redis down), not by a worker or broker
}

type call struct {
	corr       uint64
	spec       *modelSpec
	rows       int64
	deadlineNs int64
	timeoutNs  int64
	payload    []byte
	done       chan result // buffered: whoever completes it first wins, later ones are dropped
	copy       bool        // a re-sent copy: its admission failing must not fail the call
}

func (c *call) finish(r result) {
	select {
	case c.done <- r:
	default:
	}
}

type dispatcher struct {
	h      *hello
	gwID   string
	target redisTarget
	rtt    time.Duration // Redis command timeout

	mu        sync.Mutex
	pending   map[uint64]*call
	outbox    []*call
	cancels   map[string][]uint64 // request stream -> corrs whose clients went away
	corr      uint64
	lastFlush time.Time
	lastGroup int
	timer     *time.Timer
	wake      chan struct{}
	failures  chan failure

	late         uint64 // replies that found no waiting call (under mu)
	resent       uint64 // requests queued again after a reconnect (under mu)
	beatDue      bool   // the next round refreshes the alive key (under mu)
	listenerLost bool   // the next round re-sends what waits (under mu)
	stop         chan struct{}
	wg           sync.WaitGroup
	hasPop       bool // Redis 7: BLMPOP
}

type failure struct {
	stats string
	ns    int64
}

func newDispatcher(h *hello, gwID string, target redisTarget) *dispatcher {
	return &dispatcher{
		h: h, gwID: gwID, target: target, rtt: time.Duration(h.RedisTimeoutS * float64(time.Second)),
		pending: map[uint64]*call{}, cancels: map[string][]uint64{},
		wake: make(chan struct{}, 1), failures: make(chan failure, 4096), stop: make(chan struct{}),
	}
}

// start says this edge is alive (workers push replies only to live gateways) and starts
// the loops; it fails when Redis cannot be reached at all.
func (d *dispatcher) start() error {
	c, err := dialRedis(d.target, d.rtt)
	if err != nil {
		return fmt.Errorf("cannot reach redis %s: %v", d.target.display, err)
	}
	replies, err := c.do([][]interface{}{{"INFO", "server"}, d.aliveCommand()})
	c.close()
	if err != nil {
		return fmt.Errorf("redis %s: %v", d.target.display, err)
	}
	if info, ok := replies[0].([]byte); ok {
		for _, line := range strings.Split(string(info), "\n") {
			if strings.HasPrefix(line, "redis_version:") {
				d.hasPop = !strings.HasPrefix(strings.TrimSpace(line[len("redis_version:"):]), "6.")
			}
		}
	}
	if e, ok := replies[1].(RespError); ok {
		return fmt.Errorf("redis %s refused the heartbeat: %v", d.target.display, e)
	}
	d.wg.Add(3)
	go d.submitter()
	go d.listener()
	go d.control()
	return nil
}

func (d *dispatcher) aliveCommand() []interface{} {
	return []interface{}{"SET", d.h.GatewayAlive, "1", "PX", d.h.AliveTTLms}
}

func (d *dispatcher) counts() (held int, late, resent uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.pending), d.late, d.resent
}

// close stops the loops, then deletes the alive key first (from then on workers drop
// replies instead of pushing them) and the reply list.
func (d *dispatcher) close() {
	close(d.stop)
	d.wg.Wait()
	if c, err := dialRedis(d.target, d.rtt); err == nil {
		c.do([][]interface{}{{"DEL", d.h.GatewayAlive}, {"DEL", d.h.ReplyList}})
		c.close()
	}
	if d.late > 0 {
		log.Printf("dropped %d replies whose calls had already ended (deadline or cancel)", d.late)
	}
}

func (d *dispatcher) signal() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func quoted(s string) string { return "'" + s + "'" }

// submit queues one admitted request and waits for its reply, its deadline or its client.
func (d *dispatcher) submit(ctx context.Context, spec *modelSpec, rows int64, payload []byte,
	timeout time.Duration) result {
	now := time.Now()
	c := &call{spec: spec, rows: rows, payload: payload, done: make(chan result, 1),
		deadlineNs: now.Add(timeout).UnixNano()}
	if spec.QueueTimeoutUs > 0 {
		c.timeoutNs = now.UnixNano() + spec.QueueTimeoutUs*1000
	}
	d.mu.Lock()
	if len(d.pending) >= d.h.MaxInflight {
		held := len(d.pending)
		d.mu.Unlock()
		return result{codes.ResourceExhausted, []byte(fmt.Sprintf(
			"this gateway already holds %d requests (max_inflight %d); retry later, on another gateway, "+
				"or raise max_inflight", held, d.h.MaxInflight)), true}
	}
	d.corr++
	c.corr = d.corr
	d.pending[c.corr] = c
	d.outbox = append(d.outbox, c)
	interval := time.Duration(d.h.FlushIntervalUs) * time.Microsecond
	since := now.Sub(d.lastFlush)
	if d.lastGroup < flushMinGroup || since >= interval {
		d.signal()
	} else if d.timer == nil {
		// The rest of the interval, not a whole one from now: at most one round per interval.
		d.timer = time.AfterFunc(interval-since, d.signal)
	}
	d.mu.Unlock()

	expiry := time.NewTimer(timeout)
	defer expiry.Stop()
	var r result
	select {
	case r = <-c.done:
	case <-expiry.C:
		r = result{codes.DeadlineExceeded, []byte(fmt.Sprintf("no answer from model %s v%d within %.3fs",
			quoted(spec.Name), spec.Version, timeout.Seconds())), true}
	case <-ctx.Done():
		// The client went away, or its deadline passed: take the request out of the queue if it
		// is still there, and answer as gRPC would, so the client sees DEADLINE_EXCEEDED for its
		// deadline whichever of its timer and this answer reaches it first.
		d.mu.Lock()
		d.cancels[spec.RequestStream] = append(d.cancels[spec.RequestStream], c.corr)
		d.mu.Unlock()
		d.signal()
		st := status.FromContextError(ctx.Err())
		r = result{st.Code(), []byte(st.Message()), true}
	}
	d.mu.Lock()
	delete(d.pending, c.corr)
	d.mu.Unlock()
	return r
}

func (d *dispatcher) countFailure(spec *modelSpec, started time.Time) {
	select {
	case d.failures <- failure{spec.StatsHash, time.Since(started).Nanoseconds()}:
	default: // statistics are best effort; never block a call on them
	}
}

type round struct {
	calls   []*call
	cancels map[string][]uint64
	beat    bool // refresh the alive key in this round
	resend  bool // the listener's connection was replaced: queue every waiting call again
}

// commands builds one round trip: a group per model version in arrival order, split at
// max_batch_size rows (or max_group requests), then the cancellations.
func (d *dispatcher) commands(r round, holding int) ([][]interface{}, [][]*call) {
	nowNs := time.Now().UnixNano()
	var cmds [][]interface{}
	var admits [][]*call
	byStream := map[string][]*call{}
	var order []string
	for _, c := range r.calls {
		k := c.spec.RequestStream
		if _, ok := byStream[k]; !ok {
			order = append(order, k)
		}
		byStream[k] = append(byStream[k], c)
	}
	for _, k := range order {
		calls := byStream[k]
		spec := calls[0].spec
		most := int64(d.h.MaxGroup)
		if spec.MaxQueueSize < most {
			most = spec.MaxQueueSize
		}
		var group []*call
		var rows int64
		flush := func() {
			if len(group) == 0 {
				return
			}
			cmd := []interface{}{"EVALSHA", d.h.EnqueueSHA, 2, spec.RequestStream, spec.QueueCount, len(group),
				spec.MaxQueueSize, "r", d.gwID}
			flat := make([]int64, 0, 4*len(group))
			for i, c := range group {
				cmd = append(cmd, fmt.Sprint(i), c.payload)
				flat = append(flat, int64(c.corr), c.rows, c.deadlineNs, c.timeoutNs)
			}
			header, _ := json.Marshal([]interface{}{nowNs, spec.Level, "", flat, holding})
			cmd = append(cmd, "h", header)
			cmds = append(cmds, cmd)
			admits = append(admits, group)
			group, rows = nil, 0
		}
		for _, c := range calls {
			if spec.MaxBatch == 0 || rows+c.rows > spec.MaxBatch || int64(len(group)) >= most {
				flush()
			}
			group = append(group, c)
			rows += c.rows
		}
		flush()
	}
	for stream, corrs := range r.cancels {
		list, _ := json.Marshal(corrs)
		cmds = append(cmds, []interface{}{"XADD", stream, "*", "r", d.gwID, "c", list})
		admits = append(admits, nil)
	}
	return cmds, admits
}

func (d *dispatcher) take() (round, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	r := round{calls: d.outbox, cancels: d.cancels, beat: d.beatDue, resend: d.listenerLost}
	d.outbox, d.cancels, d.beatDue, d.listenerLost = nil, map[string][]uint64{}, false, false
	d.lastFlush, d.lastGroup = time.Now(), len(r.calls)
	return r, len(d.pending)
}

func (d *dispatcher) submitter() {
	defer d.wg.Done()
	var conn *respConn
	defer func() {
		if conn != nil {
			conn.close()
		}
	}()
	var downSince time.Time
	fresh := false // the connection is new: say alive again and resend what waits
	for {
		select {
		case <-d.stop:
			return
		case <-d.wake:
		}
		r, holding := d.take()
		if conn == nil {
			var err error
			if conn, err = dialRedis(d.target, d.rtt); err != nil {
				conn = nil
				if d.retryLater(r, err, &downSince) {
					continue
				}
				d.fail(r, unavailable(d.target, err))
				continue
			}
			fresh = true
		}
		if fresh || r.resend {
			r = d.withResent(r)
		}
		cmds, admits := d.commands(r, holding)
		if fresh || r.beat {
			cmds = append(cmds, d.aliveCommand())
			admits = append(admits, nil)
		}
		if len(cmds) == 0 {
			continue
		}
		replies, err := conn.do(cmds)
		if err == nil && hasNoScript(replies) {
			// Redis restarted (or flushed its scripts) since the script was loaded: nothing ran.
			if _, err = conn.do([][]interface{}{{"SCRIPT", "LOAD", d.h.Enqueue}}); err == nil {
				replies, err = conn.do(cmds)
			}
		}
		if err != nil {
			conn.close()
			conn = nil
			if d.retryLater(r, err, &downSince) {
				continue
			}
			d.fail(r, unavailable(d.target, err))
			continue
		}
		downSince, fresh = time.Time{}, false
		for i, reply := range replies {
			group := admits[i]
			var failed *result
			switch v := reply.(type) {
			case int64:
				if v < 0 {
					spec := group[0].spec
					failed = &result{codes.ResourceExhausted, []byte(fmt.Sprintf(
						"the queue of model %s v%d is full: %d requests wait, max_queue_size is %d; retry later, "+
							"add workers, or raise max_queue_size in its config.pbtxt",
						quoted(spec.Name), spec.Version, -1-v, spec.MaxQueueSize)), true}
				}
			case RespError:
				log.Printf("queueing %d requests failed: %v", len(group), v)
				failed = &result{codes.Unavailable, []byte("could not queue the request: " + string(v)), true}
			}
			if failed != nil {
				for _, c := range group {
					if !c.copy {
						c.finish(*failed)
					}
				}
			}
		}
	}
}

func hasNoScript(replies []interface{}) bool {
	for _, r := range replies {
		if e, ok := r.(RespError); ok && strings.HasPrefix(string(e), "NOSCRIPT") {
			return true
		}
	}
	return false
}

func unavailable(t redisTarget, err error) result {
	return result{codes.Unavailable, []byte(fmt.Sprintf("Redis at %s is unreachable (%v); retry later",
		t.display, err)), true}
}

// retryLater puts the round back to be sent again shortly, unless Redis has been
// unreachable for redis_timeout_s already: riding out a blip beats failing every call.
func (d *dispatcher) retryLater(r round, err error, downSince *time.Time) bool {
	if downSince.IsZero() {
		*downSince = time.Now()
		log.Printf("redis unreachable queueing requests (%v); retrying for up to %.1fs", err, d.h.RedisTimeoutS)
	}
	if time.Since(*downSince) >= d.rtt {
		return false
	}
	d.mu.Lock()
	for _, c := range r.calls {
		if d.pending[c.corr] != nil && len(c.done) == 0 { // still waiting
			d.outbox = append(d.outbox, c)
		}
	}
	for s, corrs := range r.cancels {
		d.cancels[s] = append(d.cancels[s], corrs...)
	}
	d.mu.Unlock()
	time.AfterFunc(50*time.Millisecond, d.signal)
	return true
}

func (d *dispatcher) fail(r round, res result) {
	for _, c := range r.calls {
		if !c.copy {
			c.finish(res)
		}
	}
}

// withResent adds to a round every waiting call that is not in it: after a reconnect the
// server may have lost them.
func (d *dispatcher) withResent(r round) round {
	inRound := map[uint64]bool{}
	for _, c := range r.calls {
		inRound[c.corr] = true
	}
	d.mu.Lock()
	var again []*call
	for corr, c := range d.pending {
		if !inRound[corr] && len(c.done) == 0 {
			cp := *c
			cp.copy = true
			again = append(again, &cp)
		}
	}
	d.resent += uint64(len(again))
	d.mu.Unlock()
	if len(again) > 0 {
		log.Printf("Redis connection replaced: queueing %d waiting request(s) again, in case Redis lost them",
			len(again))
	}
	r.calls = append(r.calls, again...)
	return r
}
