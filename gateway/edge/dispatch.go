package main

// Queue admitted requests on Redis and match replies back to waiting calls: the same
// contract as gateway/dispatch.py (broker/messages.py items 1, 2 and 4), in Go.
//
//   - The submitter sends everything queued since its last round trip in one pipeline,
//     one request group per model version (split at max_batch_size rows), each admitted
//     by the gateway's ENQUEUE script or, while the queue is at most half full, by a
//     transaction (admit, below); under load at most once per flush_interval_us.
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
	queued    map[string]int64 // request stream -> its queue count as of the last round (submitter only)

	late         uint64 // replies that found no waiting call (under mu)
	resent       uint64 // requests queued again after a reconnect (under mu)
	beatDue      bool   // the next round refreshes the alive key (under mu)
	listenerLost bool   // the next round re-sends what waits (under mu)
	stop         chan struct{}
	wg           sync.WaitGroup
	hasPop       bool // Redis 7: BLMPOP
	hasMulti     bool // this Redis user may MULTI/EXEC (admit)
}

type failure struct {
	stats string
	ns    int64
}

func newDispatcher(h *hello, gwID string, target redisTarget) *dispatcher {
	return &dispatcher{
		h: h, gwID: gwID, target: target, rtt: time.Duration(h.RedisTimeoutS * float64(time.Second)),
		pending: map[uint64]*call{}, cancels: map[string][]uint64{}, queued: map[string]int64{},
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
	replies, err := c.do([][]interface{}{{"INFO", "server"}, d.aliveCommand(), {"MULTI"}, {"EXEC"}})
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
	// An empty transaction: whether this Redis user may queue by MULTI/EXEC (admit). An ACL
	// written before the edge used them lacks them: then every group goes through the script.
	d.hasMulti = true
	for _, r := range replies[2:] {
		if e, refused := r.(RespError); refused && d.hasMulti {
			d.hasMulti = false
			log.Printf("redis %s refused a transaction (%v): queueing through the ENQUEUE script only; "+
				"grant the gateway's Redis user +multi +exec (`ferry redis-acl`) for the cheaper way",
				d.target.display, e)
		}
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

// admission is one request group in a round's pipeline: the calls it carries and how it
// was admitted.
type admission struct {
	calls []*call
	fast  bool // by a transaction: its reply is EXEC's, [queue count after it, entry id]
}

// admit picks how a group of n requests for spec's queue is admitted. The ENQUEUE script
// checks max_queue_size and adds the entry in one step, but Lua copies every payload in
// and out again: at concurrency 32 on 2 cores it was about 40% of Redis's CPU. Where this edge
// last saw the queue at most half full, a MULTI/EXEC of INCRBY and XADD does the same
// without the check (3-4% of the whole server's CPU per request; docs/edge.md), and the
// count that INCRBY returns does the check after the fact: over the bound, the group is
// refused as the script would have refused it and its calls cancelled (admitted below).
// Only writers this edge does not see (other gateways) can take a queue from half full
// to over full within one of its round trips, so the after-the-fact path is rare.
func (d *dispatcher) admit(spec *modelSpec, n int64) bool {
	known, ok := d.queued[spec.RequestStream]
	if !ok || !d.hasMulti { // not seen yet (or since a reconnect): the script, which reports the count
		return false
	}
	d.queued[spec.RequestStream] = known + n // for the groups after it in this round
	return known+n <= spec.MaxQueueSize/2
}

type round struct {
	calls   []*call
	cancels map[string][]uint64
	beat    bool // refresh the alive key in this round
	resend  bool // the listener's connection was replaced: queue every waiting call again
}

// commands builds one round trip: a group per model version in arrival order, split at
// max_batch_size rows (or max_group requests), then the cancellations. admits has one
// element per command, nil for those that carry no group.
func (d *dispatcher) commands(r round, holding int) ([][]interface{}, []*admission) {
	nowNs := time.Now().UnixNano()
	var cmds [][]interface{}
	var admits []*admission
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
			fast := d.admit(spec, int64(len(group)))
			var cmd []interface{}
			if fast {
				cmds = append(cmds, []interface{}{"MULTI"}, []interface{}{"INCRBY", spec.QueueCount, len(group)})
				admits = append(admits, nil, nil)
				cmd = []interface{}{"XADD", spec.RequestStream, "*", "r", d.gwID}
			} else {
				cmd = []interface{}{"EVALSHA", d.h.EnqueueSHA, 2, spec.RequestStream, spec.QueueCount, len(group),
					spec.MaxQueueSize, "r", d.gwID}
			}
			flat := make([]int64, 0, 4*len(group))
			for i, c := range group {
				cmd = append(cmd, fmt.Sprint(i), c.payload)
				flat = append(flat, int64(c.corr), c.rows, c.deadlineNs, c.timeoutNs)
			}
			header, _ := json.Marshal([]interface{}{nowNs, spec.Level, "", flat, holding})
			cmd = append(cmd, "h", header)
			cmds = append(cmds, cmd)
			if fast {
				cmds = append(cmds, []interface{}{"EXEC"})
				admits = append(admits, nil)
			}
			admits = append(admits, &admission{calls: group, fast: fast})
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
	fresh := false    // the connection is new: say alive again and resend what waits
	replaced := false // there was one before it (the first has nothing to resend)
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
			d.queued = map[string]int64{} // a new connection may be to a new Redis
		}
		if (fresh && replaced) || r.resend {
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
		if err == nil {
			err = d.retryNoScript(conn, cmds, replies)
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
		downSince, fresh, replaced = time.Time{}, false, true
		for i, reply := range replies {
			if admits[i] != nil {
				d.admitted(admits[i], reply)
			} else if e, ok := reply.(RespError); ok {
				log.Printf("redis refused %s: %v", cmds[i][0], e)
			}
		}
	}
}

// admitted settles one group from its reply: the queue count it learns, and the calls it
// fails when the queue was full or Redis refused it.
func (d *dispatcher) admitted(a *admission, reply interface{}) {
	spec := a.calls[0].spec
	n := int64(len(a.calls))
	var failed *result
	full := func(waiting int64) *result {
		return &result{codes.ResourceExhausted, []byte(fmt.Sprintf(
			"the queue of model %s v%d is full: %d requests wait, max_queue_size is %d; retry later, "+
				"add workers, or raise max_queue_size in its config.pbtxt",
			quoted(spec.Name), spec.Version, waiting, spec.MaxQueueSize)), true}
	}
	switch v := reply.(type) {
	case int64: // the script's: the count after admitting, or -1 - the count when refused
		if v < 0 {
			d.queued[spec.RequestStream] = -1 - v
			failed = full(-1 - v)
		} else {
			d.queued[spec.RequestStream] = v
		}
	case []interface{}: // EXEC's: [INCRBY's count, XADD's entry id]
		if len(v) != 2 {
			failed = &result{codes.Unavailable, []byte(fmt.Sprintf("could not queue the request: Redis answered %v", v)), true}
			break
		}
		if e, bad := v[1].(RespError); bad {
			log.Printf("queueing %d requests failed: %v", n, e)
			failed = &result{codes.Unavailable, []byte("could not queue the request: " + string(e)), true}
			break
		}
		count, ok := v[0].(int64)
		if !ok { // queued, but not counted: the next group goes through the script
			log.Printf("queued %d requests but could not count them: %v", n, v[0])
			delete(d.queued, spec.RequestStream)
			break
		}
		d.queued[spec.RequestStream] = count
		if count > spec.MaxQueueSize {
			// In the queue already: take the calls out again as a client that went away
			// would, and refuse them as the script would have. A re-sent copy stays (its
			// original may be queued under the same number, and must not be cancelled).
			var corrs []uint64
			for _, c := range a.calls {
				if !c.copy {
					corrs = append(corrs, c.corr)
				}
			}
			d.mu.Lock()
			d.cancels[spec.RequestStream] = append(d.cancels[spec.RequestStream], corrs...)
			d.mu.Unlock()
			d.signal()
			failed = full(count - n)
		}
	case RespError:
		log.Printf("queueing %d requests failed: %v", n, v)
		failed = &result{codes.Unavailable, []byte("could not queue the request: " + string(v)), true}
	default:
		failed = &result{codes.Unavailable, []byte(fmt.Sprintf("could not queue the request: Redis answered %v", v)), true}
	}
	if failed != nil {
		for _, c := range a.calls {
			if !c.copy {
				c.finish(*failed)
			}
		}
	}
}

// retryNoScript loads the ENQUEUE script again and re-sends the commands that found it
// missing (Redis restarted, or its scripts were flushed, since it was loaded), putting
// their replies in place. Only those: the rest of the round ran.
func (d *dispatcher) retryNoScript(conn *respConn, cmds [][]interface{}, replies []interface{}) error {
	var again [][]interface{}
	var at []int
	for i, r := range replies {
		if e, ok := r.(RespError); ok && strings.HasPrefix(string(e), "NOSCRIPT") {
			again = append(again, cmds[i])
			at = append(at, i)
		}
	}
	if len(again) == 0 {
		return nil
	}
	if _, err := conn.do([][]interface{}{{"SCRIPT", "LOAD", d.h.Enqueue}}); err != nil {
		return err
	}
	out, err := conn.do(again)
	if err != nil {
		return err
	}
	for j, i := range at {
		replies[i] = out[j]
	}
	return nil
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
