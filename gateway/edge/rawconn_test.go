package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// pair returns a connected TCP pair over loopback; the first end has raw-syscall I/O.
func pair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	lis, err := listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	other, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	raw := <-accepted
	if raw == nil {
		t.Fatal("accept failed")
	}
	if _, ok := raw.(*rawConn); !ok {
		t.Fatalf("the listener handed out a %T, not a *rawConn", raw)
	}
	t.Cleanup(func() { raw.Close(); other.Close() })
	return raw, other
}

func TestRawConnMovesBytesBothWays(t *testing.T) {
	raw, other := pair(t)
	// Far more than a socket buffer holds, so Write must park on EAGAIN and resume.
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(other, int64(len(big))))
		got <- b
	}()
	if n, err := raw.Write(big); err != nil || n != len(big) {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(big))
	}
	if b := <-got; !bytes.Equal(b, big) {
		t.Fatalf("peer read %d bytes, not what was written", len(b))
	}
	if _, err := other.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(raw, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("ReadFull = %q, %v", buf, err)
	}
}

func TestRawConnReportsEOFAndDeadline(t *testing.T) {
	raw, other := pair(t)
	raw.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := raw.Read(make([]byte, 8))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline = %v; want a timeout", err)
	}
	raw.SetReadDeadline(time.Time{})
	other.Close()
	if _, err := raw.Read(make([]byte, 8)); err != io.EOF {
		t.Fatalf("Read after the peer closed = %v; want io.EOF", err)
	}
	raw.Close()
	if _, err := raw.Write([]byte("x")); err == nil {
		t.Fatal("Write on a closed connection succeeded")
	}
}
