package main

// The reply side of the dispatcher: the listener that pops this edge's reply list in bulk
// and completes each waiting call, and the control loop that times the edge's heartbeat
// and writes ModelStatistics' failure counts (broker/messages.py, item 4).

import (
	"encoding/binary"
	"log"
	"time"

	"google.golang.org/grpc/codes"
)

func (d *dispatcher) listener() {
	defer d.wg.Done()
	var conn *respConn
	backoff := 50 * time.Millisecond
	block := d.rtt + listenBlockS*time.Second
	lost := false // a connection this listener had was closed
	for {
		select {
		case <-d.stop:
			if conn != nil {
				conn.close()
			}
			return
		default:
		}
		if conn == nil {
			var err error
			if conn, err = dialRedis(d.target, d.rtt); err != nil {
				conn = nil
				log.Printf("reply listener: redis unreachable (%v); retrying in %v", err, backoff)
				time.Sleep(backoff)
				if backoff *= 2; backoff > 2*time.Second {
					backoff = 2 * time.Second
				}
				continue
			}
			backoff = 50 * time.Millisecond
			if lost {
				// Replies popped on the old connection may never have been read.
				d.mu.Lock()
				d.listenerLost = true
				d.mu.Unlock()
				d.signal()
				lost = false
			}
		}
		var bundles []interface{}
		var err error
		if d.hasPop {
			var rs []interface{}
			rs, err = conn.doWithin([][]interface{}{{"BLMPOP", listenBlockS, 1, d.h.ReplyList, "LEFT", "COUNT", popCount}},
				block)
			if err == nil {
				if popped, ok := rs[0].([]interface{}); ok && len(popped) == 2 {
					bundles, _ = popped[1].([]interface{})
				} else if e, ok := rs[0].(RespError); ok {
					err = e
				}
			}
		} else {
			var rs []interface{}
			if rs, err = conn.do([][]interface{}{{"LPOP", d.h.ReplyList, popCount}}); err == nil {
				bundles, _ = rs[0].([]interface{})
				if len(bundles) == 0 {
					if rs, err = conn.doWithin([][]interface{}{{"BLPOP", d.h.ReplyList, listenBlockS}}, block); err == nil {
						if popped, ok := rs[0].([]interface{}); ok && len(popped) == 2 {
							bundles = popped[1:]
						}
					}
				}
			}
		}
		if err != nil {
			if _, isReply := err.(RespError); !isReply {
				conn.close()
				conn = nil
				lost = true
			}
			log.Printf("reply listener: %v", err)
			time.Sleep(backoff)
			continue
		}
		for _, b := range bundles {
			if bundle, ok := b.([]byte); ok {
				d.deliver(bundle)
			}
		}
	}
}

// deliver completes the calls of one reply bundle: <u32 length><u64 corr><u8 code><body>...
func (d *dispatcher) deliver(bundle []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(bundle) >= 13 {
		n := int(binary.LittleEndian.Uint32(bundle))
		corr := binary.LittleEndian.Uint64(bundle[4:])
		code := codes.Code(bundle[12])
		bundle = bundle[13:]
		if n > len(bundle) {
			log.Printf("a reply bundle is cut short; dropping its rest")
			return
		}
		body := bundle[:n:n]
		bundle = bundle[n:]
		if c := d.pending[corr]; c != nil && len(c.done) == 0 {
			c.finish(result{code, body, false})
		} else {
			d.late++
		}
	}
}

// control has the submitter refresh the alive key every heartbeat (on the connection its
// requests go through: a broken one is then noticed without waiting for a request), and
// writes the failure counts of ModelStatistics on a connection of its own.
func (d *dispatcher) control() {
	defer d.wg.Done()
	tick := time.NewTicker(time.Duration(d.h.HeartbeatS * float64(time.Second)))
	defer tick.Stop()
	var conn *respConn
	defer func() {
		if conn != nil {
			conn.close()
		}
	}()
	for {
		var cmds [][]interface{}
		select {
		case <-d.stop:
			return
		case <-tick.C:
			d.mu.Lock()
			d.beatDue = true
			d.mu.Unlock()
			d.signal()
			continue
		case f := <-d.failures:
			cmds = append(cmds, []interface{}{"HINCRBY", f.stats, d.h.FailCount, 1},
				[]interface{}{"HINCRBY", f.stats, d.h.FailNs, f.ns})
		}
		if conn == nil {
			var err error
			if conn, err = dialRedis(d.target, d.rtt); err != nil {
				conn = nil
				log.Printf("gateway heartbeat failed: %v", err)
				continue
			}
		}
		if _, err := conn.do(cmds); err != nil {
			log.Printf("gateway heartbeat failed: %v", err)
			conn.close()
			conn = nil
		}
	}
}
