package main

// The gRPC side: ModelInfer and ModelStreamInfer requests that pass admission go to
// Redis from here; every other call, and every request the edge does not take, is
// relayed to the Python gateway unchanged (metadata, deadline, status and trailers
// included), so clients see one server.

import (
	"context"
	"fmt"
	"io"
	"log"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	service      = "/inference.GRPCInferenceService/"
	inferMethod  = service + "ModelInfer"
	streamMethod = service + "ModelStreamInfer"
)

// rawCodec passes messages through as bytes: the edge parses what it needs by hand.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	// No copy: grpc-go gives each message a buffer of its own and never writes to it after
	// Unmarshal (1.33 allocates one per message; later versions materialize a fresh slice
	// for a []byte codec), so the client's tensor bytes go to Redis without being copied.
	*(v.(*[]byte)) = data
	return nil
}
func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

type edge struct {
	h     *hello
	up    *grpc.ClientConn
	specs *specs
	d     *dispatcher

	taken uint64 // atomic: inference calls taken
	m     *metrics
}

func (e *edge) handle(_ interface{}, st grpc.ServerStream) (err error) {
	method, _ := grpc.MethodFromServerStream(st)
	defer func() {
		// A bug must cost one call, not the process and every call it holds.
		if p := recover(); p != nil {
			log.Printf("bug in %s: %v\n%s", method, p, debug.Stack())
			err = status.Errorf(codes.Internal, "internal error in %s; see the edge's log", method)
		}
	}()
	switch method {
	case inferMethod:
		var in []byte
		if err := st.RecvMsg(&in); err != nil {
			return err
		}
		spec, _, rows := e.admit(st.Context(), in)
		if spec == nil {
			return e.relay(st, method, in)
		}
		r := e.run(st.Context(), spec, rows, in)
		if r.code != codes.OK {
			return status.Error(r.code, string(r.body))
		}
		return st.SendMsg(&r.body)
	case streamMethod:
		return e.stream(st)
	default:
		return e.relay(st, method, nil)
	}
}

// admit decides whether the edge queues a request itself: the model's spec and the
// request's rows when it does, nil when the gateway must see it.
func (e *edge) admit(ctx context.Context, in []byte) (*modelSpec, *inferRequest, int64) {
	if e.h.ForwardAll != "" {
		return nil, nil, 0
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get("traceparent")) > 0 {
		e.relayed("a traceparent header (the gateway makes the spans)")
		return nil, nil, 0
	}
	req, err := parseInferRequest(in)
	if err != nil {
		e.relayed("a message that does not parse")
		return nil, nil, 0
	}
	spec := e.specs.get(ctx, req.model, req.version)
	if spec == nil {
		e.relayed("a model the gateway does not describe (unknown, or not for the edge)")
		return nil, req, 0
	}
	if !spec.Live {
		e.relayed("a model with no live worker")
		return nil, req, 0
	}
	rows, why := admit(spec, req, e.h)
	if rows == 0 {
		e.relayed(why)
		return nil, req, 0
	}
	atomic.AddUint64(&e.taken, 1)
	return spec, req, rows
}

// relayed counts an inference call left to the gateway, and logs each reason once: a
// client whose every call is relayed gains nothing from the edge and should know why.
func (e *edge) relayed(why string) {
	if e.m.relay(why) {
		log.Printf("relaying inference calls to the gateway for the first time because of: %s", why)
	}
}

func (e *edge) summary() string {
	e.m.mu.Lock()
	defer e.m.mu.Unlock()
	parts := []string{fmt.Sprintf("took %d inference calls", atomic.LoadUint64(&e.taken))}
	for why, n := range e.m.relayed {
		parts = append(parts, fmt.Sprintf("relayed %d for %s", n, why))
	}
	return strings.Join(parts, ", ")
}

// statusNames are gRPC's canonical code names, as the gateway's metrics label them.
var statusNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

func (e *edge) timeout(ctx context.Context) time.Duration {
	limit := time.Duration(e.h.RequestTimeoutS * float64(time.Second))
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < limit {
		return time.Until(dl)
	}
	return limit
}

func (e *edge) run(ctx context.Context, spec *modelSpec, rows int64, in []byte) result {
	started := time.Now()
	r := e.d.submit(ctx, spec, rows, in, e.timeout(ctx))
	if r.local && ctx.Err() == nil {
		// Failures the gateway decides on (not the client's own cancel or deadline, as in the
		// gateway); workers count the ones they decide on.
		e.d.countFailure(spec, started)
	}
	e.m.observe(spec.Name, strconv.FormatInt(spec.Version, 10), statusNames[r.code], time.Since(started).Seconds())
	return r
}

// outgoing is the client's metadata for the relayed call, without what gRPC sets itself.
func outgoing(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	out := metadata.MD{}
	for k, v := range md {
		if strings.HasPrefix(k, ":") || k == "content-type" || k == "user-agent" || k == "te" ||
			strings.HasPrefix(k, "grpc-") {
			continue
		}
		out[k] = v
	}
	return metadata.NewOutgoingContext(ctx, out)
}

// relay passes one call through to the gateway: first (when not nil) is a request
// message already read from the client; otherwise messages are pumped both ways.
func (e *edge) relay(st grpc.ServerStream, method string, first []byte) error {
	ctx, cancel := context.WithCancel(outgoing(st.Context()))
	defer cancel()
	cs, err := e.up.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method,
		grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return err
	}
	sendErr := make(chan error, 1)
	go func() {
		if first != nil {
			if err := cs.SendMsg(&first); err != nil {
				sendErr <- err
				return
			}
			sendErr <- cs.CloseSend()
			return
		}
		for {
			var m []byte
			if err := st.RecvMsg(&m); err != nil {
				if err == io.EOF {
					sendErr <- cs.CloseSend()
				} else {
					sendErr <- err
					cancel()
				}
				return
			}
			if err := cs.SendMsg(&m); err != nil {
				sendErr <- err // the gateway ended the call: its status comes from RecvMsg below
				return
			}
		}
	}()
	headerSent := false
	for {
		var m []byte
		err := cs.RecvMsg(&m)
		if !headerSent {
			if h, herr := cs.Header(); herr == nil && len(h) > 0 {
				st.SendHeader(h)
			}
			headerSent = true
		}
		if err != nil {
			st.SetTrailer(cs.Trailer())
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := st.SendMsg(&m); err != nil {
			return err
		}
	}
}

// stream answers each ModelStreamInfer request as soon as it completes (not in order),
// like the gateway: taken ones through Redis, the others as unary calls to the gateway.
func (e *edge) stream(st grpc.ServerStream) error {
	ctx := st.Context()
	var sendMu sync.Mutex
	send := func(b []byte) {
		sendMu.Lock()
		defer sendMu.Unlock()
		st.SendMsg(&b)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		var in []byte
		if err := st.RecvMsg(&in); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if p := recover(); p != nil {
					log.Printf("bug in %s: %v\n%s", streamMethod, p, debug.Stack())
					send(streamError(nil, "internal error in ModelStreamInfer; see the edge's log"))
				}
			}()
			if out := e.streamOne(ctx, in); out != nil && ctx.Err() == nil {
				send(out)
			}
		}()
	}
}

func (e *edge) streamOne(ctx context.Context, in []byte) []byte {
	spec, req, rows := e.admit(ctx, in)
	if spec != nil {
		r := e.run(ctx, spec, rows, in)
		if ctx.Err() != nil { // the stream is over: nobody to answer
			return nil
		}
		if r.code != codes.OK {
			return streamError(req, string(r.body))
		}
		return streamOK(r.body)
	}
	c, cancel := context.WithTimeout(outgoing(ctx), e.timeout(ctx))
	defer cancel()
	var resp []byte
	if err := e.up.Invoke(c, inferMethod, &in, &resp, grpc.ForceCodec(rawCodec{})); err != nil {
		if req == nil {
			req, _ = parseInferRequest(in)
		}
		return streamError(req, status.Convert(err).Message())
	}
	return streamOK(resp)
}
