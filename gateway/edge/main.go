// Command ferry-edge is Ferry's native front end: a Go gRPC server that takes the
// inference calls a Python gateway would take (KServe v2 ModelInfer and
// ModelStreamInfer), queues the ones that pass admission on Redis itself, and relays
// everything else to a Python gateway beside it (docs/edge.md).
//
// Why: grpc.aio costs ~215 us of CPU per call before Ferry does any work, two thirds
// of Ferry's whole per-request cost (docs/benchmarks.md); grpc-go serves a call for a
// fraction of that. The edge speaks the same Redis contract as gateway/dispatch.py and
// learns keys, scripts and model rules from the gateway (gateway/edge_api.py), so the
// broker and workers cannot tell the two apart.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// config is the edge's settings: flags, each with an environment fallback, validated once.
type config struct {
	listen    string
	upstream  string
	redisURL  string
	gatewayID string
	metrics   string
	reusePort bool
	procs     int
	window    int
	grace     time.Duration
	startWait time.Duration
}

func env(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return fallback
}

// The per-call window's bounds: grpc-go ignores less than 64 KiB, and the connection's (4x) must fit an int32.
const (
	minWindow = 64 << 10
	maxWindow = 256 << 20
)

// edgeEnv is every FERRY_EDGE_ variable the edge reads (ferry/settings.py EDGE_ENV_NAMES lists
// the same), and FERRY_EDGE_BINARY, which `ferry up` reads and passes on with its environment:
// any other is a typo, refused as the Python processes refuse theirs.
var edgeEnv = map[string]bool{"FERRY_EDGE_LISTEN": true, "FERRY_EDGE_UPSTREAM": true, "FERRY_EDGE_GATEWAY_ID": true,
	"FERRY_EDGE_METRICS_LISTEN": true, "FERRY_EDGE_REUSE_PORT": true, "FERRY_EDGE_CPU_PROFILE": true,
	"FERRY_EDGE_PROCS": true, "FERRY_EDGE_WINDOW_BYTES": true, "FERRY_EDGE_BINARY": true}

func parseConfig(args []string) (config, redisTarget, error) {
	for _, kv := range os.Environ() {
		name := strings.SplitN(kv, "=", 2)[0]
		if strings.HasPrefix(name, "FERRY_EDGE_") && !edgeEnv[name] {
			return config{}, redisTarget{}, fmt.Errorf("unknown setting in the environment: %s", name)
		}
	}
	fs := flag.NewFlagSet("ferry-edge", flag.ContinueOnError)
	c := config{}
	fs.StringVar(&c.listen, "listen", env("FERRY_EDGE_LISTEN", "0.0.0.0:8001"),
		"host:port clients connect to [FERRY_EDGE_LISTEN]")
	fs.StringVar(&c.upstream, "upstream", env("FERRY_EDGE_UPSTREAM", "127.0.0.1:8011"),
		"host:port of the Python gateway that answers everything the edge does not [FERRY_EDGE_UPSTREAM]")
	fs.StringVar(&c.redisURL, "redis-url", env("FERRY_REDIS_URL", env("REDIS_URL", "redis://127.0.0.1:6379/0")),
		"Redis the broker reads (redis:// or unix://) [FERRY_REDIS_URL, REDIS_URL]")
	fs.StringVar(&c.gatewayID, "gateway-id", env("FERRY_EDGE_GATEWAY_ID", ""),
		"unique id of this edge in Redis (default: edge-<host>-<pid>-<random>) [FERRY_EDGE_GATEWAY_ID]")
	fs.StringVar(&c.metrics, "metrics-listen", env("FERRY_EDGE_METRICS_LISTEN", ""),
		"host:port to serve Prometheus metrics on, at /metrics (default: off) [FERRY_EDGE_METRICS_LISTEN]")
	reuse := env("FERRY_EDGE_REUSE_PORT", "false")
	fs.BoolVar(&c.reusePort, "reuse-port", reuse == "1" || reuse == "true",
		"share the listen port with other edges on this host (SO_REUSEPORT) [FERRY_EDGE_REUSE_PORT]")
	// One by default: with more, each call's goroutine hand-offs wake other OS threads, and on 2
	// cores that cost 15-25% more CPU per call at every load (docs/edge.md). One core carries
	// about 15,000 calls/s here; beyond that run more edges on the port (--reuse-port) or raise it.
	procs, perr := strconv.Atoi(env("FERRY_EDGE_PROCS", "1"))
	if perr != nil {
		return c, redisTarget{}, fmt.Errorf("FERRY_EDGE_PROCS %q is not a number", os.Getenv("FERRY_EDGE_PROCS"))
	}
	fs.IntVar(&c.procs, "procs", procs,
		"CPUs the edge runs Go code on at once (GOMAXPROCS); 0: Go's default, one per CPU [FERRY_EDGE_PROCS]")
	// A fixed HTTP/2 window: with grpc-go's dynamic one, every call that arrives on a quiet
	// connection makes the edge send a bandwidth-probing PING (and the client answer it), an
	// extra write, read and wake-up per call at low load; small calls never grow the window,
	// so the probing never stops (docs/edge.md, "Flow-control window").
	window, werr := strconv.Atoi(env("FERRY_EDGE_WINDOW_BYTES", strconv.Itoa(4<<20)))
	if werr != nil {
		return c, redisTarget{}, fmt.Errorf("FERRY_EDGE_WINDOW_BYTES %q is not a number", os.Getenv("FERRY_EDGE_WINDOW_BYTES"))
	}
	fs.IntVar(&c.window, "window-bytes", window,
		"HTTP/2 flow-control window of each call (the connection's is 4x); 0: grpc-go's dynamic window [FERRY_EDGE_WINDOW_BYTES]")
	fs.DurationVar(&c.grace, "grace", 30*time.Second, "on SIGTERM, how long calls in flight may take to finish")
	fs.DurationVar(&c.startWait, "start-wait", 60*time.Second, "how long to wait for the gateway at start")
	if err := fs.Parse(args); err != nil {
		return c, redisTarget{}, err
	}
	if fs.NArg() > 0 {
		return c, redisTarget{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for name, v := range map[string]string{"listen": c.listen, "upstream": c.upstream, "metrics-listen": c.metrics} {
		if v == "" && name == "metrics-listen" {
			continue
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			return c, redisTarget{}, fmt.Errorf("--%s %q is not host:port", name, v)
		}
	}
	if c.procs < 0 {
		return c, redisTarget{}, errors.New("--procs must be >= 0")
	}
	if c.window != 0 && (c.window < minWindow || c.window > maxWindow) {
		return c, redisTarget{}, fmt.Errorf("--window-bytes %d is out of range: 0 (dynamic) or %d to %d", c.window,
			minWindow, maxWindow)
	}
	if c.grace < 0 || c.startWait <= 0 {
		return c, redisTarget{}, errors.New("--grace must be >= 0 and --start-wait > 0")
	}
	target, err := parseRedisURL(c.redisURL)
	if err != nil {
		return c, target, err
	}
	if c.gatewayID == "" {
		host, _ := os.Hostname()
		b := make([]byte, 3)
		rand.Read(b)
		c.gatewayID = fmt.Sprintf("edge-%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b))
	}
	return c, target, nil
}

// defaultGCPercent is the edge's GOGC unless the environment sets one.
const defaultGCPercent = 400

func listen(address string, reuse bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reuse {
		lc.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	lis, err := lc.Listen(context.Background(), "tcp", address)
	if err != nil {
		return nil, err
	}
	return rawListener{lis}, nil
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("ferry-edge: ")
	cfg, target, err := parseConfig(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "ferry-edge: error: %v\n", err)
		os.Exit(2)
	}
	if cfg.procs > 0 {
		runtime.GOMAXPROCS(cfg.procs)
	}
	if _, set := os.LookupEnv("GOGC"); !set {
		// The live heap is small (the calls in flight), so Go's default (collect when it has
		// doubled) collects many times a second under load; collecting a fifth as often cut the
		// edge's CPU per call by 7-10% (docs/edge.md). GOGC in the environment still decides.
		debug.SetGCPercent(defaultGCPercent)
	}
	if path := os.Getenv("FERRY_EDGE_CPU_PROFILE"); path != "" {
		// For benchmarking the edge itself: `go tool pprof ferry-edge <path>` after it stops.
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
	}
	// Bind first: an edge that cannot serve must not announce itself in Redis.
	lis, err := listen(cfg.listen, cfg.reusePort)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-edge: error: cannot listen on %s (%v): pick another --listen, or start "+
			"every edge sharing it with --reuse-port\n", cfg.listen, err)
		os.Exit(2)
	}
	up, err := grpc.Dial(cfg.upstream, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-edge: error: gateway %s: %v\n", cfg.upstream, err)
		os.Exit(2)
	}
	h, err := fetchHello(up, cfg.gatewayID, cfg.startWait)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-edge: error: the gateway at %s did not describe itself (%v): start "+
			"`ferry gateway` there first, of the same Ferry version\n", cfg.upstream, err)
		os.Exit(2)
	}
	if h.Protocol != protocol {
		fmt.Fprintf(os.Stderr, "ferry-edge: error: the gateway at %s speaks edge protocol %d, this edge %d: "+
			"build the edge from the same Ferry checkout (scripts/build-edge)\n", cfg.upstream, h.Protocol, protocol)
		os.Exit(2)
	}
	d := newDispatcher(h, cfg.gatewayID, target)
	if err := d.start(); err != nil {
		fmt.Fprintf(os.Stderr, "ferry-edge: error: %v\n", err)
		os.Exit(1)
	}
	m := newMetrics(h.LatencyBuckets)
	m.inflight = func() int { held, _, _ := d.counts(); return held }
	m.dropped = func() uint64 { _, late, _ := d.counts(); return late }
	m.resent = func() uint64 { _, _, resent := d.counts(); return resent }
	if cfg.metrics != "" {
		ml, err := net.Listen("tcp", cfg.metrics)
		if err != nil {
			fmt.Fprintf(os.Stderr, "ferry-edge: error: cannot serve metrics on %s (%v)\n", cfg.metrics, err)
			os.Exit(2)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", m)
		go http.Serve(ml, mux)
	}
	e := &edge{h: h, up: up, specs: newSpecs(up, time.Duration(h.SpecTTLs*float64(time.Second))), d: d, m: m}
	opts := []grpc.ServerOption{
		grpc.CustomCodec(rawCodec{}),
		grpc.UnknownServiceHandler(e.handle),
		grpc.MaxRecvMsgSize(h.MaxMessageBytes),
		grpc.MaxSendMsgSize(h.MaxMessageBytes),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
	if cfg.window > 0 {
		// Both, or the one left out falls back to HTTP/2's 64 KiB and caps the other.
		opts = append(opts, grpc.InitialWindowSize(int32(cfg.window)), grpc.InitialConnWindowSize(int32(4*cfg.window)))
	}
	srv := grpc.NewServer(opts...)
	mode := "takes inference calls itself"
	if h.ForwardAll != "" {
		mode = "relays every call (" + h.ForwardAll + ")"
	}
	log.Printf("edge %s listening on %s, gateway %s, redis %s: %s", cfg.gatewayID, lis.Addr(), cfg.upstream,
		target.display, mode)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-served:
		log.Printf("serving stopped: %v", err)
	case sig := <-sigs:
		log.Printf("%s: draining (send again to exit at once)", strings.ToUpper(sig.String()))
		stopped := make(chan struct{})
		go func() { srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(cfg.grace):
			srv.Stop()
		case <-sigs:
			log.Printf("signal again: exiting now")
			os.Exit(130)
		}
	}
	d.close()
	up.Close()
	log.Printf("edge %s stopped: %s", cfg.gatewayID, e.summary())
}
