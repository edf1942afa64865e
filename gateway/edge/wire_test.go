package main

import (
	"testing"
)

// request builds a ModelInferRequest by hand: model "mlp", one FP32 input [rows, 4].
func request(rows int64, extra ...[]byte) []byte {
	var in []byte
	in = appendBytesField(in, 1, []byte("INPUT0"))
	in = appendBytesField(in, 2, []byte("FP32"))
	in = appendBytesField(in, 3, appendVarint(appendVarint(nil, uint64(rows)), 4)) // packed shape
	var b []byte
	b = appendBytesField(b, 1, []byte("mlp"))
	b = appendBytesField(b, 3, []byte("id-1"))
	b = appendBytesField(b, 5, in)
	b = appendBytesField(b, 7, make([]byte, rows*4*4))
	for _, x := range extra {
		b = append(b, x...)
	}
	return b
}

var spec = &modelSpec{Name: "mlp", Version: 1, MaxBatch: 8, Live: true,
	Inputs: []inputSpec{{Name: "INPUT0", Datatype: "FP32", Size: 4, Dims: []int64{4}}}, Outputs: []string{"OUTPUT0"}}
var h = &hello{MaxElements: 1 << 20, ReadParameters: []string{"priority", "timeout"}}

func TestAdmitTakesOnlyWhatPassesEveryCheck(t *testing.T) {
	cases := []struct {
		name string
		msg  []byte
		rows int64
	}{
		{"plain", request(3), 3},
		{"too many rows", request(9), 0},
		{"a parameter the gateway ignores", request(1, appendBytesField(nil, 4,
			appendBytesField(nil, 1, []byte("triton_enable_empty_final_response")))), 1},
		{"priority", request(1, appendBytesField(nil, 4, appendBytesField(nil, 1, []byte("priority")))), 0},
		{"an unknown output", request(1, appendBytesField(nil, 6, appendBytesField(nil, 1, []byte("NOPE")))), 0},
		{"a second raw buffer", request(1, appendBytesField(nil, 7, []byte{1})), 0},
	}
	for _, c := range cases {
		r, err := parseInferRequest(c.msg)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if rows, why := admit(spec, r, h); rows != c.rows {
			t.Errorf("%s: rows %d (%s), want %d", c.name, rows, why, c.rows)
		}
	}
}

func TestWrongRawSizeIsLeftToTheGateway(t *testing.T) {
	msg := request(2)
	r, _ := parseInferRequest(msg[:len(msg)-1]) // truncated: does not parse
	if r != nil {
		t.Fatal("a truncated message parsed")
	}
	r, _ = parseInferRequest(request(2))
	r.rawLens[0]--
	if rows, _ := admit(spec, r, h); rows != 0 {
		t.Fatal("a raw buffer of the wrong size was admitted")
	}
}

func TestStreamResponses(t *testing.T) {
	r, _ := parseInferRequest(request(1))
	got := streamError(r, "bad")
	// error_message "bad", then infer_response {model_name "mlp", id "id-1"}
	want := []byte{0x0a, 3, 'b', 'a', 'd', 0x12, 11, 0x0a, 3, 'm', 'l', 'p', 0x1a, 4, 'i', 'd', '-', '1'}
	if string(got) != string(want) {
		t.Fatalf("streamError = %v, want %v", got, want)
	}
	if ok := streamOK([]byte{1, 2}); string(ok) != string([]byte{0x12, 2, 1, 2}) {
		t.Fatalf("streamOK = %v", ok)
	}
}

// FuzzParse: no input may panic the parser or admission (a panic would cost every call the edge holds).
func FuzzParse(f *testing.F) {
	f.Add(request(1))
	f.Add(request(2, appendBytesField(nil, 4, appendBytesField(nil, 1, []byte("x")))))
	f.Add([]byte{0x2a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := parseInferRequest(b); err == nil {
			admit(spec, r, h)
			streamError(r, "x")
		}
	})
}
