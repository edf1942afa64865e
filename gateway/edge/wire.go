package main

// Protobuf wire format, by hand, for the two messages the edge reads and writes itself
// (protos/grpc_service.proto): it parses a ModelInferRequest only as far as admission
// needs, forwards the client's bytes untouched, and wraps a worker's serialized
// ModelInferResponse in a ModelStreamInferResponse. Everything else passes through as
// opaque bytes, so no generated code is needed.

import (
	"errors"
)

var errWire = errors.New("not a valid protobuf message")

type inputTensor struct {
	name, datatype string
	shape          []int64
	extra          bool // parameters or typed contents: the Python gateway decides
}

type outputTensor struct {
	name  string
	extra bool // parameters (e.g. classification)
}

type inferRequest struct {
	model, version, id string
	params             []string // names of request-level parameters (priority, timeout, ...)
	inputs             []inputTensor
	outputs            []outputTensor
	rawLens            []int
}

func varint(b []byte) (uint64, int) {
	var v uint64
	for i := 0; i < len(b) && i < 10; i++ {
		v |= uint64(b[i]&0x7f) << (7 * uint(i))
		if b[i] < 0x80 {
			return v, i + 1
		}
	}
	return 0, 0
}

// fields calls fn(field number, wire type, varint value, bytes) for each field of msg.
func fields(msg []byte, fn func(num int, typ int, v uint64, b []byte) error) error {
	for len(msg) > 0 {
		key, n := varint(msg)
		if n == 0 {
			return errWire
		}
		msg = msg[n:]
		num, typ := int(key>>3), int(key&7)
		var v uint64
		var b []byte
		switch typ {
		case 0:
			if v, n = varint(msg); n == 0 {
				return errWire
			}
			msg = msg[n:]
		case 1:
			if len(msg) < 8 {
				return errWire
			}
			msg = msg[8:]
		case 2:
			l, n := varint(msg)
			if n == 0 || uint64(len(msg)-n) < l {
				return errWire
			}
			b = msg[n : n+int(l)]
			msg = msg[n+int(l):]
		case 5:
			if len(msg) < 4 {
				return errWire
			}
			msg = msg[4:]
		default:
			return errWire
		}
		if num == 0 {
			return errWire
		}
		if err := fn(num, typ, v, b); err != nil {
			return err
		}
	}
	return nil
}

func parseInput(b []byte) (inputTensor, error) {
	var t inputTensor
	err := fields(b, func(num, typ int, v uint64, p []byte) error {
		switch {
		case num == 1 && typ == 2:
			t.name = string(p)
		case num == 2 && typ == 2:
			t.datatype = string(p)
		case num == 3 && typ == 0:
			t.shape = append(t.shape, int64(v))
		case num == 3 && typ == 2: // packed
			for len(p) > 0 {
				d, n := varint(p)
				if n == 0 {
					return errWire
				}
				t.shape = append(t.shape, int64(d))
				p = p[n:]
			}
		default:
			t.extra = true
		}
		return nil
	})
	return t, err
}

func parseOutput(b []byte) (outputTensor, error) {
	var t outputTensor
	err := fields(b, func(num, typ int, v uint64, p []byte) error {
		if num == 1 && typ == 2 {
			t.name = string(p)
		} else {
			t.extra = true
		}
		return nil
	})
	return t, err
}

func parseInferRequest(b []byte) (*inferRequest, error) {
	r := &inferRequest{}
	err := fields(b, func(num, typ int, v uint64, p []byte) error {
		if typ != 2 {
			return errWire
		}
		switch num {
		case 1:
			r.model = string(p)
		case 2:
			r.version = string(p)
		case 3:
			r.id = string(p)
		case 4: // map entry: key = 1, value = 2
			var key string
			if err := fields(p, func(n, t int, _ uint64, kb []byte) error {
				if n == 1 && t == 2 {
					key = string(kb)
				}
				return nil
			}); err != nil {
				return err
			}
			r.params = append(r.params, key)
		case 5:
			t, err := parseInput(p)
			if err != nil {
				return err
			}
			r.inputs = append(r.inputs, t)
		case 6:
			t, err := parseOutput(p)
			if err != nil {
				return err
			}
			r.outputs = append(r.outputs, t)
		case 7:
			r.rawLens = append(r.rawLens, len(p))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

func appendVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func appendBytesField(b []byte, num int, p []byte) []byte {
	b = appendVarint(b, uint64(num)<<3|2)
	b = appendVarint(b, uint64(len(p)))
	return append(b, p...)
}

// streamOK wraps a serialized ModelInferResponse as ModelStreamInferResponse.infer_response.
func streamOK(body []byte) []byte {
	return appendBytesField(make([]byte, 0, len(body)+6), 2, body)
}

// streamError is a ModelStreamInferResponse carrying error_message, with the request's
// model, version and id in infer_response so that the client can match it (as the Python
// gateway does).
func streamError(r *inferRequest, message string) []byte {
	out := appendBytesField(nil, 1, []byte(message))
	if r != nil {
		var inner []byte
		if r.model != "" {
			inner = appendBytesField(inner, 1, []byte(r.model))
		}
		if r.version != "" {
			inner = appendBytesField(inner, 2, []byte(r.version))
		}
		if r.id != "" {
			inner = appendBytesField(inner, 3, []byte(r.id))
		}
		out = appendBytesField(out, 2, inner)
	}
	return out
}
