package main

import "testing"

// The way a group is queued follows the count this edge last saw: the script for a queue it
// has not seen, a transaction while the queue is at most half full, the script above that.
func TestGroupsGoByTransactionOnlyWhereTheQueueWasSeenHalfEmpty(t *testing.T) {
	h := &hello{EnqueueSHA: "sha", MaxGroup: 64}
	spec := &modelSpec{Name: "m", Version: 1, RequestStream: "s", QueueCount: "q", MaxQueueSize: 8, MaxBatch: 1}
	d := newDispatcher(h, "gw", redisTarget{})
	d.hasMulti = true
	calls := func(n int) []*call {
		var out []*call
		for i := 0; i < n; i++ {
			out = append(out, &call{corr: uint64(i + 1), spec: spec, rows: 1, payload: []byte("x")})
		}
		return out
	}
	ways := func(n int) []string {
		cmds, admits := d.commands(round{calls: calls(n)}, n)
		if len(cmds) != len(admits) {
			t.Fatalf("%d commands but %d admits", len(cmds), len(admits))
		}
		var out []string
		for i, a := range admits {
			if a != nil {
				way := cmds[i][0].(string)
				if a.fast != (way == "EXEC") || (a.fast && cmds[i-3][0] != "MULTI") {
					t.Fatalf("group %d: fast %v but sent by %v", i, a.fast, cmds[i-3:i+1])
				}
				out = append(out, way)
			}
		}
		return out
	}
	if got := ways(1); len(got) != 1 || got[0] != "EVALSHA" {
		t.Fatalf("an unseen queue: %v, want the script", got)
	}
	d.queued["s"] = 2
	// Groups of one row (max_batch_size 1): 3 and 4 stay within half of 8, 5 does not.
	if got := ways(3); len(got) != 3 || got[0] != "EXEC" || got[1] != "EXEC" || got[2] != "EVALSHA" {
		t.Fatalf("seen at 2 of 8: %v, want two transactions then the script", got)
	}
	d.hasMulti, d.queued["s"] = false, 0
	if got := ways(1); got[0] != "EVALSHA" {
		t.Fatalf("a Redis user without MULTI: %v, want the script", got)
	}
	d.admitted(&admission{calls: calls(1), fast: true}, []interface{}{int64(9), []byte("1-1")})
	if d.queued["s"] != 9 {
		t.Fatalf("the count EXEC reported is not kept: %d", d.queued["s"])
	}
	if len(d.cancels["s"]) != 1 {
		t.Fatalf("a group over the bound is not cancelled: %v", d.cancels)
	}
}
